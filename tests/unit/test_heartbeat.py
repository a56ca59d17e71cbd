"""Backend liveness (async mode, ``[backend] heartbeat_timeout``): a stopped backend is a
``BackendError`` within the heartbeat; a backend busy with a long pipeline run is not.

A real ``veloc-backend`` serves a client made by ``init_single`` in this process. Its
engine carries one extra module, ``SlowModule`` (below, loaded through ``--executor``),
that keeps the engine thread busy in Python for ``$VELOC_TEST_SLOW`` seconds per version,
holding the interpreter lock as a long flush's Python parts would.
"""
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import veloc
from veloc.engine.module import Module
from veloc.errors import BackendError, ConfigError
from veloc_backend import executor as executor_mod
from veloc_backend import lifecycle
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
pytestmark = pytest.mark.timeout(90)


class SlowModule(Module):
    """Test-only module, first in the pipeline: burns ``$VELOC_TEST_SLOW`` s of engine time."""
    name = "slow_for_test"

    def checkpoint(self, cmd):
        end = time.monotonic() + float(os.environ.get("VELOC_TEST_SLOW", "0"))
        n = 0
        while time.monotonic() < end:
            n += sum(range(1000))           # pure Python: holds the GIL between switches
        return True


def slow_engine(config, node, logger):
    """``--executor`` factory: the default engine executor with :class:`SlowModule` added."""
    from veloc.engine.pipeline import register_module
    register_module(SlowModule)
    return executor_mod.EngineExecutor(config, node, logger)


@pytest.fixture
def backend(dirs, monkeypatch):
    """Start the node's backend with the slow engine; yields (config dict, pid, set_slow)."""
    runtime = Path(tempfile.mkdtemp(prefix="vhb-", dir="/tmp"))
    monkeypatch.setenv("VELOC_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("VELOC_NODE_ID", "hb0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    cfg_path = Path(dirs["tmp"]) / "hb.ini"
    pids = []

    def start(heartbeat, slow_s):
        monkeypatch.setenv("VELOC_TEST_SLOW", str(slow_s))
        cfg_path.write_text(f"scratch = {dirs['scratch']}\npersistent = {dirs['persistent']}\nmode = async\n"
                            f"[backend]\nheartbeat_timeout = {heartbeat}\n")
        ep = lifecycle.ensure_backend(str(cfg_path), timeout=30,
                                      extra_args=("--executor", "test_heartbeat:slow_engine", "--idle-exit", "60"))
        pids.append(lifecycle.read_pid(ep))
        return str(cfg_path), pids[-1]

    yield start
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    import shutil
    shutil.rmtree(runtime, ignore_errors=True)


def test_stopped_backend_is_a_backend_error_within_the_heartbeat(backend):
    heartbeat = float(os.environ.get("VELOC_TEST_HEARTBEAT", "1.5"))    # e.g. 5 to time the default
    cfg, pid = backend(heartbeat, 3 * heartbeat)
    c = veloc.init_single(0, cfg)
    try:
        c.protect("a", np.arange(1 << 16, dtype=np.float64))
        c.checkpoint("run", 1)               # the backend's engine now runs for 4.5 s
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(BackendError) as info:
            c.checkpoint_wait()
        detected = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
        c.finalize(drain=False)
    message = str(info.value)
    print(f"stopped backend detected after {detected:.2f} s (heartbeat_timeout = {heartbeat} s)")
    assert heartbeat - 0.1 <= detected <= heartbeat + 1.0, detected
    assert "node hb0's veloc backend" in message and f"pid {pid}" in message, message
    assert f"within {heartbeat:g} s" in message and "kill it" in message and "heartbeat_timeout" in message, message


def test_stopped_backend_found_at_init_is_a_backend_error_within_the_heartbeat(backend):
    """A job starting next to a stopped backend does not wait out the start-up timeout (60 s):
    the backend serves (lock, pid file, socket) but answers nothing for a heartbeat."""
    heartbeat = float(os.environ.get("VELOC_TEST_HEARTBEAT", "1.5"))
    cfg, pid = backend(heartbeat, 0)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(BackendError) as info:
            veloc.init_single(0, cfg)
        detected = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    message = str(info.value)
    print(f"stopped backend found at init after {detected:.2f} s (heartbeat_timeout = {heartbeat} s)")
    assert heartbeat <= detected <= heartbeat + 1.5, detected
    assert "node hb0" in message and f"pid {pid}" in message and "kill it" in message, message


def test_long_engine_run_is_not_hung(backend):
    heartbeat = 1.5
    cfg, pid = backend(heartbeat, 3 * heartbeat)
    with veloc.init_single(0, cfg) as c:
        a = np.arange(1 << 16, dtype=np.float64)
        c.protect("a", a)
        c.checkpoint("run", 1)
        t0 = time.monotonic()
        c.checkpoint_wait()                   # 3 heartbeats of engine work: no error
        waited = time.monotonic() - t0
        assert waited >= 2 * heartbeat, waited
        a[:] = 0
        assert c.restart_test("run") == 1
        c.restart("run", 1)
        assert a[7] == 7.0 and c.last_restart.level == "scratch"


def test_heartbeat_timeout_is_checked():
    base = {"scratch": "/tmp/x", "mode": "async"}
    assert veloc.config.load_config(base).section("backend")["heartbeat_timeout"] == 5.0
    for bad in ("0", "-2", "soon", "inf"):
        with pytest.raises(ConfigError, match="backend.heartbeat_timeout"):
            veloc.config.load_config({**base, "backend": {"heartbeat_timeout": bad}})
    env = {"VELOC_BACKEND_HEARTBEAT_TIMEOUT": "2.5"}
    assert veloc.config.load_config(base, env).section("backend")["heartbeat_timeout"] == 2.5
