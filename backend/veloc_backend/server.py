"""Unix-socket server of the active backend (runs inside the ``veloc-backend`` process).

One thread accepts connections; each accepted connection gets its own thread, which
checks the peer's credentials (``SO_PEERCRED``: only the backend's own uid is served),
then reads framed requests (:mod:`veloc.ipc`) and answers each with the reply of the
injected ``handler(msg) -> dict``. Malformed, unknown or oversized messages are refused
with an error reply and logged; the server keeps serving everyone else. A handler may
block (``wait``/``drain``): it only holds its own connection's thread. A reply may
carry ``"_then": callable``, run after the reply has been sent (used by ``shutdown``).
The handler sees the peer's pid (from ``SO_PEERCRED``) as ``msg["_peer_pid"]``.
"""
import logging
import os
import socket
import stat
import struct
import threading

from veloc import ipc

log = logging.getLogger("veloc.backend.server")
_UCRED = struct.Struct("3i")   # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(conn):
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def peer_allowed(peer_uid, allowed_uid):
    """True if a peer with ``peer_uid`` may talk to a backend owned by ``allowed_uid``."""
    return isinstance(peer_uid, int) and peer_uid == allowed_uid


class SocketServer:
    """Serves ``handler`` on the Unix socket ``path`` until :meth:`close`.

    The caller (``veloc_backend.main``) must hold the node's backend lock: binding
    replaces whatever file is at ``path``. The socket file is made ``0600`` and removed
    again by :meth:`close` if it is still the one this server created.
    """

    def __init__(self, path, handler, allowed_uid=None, max_message=ipc.MAX_MESSAGE):
        self.path = str(path)
        self.handler = handler
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.max_message = max_message
        self._listener = None
        self._ino = None
        self._conns = set()
        self._threads = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._acceptor = None

    # ------------------------------------------------------------ lifecycle
    def start(self):
        """Bind, listen and start accepting in a background thread; returns self."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)       # stale: the caller holds the backend lock
            else:
                raise FileExistsError(f"{self.path} exists and is not a socket; remove it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)       # the 0700 folder already keeps others out
            self._ino = os.stat(self.path).st_ino
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._acceptor = threading.Thread(target=self._accept_loop, name="veloc-accept",
                                          daemon=True)
        self._acceptor.start()
        log.info("listening on %s", self.path)
        return self

    def close(self, timeout=5.0):
        """Stop accepting, drop every connection, remove the socket file."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        self._unlink_own_socket()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def _unlink_own_socket(self):
        try:
            if self._ino is not None and os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def connections(self):
        """Number of open client connections (used for idle detection)."""
        with self._lock:
            return len(self._conns)

    # ------------------------------------------------------------ connections
    def _accept_loop(self):
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                log.exception("accept failed")
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="veloc-conn", daemon=True)
            with self._lock:
                if self._closing.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _serve(self, conn):
        try:
            pid, uid, _gid = peer_credentials(conn)
            if not peer_allowed(uid, self.allowed_uid):
                log.warning("refused connection from pid %d uid %d: only uid %d is served",
                            pid, uid, self.allowed_uid)
                self._reply(conn, {"ok": False, "error": "permission denied: wrong user"})
                return
            while not self._closing.is_set():
                if not self._one_request(conn, pid):
                    return
        except Exception:                            # never let a thread die silently
            log.exception("connection from a client failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _one_request(self, conn, pid):
        """Serve one request; False when the connection should end."""
        try:
            msg = ipc.recv_msg(conn, max_size=self.max_message)
        except ipc.OversizedMessage as exc:
            log.warning("refused message from pid %d: %s; closing its connection", pid, exc)
            self._reply(conn, {"ok": False, "error": f"malformed message: {exc}"})
            return False
        except ipc.ProtocolError as exc:
            log.warning("refused malformed message from pid %d: %s", pid, exc)
            return self._reply(conn, {"ok": False, "error": f"malformed message: {exc}"})
        except (OSError, ConnectionError) as exc:
            if not self._closing.is_set():
                log.info("connection from pid %d ended: %s", pid, exc)
            return False
        if msg is None:
            return False
        try:
            ipc.validate_request(msg)
        except ipc.ProtocolError as exc:
            log.warning("refused request from pid %d: %s", pid, exc)
            return self._reply(conn, {"ok": False, "error": f"malformed message: {exc}"})
        then = None
        msg["_peer_pid"] = pid          # reserved key: set by the server, never by clients
        try:
            reply = self.handler(msg)
            if not isinstance(reply, dict):
                raise TypeError(f"handler returned {type(reply).__name__}, not dict")
            then = reply.pop("_then", None)
            reply.setdefault("ok", True)
        except Exception as exc:
            log.exception("request %r from pid %d failed", msg.get("op"), pid)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        keep = self._reply(conn, reply)
        if then is not None:             # e.g. shutdown: act only once the reply is out
            try:
                then()
            except Exception:
                log.exception("post-reply action of %r failed", msg.get("op"))
        return keep

    def _reply(self, conn, reply):
        try:
            try:
                data = ipc.encode(reply, self.max_message)
            except ipc.ProtocolError as exc:
                log.error("cannot send reply: %s", exc)
                data = ipc.encode({"ok": False, "error": f"backend reply unusable: {exc}"})
            conn.sendall(data)
            return True
        except OSError as exc:
            log.info("client went away before its reply: %s", exc)
            return False
