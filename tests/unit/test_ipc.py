"""Wire protocol and endpoint placement (veloc/ipc.py), with a real socket server."""
import os
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from veloc import ipc
from veloc.errors import BackendError
from veloc_backend import server as server_mod
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="vipc-", dir="/tmp")
    yield Path(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def echo_handler(msg):
    if msg["op"] == "ping":
        return {"pong": True}
    if msg["op"] == "wait":
        time.sleep(msg.get("sleep", 0))
        return {"slept": msg.get("sleep", 0)}
    if msg["op"] == "status":
        raise RuntimeError("boom")
    return {"echo": msg}


@pytest.fixture
def server(rundir):
    srv = server_mod.SocketServer(rundir / "s.sock", echo_handler).start()
    yield srv
    srv.close()


def test_encode_decode_roundtrip():
    frame = ipc.encode({"op": "ping", "x": [1, "é"]})
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert ipc.decode(frame[4:]) == {"op": "ping", "x": [1, "é"]}


@pytest.mark.parametrize("bad", [[1], "x", 3, None])
def test_validate_request_rejects_non_objects(bad):
    with pytest.raises(ipc.ProtocolError):
        ipc.validate_request(bad)


@pytest.mark.parametrize("bad", [{}, {"op": 3}, {"op": "rm -rf"}])
def test_validate_request_rejects_bad_ops(bad):
    with pytest.raises(ipc.ProtocolError):
        ipc.validate_request(bad)


def test_encode_limits_and_types():
    with pytest.raises(ipc.ProtocolError):
        ipc.encode({"op": "ping", "blob": "x" * 100}, max_size=50)
    with pytest.raises(ipc.ProtocolError):
        ipc.encode({"op": "ping", "bad": object()})
    with pytest.raises(ipc.ProtocolError):
        ipc.encode({"op": "ping", "nan": float("nan")})
    with pytest.raises(ipc.ProtocolError):
        ipc.decode(b"\xff\xfe")
    with pytest.raises(ipc.ProtocolError):
        ipc.decode(b"[1,2]")


def test_validate_reply():
    assert ipc.validate_reply({"ok": True})
    with pytest.raises(ipc.ProtocolError):
        ipc.validate_reply({"ok": False})
    with pytest.raises(ipc.ProtocolError):
        ipc.validate_reply({"ok": 1})


def test_request_roundtrip_and_error_reply(server):
    with ipc.BackendConnection(server.path, timeout=5) as conn:
        assert conn.request({"op": "ping"})["pong"] is True
        assert conn.request({"op": "submit", "item": {"a": 1}})["echo"]["item"] == {"a": 1}
        with pytest.raises(BackendError, match="boom"):
            conn.request({"op": "status"})
        assert conn.request({"op": "ping"})["ok"] is True      # still usable
    with pytest.raises(ipc.ProtocolError):
        ipc.BackendConnection(server.path).request({"op": "nope"})


def test_connect_failure_is_backend_error(rundir):
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="cannot connect"):
        ipc.BackendConnection(rundir / "missing.sock", timeout=2).request({"op": "ping"})
    assert time.monotonic() - t0 < 2


def test_timeout_is_backend_error_and_connection_recovers(server):
    conn = ipc.BackendConnection(server.path, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="did not answer"):
        conn.request({"op": "wait", "sleep": 2}, timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert conn.request({"op": "ping"})["pong"]        # a fresh stream, not the late reply
    conn.close()


def test_hung_server_gives_bounded_error(rundir):
    path = rundir / "hung.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)                    # accepts in the kernel, never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError):
            ipc.BackendConnection(path, timeout=0.5).request({"op": "ping"})
        assert time.monotonic() - t0 < 2
    finally:
        lst.close()


def test_reconnects_after_server_restart(rundir):
    path = rundir / "r.sock"
    srv = server_mod.SocketServer(path, echo_handler).start()
    conn = ipc.BackendConnection(path, timeout=5)
    assert conn.request({"op": "ping"})["pong"]
    srv.close()
    assert not path.exists()
    with pytest.raises(BackendError):
        conn.request({"op": "ping"})
    srv = server_mod.SocketServer(path, echo_handler).start()
    try:
        assert conn.request({"op": "ping"})["pong"]
        srv2_conns = srv.connections
        srv.close()
        srv = server_mod.SocketServer(path, echo_handler).start()
        assert srv2_conns == 1
        assert conn.request({"op": "ping"})["pong"]   # stale stream re-opened transparently
    finally:
        conn.close()
        srv.close()


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def test_malformed_messages_refused_and_server_keeps_serving(server, caplog):
    s = _raw(server.path)
    body = b"{not json"
    s.sendall(struct.pack(">I", len(body)) + body)
    reply = ipc.recv_msg(s, deadline=time.monotonic() + 5)
    assert reply["ok"] is False and "malformed" in reply["error"]
    ipc.send_msg(s, {"op": "frobnicate"})
    reply = ipc.recv_msg(s, deadline=time.monotonic() + 5)
    assert reply["ok"] is False and "unknown op" in reply["error"]
    ipc.send_msg(s, {"op": "ping"})                     # same stream still in sync
    assert ipc.recv_msg(s, deadline=time.monotonic() + 5)["pong"]
    s.sendall(struct.pack(">I", ipc.MAX_MESSAGE + 1))   # oversized: refused, closed
    reply = ipc.recv_msg(s, deadline=time.monotonic() + 5)
    assert reply["ok"] is False and "exceeds" in reply["error"]
    assert ipc.recv_msg(s, deadline=time.monotonic() + 5) is None
    s.close()
    with ipc.BackendConnection(server.path, timeout=5) as conn:
        assert conn.request({"op": "ping"})["pong"]
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_socket_file_mode_and_removal(rundir):
    srv = server_mod.SocketServer(rundir / "m.sock", echo_handler).start()
    st = os.stat(srv.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    srv.close()
    assert not os.path.exists(srv.path)


def test_peer_credentials_and_uid_check():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        pid, uid, gid = server_mod.peer_credentials(a)
        assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())
    finally:
        a.close()
        b.close()
    assert server_mod.peer_allowed(os.geteuid(), os.geteuid())
    assert not server_mod.peer_allowed(os.geteuid() + 1, os.geteuid())
    assert not server_mod.peer_allowed(None, os.geteuid())


def test_other_uid_refused_by_server(rundir, caplog):
    srv = server_mod.SocketServer(rundir / "u.sock", echo_handler,
                                  allowed_uid=os.geteuid() + 4242).start()
    try:
        with pytest.raises(BackendError, match="permission denied"):
            ipc.BackendConnection(srv.path, timeout=5).request({"op": "ping"})
        assert any("refused connection" in r.getMessage() for r in caplog.records)
    finally:
        srv.close()


def test_concurrent_clients(server):
    errors = []

    def worker(i):
        try:
            with ipc.BackendConnection(server.path, timeout=5) as c:
                for j in range(20):
                    assert c.request({"op": "submit", "item": {"i": i, "j": j}})["echo"]["item"]["j"] == j
        except Exception as exc:   # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


# ------------------------------------------------------------------ endpoints

def test_endpoint_private_dir_keyed_by_scratch_and_node(rundir, tmp_path):
    env = {"VELOC_RUNTIME_DIR": str(rundir)}
    a = ipc.endpoint_for(tmp_path / "s1", "n0", env=env)
    b = ipc.endpoint_for(tmp_path / "s2", "n0", env=env)
    c = ipc.endpoint_for(tmp_path / "s1", "n1", env=env)
    again = ipc.endpoint_for(str(tmp_path / "s1") + "/", "n0", env=env)
    assert len({a.dir, b.dir, c.dir}) == 3 and again.dir == a.dir
    st = os.lstat(a.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert a.socket.parent == a.dir and a.lock.parent == a.dir and a.pid.parent == a.dir
    assert len(os.fsencode(str(a.socket))) <= 107


def test_endpoint_resolves_symlinks(rundir, tmp_path):
    env = {"VELOC_RUNTIME_DIR": str(rundir)}
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert ipc.endpoint_for(tmp_path / "link", "n", env=env).dir == \
        ipc.endpoint_for(tmp_path / "real", "n", env=env).dir


def test_refuses_group_accessible_or_foreign_dir(rundir, tmp_path, monkeypatch):
    env = {"VELOC_RUNTIME_DIR": str(rundir)}
    ep = ipc.endpoint_for(tmp_path, "n0", env=env)
    os.chmod(ep.dir, 0o750)
    with pytest.raises(BackendError, match="0700"):
        ipc.endpoint_for(tmp_path, "n0", env=env)
    os.chmod(ep.dir, 0o700)
    real_lstat = os.lstat

    def foreign(path, *a, **k):
        st = real_lstat(path, *a, **k)
        if str(path) == str(ep.dir):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid + 1)
                                  + tuple(st)[5:])
        return st
    monkeypatch.setattr(os, "lstat", foreign)
    with pytest.raises(BackendError, match="owned by uid"):
        ipc.endpoint_for(tmp_path, "n0", env=env)


def test_refuses_symlinked_dir(rundir, tmp_path):
    env = {"VELOC_RUNTIME_DIR": str(rundir)}
    key = ipc.endpoint_key(tmp_path, "n0")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (rundir / key).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BackendError, match="symlink"):
        ipc.endpoint_for(tmp_path, "n0", env=env)


def test_long_xdg_runtime_dir_falls_back_to_tmp(tmp_path):
    long_dir = tmp_path / ("x" * 90)
    long_dir.mkdir()
    ep = ipc.endpoint_for(tmp_path, "n0", env={"XDG_RUNTIME_DIR": str(long_dir)})
    assert str(ep.dir).startswith(f"/tmp/veloc-{os.geteuid()}/")
    os.rmdir(ep.dir)
    with pytest.raises(BackendError, match="longer than"):
        ipc.endpoint_for(tmp_path, "n0", env={"VELOC_RUNTIME_DIR": str(long_dir)})
