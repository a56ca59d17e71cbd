"""Drains report progress: the backend's queue counts versions and bytes pending and the
rate at which bytes finish; ``veloc drain`` and an application rank's wait print one
line every few seconds while they wait."""
import logging
import threading
import time

import pytest

from veloc.cli import main
from veloc.progress import ProgressReporter, format_progress, human_bytes

from veloc_backend import executor as executor_mod
from veloc_backend.journal import Journal
from veloc_backend import workqueue as wq
MiB = 1 << 20


class SlowExecutor:
    """Runs each batch in ``delay`` seconds; sizes items that carry no ``nbytes``."""

    def __init__(self, delay, gate=None):
        self.delay, self.gate = delay, gate

    def item_bytes(self, item):
        return 3 * MiB if item.get("kind") == "CHECKPOINT" else 0

    def run(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        return {}


class SlowEngineExecutor:
    """The backend's own engine executor (real ``item_bytes``), each batch 1.5 s late;
    loaded in a backend with ``--executor test_drain_progress:SlowEngineExecutor``."""

    def __init__(self, config, node, logger):
        self.inner = executor_mod.EngineExecutor(config, node, logger)
        self.item_bytes = self.inner.item_bytes

    def run(self, batch):
        time.sleep(1.5)
        return self.inner.run(batch)


def item(version, **extra):
    return {"kind": "CHECKPOINT", "name": "p", "version": version, "rank": 0,
            "group": f"p/v{version}", "group_size": 1, "order": "engine", **extra}


@pytest.mark.timeout(30)
def test_queue_progress_counts_versions_bytes_and_rate(tmp_path):
    gate = threading.Event()
    queue = wq.WorkQueue(Journal(tmp_path / "j"), SlowExecutor(0.2, gate)).start()
    try:
        queue.submit(item(1, nbytes=MiB))
        queue.submit(item(2))                       # sized by the executor: 3 MiB
        queue.submit(item(3, nbytes=2 * MiB))
        queue.submit({"kind": "AVAILABLE", "name": "p", "rank": 0, "group": "q", "order": "engine"})
        first = queue.progress()
        assert first == {"groups": 4, "versions": 3, "bytes": 6 * MiB, "rate": 0.0}
        gate.set()
        deadline = time.monotonic() + 10
        while queue.progress()["versions"] > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        now = queue.progress()
        assert now["versions"] <= 1 and now["bytes"] <= 2 * MiB and now["rate"] > 0
        assert queue.drain(10)
        done = queue.progress()
        assert (done["groups"], done["versions"], done["bytes"]) == (0, 0, 0)
        assert queue.status()["progress"]["groups"] == 0
    finally:
        queue.stop(5)


def test_format_and_reporter(capsys, monkeypatch):
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"
    line = format_progress({"groups": 2, "versions": 2, "bytes": 4 * MiB, "rate": MiB}, 12.3, "pending: ")
    assert line == "pending: 2 version(s) pending (2 work item(s)), 4.0 MiB to go, 1.0 MiB/s, about 4 s " \
                   "left; waited 12 s"
    assert "no bytes finished" in format_progress({"versions": 1, "bytes": 5}, 1)
    clock = [100.0]
    monkeypatch.setattr("veloc.progress.time.monotonic", lambda: clock[0])
    lines = []
    rep = ProgressReporter(every=5, emit=lines.append)
    assert not rep.update({"versions": 1})                   # too early
    clock[0] = 105.5
    assert rep.update({"versions": 1, "bytes": 10}) and len(lines) == 1
    clock[0] = 107
    assert not rep.update({"versions": 1})                   # next one 5 s later
    clock[0] = 111
    assert rep.update({"versions": 1}) and "waited 11 s" in lines[-1]
    quiet = ProgressReporter(every=1, logger=logging.getLogger("veloc.test.quiet"))
    clock[0] = 200
    quiet.update({"versions": 3, "bytes": 1})
    assert "veloc: 3 version(s) pending" in capsys.readouterr().err   # no log handler: stderr


@pytest.mark.timeout(90)
def test_veloc_drain_prints_progress_on_a_slow_drain(dirs, capsys, monkeypatch):
    from test_backend_lifecycle import Job
    import tempfile
    import shutil
    from pathlib import Path
    runtime = Path(tempfile.mkdtemp(prefix="vrt-", dir="/tmp"))
    job = Job(dirs["base"], runtime)
    job.env["VELOC_TEST_DELAY"] = "0.7"
    try:
        job.ensure()
        with job.conn() as c:
            for version in (1, 2, 3):
                c.request({"op": "submit", "item": item(version, nbytes=4 * MiB)})
        for key in ("VELOC_NODE_ID", "VELOC_RUNTIME_DIR"):
            monkeypatch.setenv(key, job.env[key])
        code = main(["drain", str(job.cfg), "--progress", "0.4"])
        out = capsys.readouterr().out
        assert code == 0 and out.strip().endswith("drained"), out
        lines = [line for line in out.splitlines() if line.startswith("pending: ")]
        assert lines, out
        assert "version(s) pending" in lines[0] and "MiB to go" in lines[0] and "waited" in lines[0]
        assert any("MiB/s" in line for line in lines), out
        assert main(["drain", str(job.cfg), "--progress", "0"]) == 2
        assert "expected a number of seconds > 0" in capsys.readouterr().err
    finally:
        job.cleanup()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.timeout(90)
def test_checkpoint_wait_reports_progress_in_async_mode(dirs, monkeypatch, caplog):
    """An application rank (async, ``init_single``) waiting on a slow backend logs progress."""
    import shutil
    import tempfile
    from pathlib import Path

    import numpy as np

    import veloc
    from test_backend_lifecycle import Job
    runtime = Path(tempfile.mkdtemp(prefix="vrt-", dir="/tmp"))
    job = Job(dirs["base"], runtime)
    from veloc_backend import lifecycle
    try:                                               # the node's backend: a slow engine
        ep = lifecycle.ensure_backend(job.cfg, job.env, timeout=30, extra_args=(
            "--executor", "test_drain_progress:SlowEngineExecutor", "--idle-exit", "60"))
        job.pids.add(lifecycle.read_pid(ep))
        for key in ("VELOC_NODE_ID", "VELOC_RUNTIME_DIR"):
            monkeypatch.setenv(key, job.env[key])
        monkeypatch.setattr("veloc.hosts.async_host.WAIT_SHARE", 0.04)   # 0.2 s waits with the 5 s heartbeat
        monkeypatch.setattr("veloc.progress.EVERY", 0.5)
        caplog.set_level(logging.INFO, logger="veloc")
        client = veloc.init_single(0, str(job.cfg))
        client.protect("a", np.zeros(MiB // 8))
        client.checkpoint("pw", 1)
        client.checkpoint_wait()
        client.finalize()
        # (the first checkpoint's lineage query waits too: "0 version(s) ... (1 work item(s))")
        lines = [r.getMessage() for r in caplog.records
                 if "node n0: waiting for the backend: 1 version(s) pending" in r.getMessage()]
        assert lines, [r.getMessage() for r in caplog.records]
        assert "1.0 MiB to go" in lines[0], lines      # the rank file: 1 MiB of data + header
    finally:
        job.cleanup()
        shutil.rmtree(runtime, ignore_errors=True)
