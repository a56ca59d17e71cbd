"""Wire protocol between application ranks and the node's active backend, and where the
backend's socket, lock and pid files live.

Used by two processes: every application rank in async mode (through
:class:`BackendConnection`, via ``veloc_backend.lifecycle.ensure_backend``) and the
``veloc-backend`` daemon of the node (through :func:`recv_msg` / :func:`send_msg` in its
server). ``veloc drain`` / ``veloc status`` use the client side too.

Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON encoding one
object. A request is ``{"op": <one of OPS>, ...}``; a reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "<message>"}``. Anything else is a :class:`ProtocolError`.

Endpoints: one private (``0700``, owned by this user) directory per (resolved scratch
path, node id) pair, so two jobs with different scratch folders never share a backend,
under ``$VELOC_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/veloc``, else ``/tmp/veloc-<uid>``;
the first whose socket path fits the AF_UNIX limit is used.
"""
import errno
import hashlib
import json
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from veloc.errors import BackendError

#: Operations a backend understands. Requests with any other ``op`` are refused.
OPS = frozenset({
    "ping",        # liveness: reply {"pid", "node", "key"}
    "status",      # queue counters and per-version results
    "submit",      # enqueue one work item (a rank's command) -> {"id"}
    "wait",        # block until given items/versions are done -> results
    "drain",       # block until nothing is pending
    "shutdown",    # stop the backend (optionally after draining)
})
MAX_MESSAGE = 4 << 20          # bytes of JSON per message, either direction
_HEADER = struct.Struct(">I")
_SUN_PATH_MAX = 107            # sizeof(sun_path) - 1 on Linux
SOCKET_NAME = "backend.sock"
LOCK_NAME = "backend.lock"     # held (flock) by the live backend for its whole life
SPAWN_LOCK_NAME = "spawn.lock"  # held briefly by the client that starts a backend
PID_NAME = "backend.pid"


class ProtocolError(BackendError):
    """A message violates the framing, size limit or shape rules of this protocol."""


class OversizedMessage(ProtocolError):
    """A length header above the limit: the stream cannot be resynchronized."""


# ---------------------------------------------------------------- message shape

def validate_request(msg):
    """Return ``msg`` if it is a well-formed request, else raise :class:`ProtocolError`."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(msg).__name__}")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(f"request needs a string 'op' field, got {op!r}")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
    return msg


def validate_reply(msg):
    """Return ``msg`` if it is a well-formed reply, else raise :class:`ProtocolError`."""
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        raise ProtocolError(f"reply must be a JSON object with a boolean 'ok', got {msg!r:.200}")
    if not msg["ok"] and not isinstance(msg.get("error"), str):
        raise ProtocolError(f"error reply needs a string 'error' field, got {msg!r:.200}")
    return msg


def encode(msg, max_size=MAX_MESSAGE):
    """Frame one JSON object; raise :class:`ProtocolError` if it is not one or too large."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a dict, got {type(msg).__name__}")
    try:
        body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message is not JSON-serializable: {exc}") from None
    if len(body) > max_size:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the limit of {max_size}")
    return _HEADER.pack(len(body)) + body


def decode(body):
    """Parse one message body (bytes) into a dict, or raise :class:`ProtocolError`."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(msg).__name__}")
    return msg


def send_msg(sock, msg, max_size=MAX_MESSAGE):
    """Send one framed message on a connected stream socket."""
    sock.sendall(encode(msg, max_size))


def _recv_exact(sock, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out in the middle of a message")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_msg(sock, max_size=MAX_MESSAGE, deadline=None, body_timeout=30.0):
    """Receive one message as a dict; ``None`` on a clean close before its first byte.

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole wait; ``None`` waits for
    the first byte forever (a server idling on a client) but still bounds the rest of a
    started message by ``body_timeout`` so a stuck peer cannot pin a thread. Raises
    :class:`ProtocolError` for an oversized or malformed message (after reading a
    malformed body whole, so the stream stays in sync), ``ConnectionError`` for a close
    mid-message, ``socket.timeout`` on expiry.
    """
    if deadline is not None:
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    else:
        sock.settimeout(None)
    first = sock.recv(_HEADER.size)
    if not first:
        return None
    rest_deadline = deadline if deadline is not None else time.monotonic() + body_timeout
    header = first + _recv_exact(sock, _HEADER.size - len(first), rest_deadline)
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise OversizedMessage(f"message of {size} bytes exceeds the limit of {max_size}")
    return decode(_recv_exact(sock, size, rest_deadline))


# ---------------------------------------------------------------- client connection

class BackendConnection:
    """A rank's connection to its node's backend; thread-safe, reconnects on demand.

    ``request`` raises :class:`BackendError` when the backend cannot be reached, does
    not answer within the timeout, closes the connection, or answers ``ok: false``. A
    connection that broke since its last use is re-opened once, transparently; requests
    that change state carry a unique ``key`` so the backend ignores a replayed one.
    """

    def __init__(self, socket_path, timeout=30.0, owner=None):
        self.socket_path = str(socket_path)
        self.timeout = float(timeout)
        self.owner = owner or f"veloc backend at {self.socket_path}"   # for error messages
        self._sock = None
        self._lock = threading.Lock()

    def _connect(self, deadline):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise BackendError(
                f"cannot connect to the veloc backend at {self.socket_path}: {exc.strerror or exc}; "
                "is it running? (start it with veloc-backend CFG or veloc-run)") from None
        self._sock = sock

    def close(self):
        """Close the connection (a later request re-opens it)."""
        with self._lock:
            self._close()

    def _close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def request(self, msg, timeout=None):
        """Send ``msg`` and return the backend's reply dict (``ok`` is true)."""
        validate_request(msg)
        wait = self.timeout if timeout is None else float(timeout)
        with self._lock:
            reused = self._sock is not None
            try:
                reply = self._roundtrip(msg, time.monotonic() + wait, wait)
            except _Broken as exc:
                self._close()
                if not reused:
                    raise BackendError(str(exc)) from None
                reply = None
            if reply is None:   # stale connection: the backend restarted or timed us out
                try:
                    reply = self._roundtrip(msg, time.monotonic() + wait, wait)
                except _Broken as exc:
                    self._close()
                    raise BackendError(str(exc)) from None
        if not reply["ok"]:
            raise BackendError(f"backend refused {msg['op']!r}: {reply['error']}")
        return reply

    def _roundtrip(self, msg, deadline, wait):
        if self._sock is None:
            self._connect(deadline)
        try:
            try:
                send_msg(self._sock, msg)
            except OSError:
                # The backend may have answered and hung up before reading (a refusal):
                # its reply is still queued on our side of the socket.
                reply = recv_msg(self._sock, deadline=min(deadline, time.monotonic() + 1.0))
                if reply is None:
                    raise
            else:
                reply = recv_msg(self._sock, deadline=deadline)
        except socket.timeout:
            self._close()     # the reply may still arrive: never reuse this stream
            raise BackendError(
                f"{self.owner} did not answer {msg['op']!r} within {wait:g} s: it is hung, stopped "
                "or overloaded; check its log, kill it (its journal keeps unfinished work for the next "
                "backend) and restart the job, or raise [backend] heartbeat_timeout on a loaded "
                "node") from None
        except ProtocolError as exc:
            self._close()
            raise BackendError(f"bad reply from backend at {self.socket_path}: {exc}") from None
        except OSError as exc:
            raise _Broken(f"connection to the veloc backend at {self.socket_path} broke: "
                          f"{exc}; the backend may have died (see its log)") from None
        if reply is None:
            raise _Broken(f"the veloc backend at {self.socket_path} closed the connection "
                          f"during {msg['op']!r}; it may have died or stopped (see its log)")
        try:
            return validate_reply(reply)
        except ProtocolError as exc:
            self._close()
            raise BackendError(f"bad reply from backend at {self.socket_path}: {exc}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Broken(Exception):
    """Internal: the stream failed in a way a fresh connection may fix."""


# ---------------------------------------------------------------- endpoints

@dataclass(frozen=True)
class Endpoint:
    """Files of one node's backend for one job (scratch folder): all in ``dir`` (0700)."""
    dir: Path
    key: str
    node_id: str
    scratch: Path

    @property
    def socket(self):
        return self.dir / SOCKET_NAME

    @property
    def lock(self):
        return self.dir / LOCK_NAME

    @property
    def spawn_lock(self):
        return self.dir / SPAWN_LOCK_NAME

    @property
    def pid(self):
        return self.dir / PID_NAME


def endpoint_key(scratch_dir, node_id):
    """Hash of the resolved scratch path and node id: the identity of one backend."""
    resolved = os.path.realpath(os.fspath(scratch_dir))
    return hashlib.sha256(f"{resolved}\0{node_id}".encode()).hexdigest()[:20]


def _base_candidates(env):
    """(base, explicit) pairs to try in order; an explicit base is never fallen back from."""
    if env.get("VELOC_RUNTIME_DIR"):
        return [(Path(env["VELOC_RUNTIME_DIR"]), True)]
    out = []
    if env.get("XDG_RUNTIME_DIR"):
        out.append((Path(env["XDG_RUNTIME_DIR"]) / "veloc", False))
    out.append((Path("/tmp") / f"veloc-{os.geteuid()}", False))
    return out


def ensure_private_dir(path):
    """Create ``path`` as a ``0700`` directory, or check an existing one is private.

    Refuses (with :class:`BackendError`) a symlink, a non-directory, a directory owned by
    another user, or one that group or others can access: a socket in there could be
    replaced by someone else.
    """
    path = Path(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BackendError(f"cannot create backend directory {path}: {exc.strerror}") from None
    else:
        os.chmod(path, 0o700)    # umask may have cleared owner bits
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise BackendError(f"backend directory {path} is not a directory (or is a symlink); "
                           "remove it or set VELOC_RUNTIME_DIR")
    if st.st_uid != os.geteuid():
        raise BackendError(f"backend directory {path} is owned by uid {st.st_uid}, not by you "
                           f"(uid {os.geteuid()}); refusing it: set VELOC_RUNTIME_DIR")
    if st.st_mode & 0o077:
        raise BackendError(f"backend directory {path} has mode {stat.S_IMODE(st.st_mode):o}; "
                           "it must be 0700: chmod 700 it or remove it")
    return path


def socket_dir_for(scratch_dir, node_id, env=None, create=True):
    """The private directory of the backend serving (``scratch_dir``, ``node_id``)."""
    env = os.environ if env is None else env
    key = endpoint_key(scratch_dir, node_id)
    tried = []
    for base, explicit in _base_candidates(env):
        path = base / key
        if len(os.fsencode(str(path / SOCKET_NAME))) > _SUN_PATH_MAX:
            tried.append(f"{base} (socket path longer than {_SUN_PATH_MAX} bytes)")
            continue
        if not create:
            return path
        try:
            if explicit:     # the user's folder: it must exist; only our subfolder is checked
                if not base.is_dir():
                    raise BackendError(f"VELOC_RUNTIME_DIR={base} is not a directory")
            else:            # a shared place like /tmp: our own folder must be private too
                if not base.parent.is_dir():
                    raise BackendError(f"{base.parent} does not exist")
                ensure_private_dir(base)
            return ensure_private_dir(path)
        except BackendError as exc:
            tried.append(str(exc))
    raise BackendError("no usable directory for the backend socket: " + "; ".join(tried)
                       + "; set VELOC_RUNTIME_DIR to a short private path")


def endpoint_for(scratch_dir, node_id, env=None, create=True):
    """The :class:`Endpoint` of the backend serving this job's ``scratch_dir`` on ``node_id``."""
    d = socket_dir_for(scratch_dir, node_id, env=env, create=create)
    return Endpoint(dir=d, key=d.name, node_id=str(node_id),
                    scratch=Path(os.path.realpath(os.fspath(scratch_dir))))


def is_connection_refused(exc):
    """True if ``exc`` means nobody listens on the socket (stale file or no file)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
