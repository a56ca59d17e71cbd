"""Real backend processes: start races, crashes, stale files, signals, journal resume.

Backends here run ``MarkerExecutor`` (below, loaded with ``--executor``), which writes one
marker file per finished batch, so the tests need no engine. Every backend started by a
test is killed at its end, and each also exits by itself after 60 idle seconds.
"""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from veloc import ipc
from veloc.errors import BackendError

PKG = "veloc_backend"
from veloc_backend import lifecycle
from veloc_backend import control
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXTRA = ("--executor", f"{Path(__file__).stem}:MarkerExecutor", "--idle-exit", "60",
         "--orphan-grace", "1")
pytestmark = pytest.mark.timeout(120)


class MarkerExecutor:
    """Test executor run inside the backend: sleeps ``$VELOC_TEST_DELAY`` seconds, then
    writes ``<group>.json`` (the batch's items) into ``$VELOC_TEST_MARKERS``."""

    def __init__(self, config, node, logger):
        self.dir = Path(os.environ["VELOC_TEST_MARKERS"])
        self.delay = float(os.environ.get("VELOC_TEST_DELAY", "0"))

    def run(self, batch):
        time.sleep(self.delay)
        if batch.group.startswith("fail"):
            raise RuntimeError(f"module flush failed on {batch.group}")
        (self.dir / f"{batch.group.replace('/', '_')}.json").write_text(json.dumps(batch.items))
        return {"timings": {"marker": self.delay}}


def alive(pid):
    """True if ``pid`` runs (zombies count as dead: nobody may reap them here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Job:
    """A config, its environment, and cleanup of every backend it started."""

    def __init__(self, base, runtime, node="n0", scratch_name="scratch"):
        self.base = base
        self.markers = base / "markers"
        self.markers.mkdir(exist_ok=True)
        self.cfg = base / f"{scratch_name}.ini"
        self.cfg.write_text(f"scratch = {base}/{scratch_name}/{{node}}\nmode = async\n")
        self.env = dict(os.environ, VELOC_NODE_ID=node, VELOC_RUNTIME_DIR=str(runtime),
                        VELOC_TEST_MARKERS=str(self.markers), VELOC_TEST_DELAY="0")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(REPO),
                                                               os.environ.get("PYTHONPATH")]))
        self.pids = set()

    @property
    def ep(self):
        return lifecycle.resolve(self.cfg, self.env)[2]

    def ensure(self, timeout=30.0):
        ep = lifecycle.ensure_backend(self.cfg, self.env, timeout=timeout, extra_args=EXTRA)
        pid = lifecycle.read_pid(ep)
        self.pids.add(pid)
        return ep, pid

    def conn(self, timeout=10.0):
        return ipc.BackendConnection(self.ep.socket, timeout)

    def cleanup(self):
        pid = lifecycle.read_pid(self.ep)
        for p in self.pids | ({pid} if pid else set()):
            if p and alive(p):
                try:
                    os.kill(p, signal.SIGCONT)
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in list(self.pids):
            try:
                os.waitpid(p, os.WNOHANG)
            except (ChildProcessError, TypeError):
                pass


@pytest.fixture
def job(dirs):
    runtime = Path(tempfile.mkdtemp(prefix="vrt-", dir="/tmp"))
    j = Job(dirs["base"], runtime)
    yield j
    j.cleanup()
    import shutil
    shutil.rmtree(runtime, ignore_errors=True)


def submit(conn, group, rank=0, size=1):
    return conn.request({"op": "submit", "item": {"group": group, "group_size": size,
                                                   "rank": rank, "order": "x"}})


def test_start_ping_status_and_work(job):
    t0 = time.monotonic()
    ep, pid = job.ensure()
    started = time.monotonic() - t0
    assert alive(pid) and started < 15
    assert stat_mode(ep.dir) == 0o700 and stat_mode(ep.socket) == 0o600
    with job.conn() as c:
        assert c.request({"op": "ping"})["pid"] == pid
        submit(c, "v/1", 0, 2)
        assert c.request({"op": "status"})["waiting"]["v/1"]["have"] == 1
        submit(c, "v/1", 1, 2)
        res = c.request({"op": "wait", "groups": ["v/1"], "timeout": 10})["results"]["v/1"]
        assert res["ok"] and res["items"] == 2
        submit(c, "fail/2")
        res = c.request({"op": "wait", "groups": ["fail/2"], "timeout": 10})["results"]["fail/2"]
        assert not res["ok"] and "flush failed" in res["error"]
        assert c.request({"op": "drain", "timeout": 10})["drained"]
    assert {json.loads(p.read_text())[0]["rank"] for p in job.markers.glob("v_1.json")} == {0}
    log = lifecycle.log_path(*lifecycle.resolve(job.cfg, job.env))
    text = log.read_text()
    assert "backend ready" in text and "group v/1 done" in text and "marker=" in text
    assert job.ensure()[1] == pid                      # an answering backend is reused
    print(f"backend start-up: {started:.3f} s")


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


_RACER = """
import sys, importlib
lc = importlib.import_module(sys.argv[1] + ".lifecycle")
ep = lc.ensure_backend(sys.argv[2], timeout=60, extra_args=sys.argv[3:])
print(lc.read_pid(ep))
"""


def test_spawn_race_starts_exactly_one(job):
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, PKG, str(job.cfg), *EXTRA],
                              env=job.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        outs.append(int(out.strip()))
    job.pids.update(outs)
    assert len(set(outs)) == 1
    cfg = os.path.abspath(job.cfg)
    backends = [int(d) for d in os.listdir("/proc") if d.isdigit() and alive(int(d))
                and cfg in _cmdline(d) and ".main" in _cmdline(d)]
    assert backends == [outs[0]]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_kill9_then_restart_cleans_stale_files_and_resumes_journal(job):
    job.env["VELOC_TEST_DELAY"] = "0.4"
    ep, pid = job.ensure()
    with job.conn() as c:
        for v in range(5):
            submit(c, f"k/{v}")
    wait_for(lambda: (job.markers / "k_0.json").exists(), what="first batch")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="backend death")
    assert ep.socket.exists() and ep.pid.exists()       # stale files left by kill -9
    job.env["VELOC_TEST_DELAY"] = "0"
    ep2, pid2 = job.ensure()
    assert pid2 != pid and alive(pid2)
    with job.conn() as c:
        st = c.request({"op": "status"})
        assert st["counts"]["replayed"] >= 3
        assert c.request({"op": "drain", "timeout": 20})["drained"]
    assert sorted(p.name for p in job.markers.iterdir()) == [f"k_{v}.json" for v in range(5)]


def test_sigterm_stops_cleanly(job):
    ep, pid = job.ensure()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), timeout=15, what="exit on SIGTERM")
    assert not ep.socket.exists() and not ep.pid.exists() and not ep.lock.exists()
    log = lifecycle.log_path(*lifecycle.resolve(job.cfg, job.env)).read_text()
    assert "backend stopped" in log
    assert job.ensure()[1] != pid                       # the next job starts at once


def test_shutdown_op_after_drain(job):
    job.env["VELOC_TEST_DELAY"] = "0.2"
    ep, pid = job.ensure()
    with job.conn() as c:
        for v in range(3):
            submit(c, f"d/{v}")
        assert c.request({"op": "shutdown", "drain": True})["stopping"]
    wait_for(lambda: not alive(pid), timeout=20, what="exit after drain")
    assert len(list(job.markers.iterdir())) == 3
    assert not ep.socket.exists() and not ep.pid.exists() and not ep.lock.exists()
    assert lifecycle.journal_path(*lifecycle.resolve(job.cfg, job.env)[:2]).read_text() == ""


def test_incomplete_group_released_when_clients_gone(job):
    job.ensure()
    with job.conn() as c:
        submit(c, "o/1", 0, 2)                          # rank 1 "crashed" before sending
    with job.conn() as c:
        time.sleep(1.5)                                  # orphan grace is 1 s in these tests
        res = c.request({"op": "wait", "groups": ["o/1"], "timeout": 10})["results"]
        assert "o/1" in res or (job.markers / "o_1.json").exists()
    wait_for(lambda: (job.markers / "o_1.json").exists(), what="orphan group run")


def test_malformed_message_refused_logged_and_backend_keeps_serving(job):
    ep, pid = job.ensure()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(ep.socket))
    body = b'{"op": 5}'
    s.sendall(struct.pack(">I", len(body)) + body)
    reply = ipc.recv_msg(s, deadline=time.monotonic() + 5)
    assert reply["ok"] is False and "malformed" in reply["error"]
    s.close()
    with job.conn() as c:
        with pytest.raises(BackendError, match="item"):
            c.request({"op": "submit", "item": [1, 2]})
        with pytest.raises(BackendError, match="group_size"):
            c.request({"op": "submit", "item": {"group": "g", "group_size": "2"}})
        assert c.request({"op": "ping"})["pid"] == pid
    log = lifecycle.log_path(*lifecycle.resolve(job.cfg, job.env)).read_text()
    assert "refused" in log


def test_hung_backend_gives_bounded_backend_error(job):
    ep, pid = job.ensure()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="did not answer"):
            job.conn(timeout=1).request({"op": "ping"})
        with pytest.raises(BackendError, match="does not answer"):
            job.ensure(timeout=3)
        assert time.monotonic() - t0 < 12
    finally:
        os.kill(pid, signal.SIGCONT)
    with job.conn() as c:
        assert c.request({"op": "ping"})["pid"] == pid


def test_dead_backend_gives_backend_error_quickly(job):
    ep, pid = job.ensure()
    conn = job.conn(timeout=5)
    assert conn.request({"op": "ping"})["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="death")
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        conn.request({"op": "ping"})
    assert time.monotonic() - t0 < 2
    with pytest.raises(BackendError, match="no veloc backend"):
        lifecycle.connect(job.cfg, job.env, timeout=2, start=False)


def test_two_jobs_with_different_configs_do_not_mix(job, dirs):
    other = Job(dirs["base"], job.env["VELOC_RUNTIME_DIR"], scratch_name="other")
    try:
        ep1, pid1 = job.ensure()
        ep2, pid2 = other.ensure()
        assert pid1 != pid2 and ep1.dir != ep2.dir
        with ipc.BackendConnection(ep2.socket, 5) as c:
            assert c.request({"op": "ping"})["key"] == ep2.key
    finally:
        other.cleanup()


def test_second_backend_for_same_node_exits(job):
    ep, pid = job.ensure()
    proc = subprocess.run(lifecycle.backend_command(job.cfg, EXTRA), env=lifecycle.backend_env(job.env),
                          capture_output=True, timeout=30)
    assert proc.returncode == 3
    with job.conn() as c:
        assert c.request({"op": "ping"})["pid"] == pid


def test_drain_starts_a_backend_to_finish_a_dead_ones_journal(job):
    job.env["VELOC_TEST_DELAY"] = "0.3"
    ep, pid = job.ensure()
    with job.conn() as c:
        for v in range(4):
            submit(c, f"j/{v}")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="death")
    (entry,) = control.status(job.cfg, job.env)
    assert not entry["alive"] and entry["journaled"] >= 3
    assert "unfinished" in control.format_status([entry])
    job.env["VELOC_TEST_DELAY"] = "0"
    res = control.drain(job.cfg, job.env, timeout=30, extra_args=EXTRA)
    job.pids.add(lifecycle.read_pid(job.ep))
    assert res["drained"] and res["pending"] == 0
    assert len(list(job.markers.iterdir())) == 4
    (entry,) = control.status(job.cfg, job.env)
    assert entry["alive"] and entry["counts"]["replayed"] >= 3
    assert "0 pending" in control.format_status([entry])
    assert control.drain(job.cfg, job.env, timeout=5)["drained"]


def test_stop_frees_endpoint_even_if_scratch_was_deleted(job):
    ep, pid = job.ensure()
    with job.conn() as c:
        submit(c, "z/1", 0, 2)                     # journaled on scratch, waiting for rank 1
    shutil.rmtree(job.base / "scratch")            # the node's scratch is lost
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), timeout=15, what="exit on SIGTERM")
    assert not ep.dir.exists()                     # socket, pid, lock and folder all gone
    assert job.ensure()[1] != pid


def test_same_scratch_from_another_runtime_dir_is_refused(job):
    ep, pid = job.ensure()
    other_rt = Path(tempfile.mkdtemp(prefix="vrt2-", dir="/tmp"))
    env = dict(job.env, VELOC_RUNTIME_DIR=str(other_rt))
    try:
        with pytest.raises(BackendError, match="exited with code 4"):
            lifecycle.ensure_backend(job.cfg, env, timeout=20, extra_args=EXTRA)
    finally:
        shutil.rmtree(other_rt, ignore_errors=True)
    with job.conn() as c:
        assert c.request({"op": "ping"})["pid"] == pid
