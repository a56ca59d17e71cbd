"""Two-phase snapshots in one process: ordering, the guard, buffers, in-flight bound, errors.

Run without mpiexec (mpi4py starts as a singleton on COMM_SELF, thread level MULTIPLE).
"""
import threading
import time

import numpy as np
import pytest

import veloc
import veloc.training.snapshot as snapshot_module
from veloc.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.timeout(60)
N = 1 << 20          # 8 MiB of float64


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


def restored(cfg, version, n=N, name="s"):
    with veloc.init_single(0, cfg) as c:
        a, it = np.zeros(n), np.zeros(1, np.int64)
        c.protect("a", a)
        c.protect("it", it)
        assert c.restart_test(name, version) == version
        c.restart_begin(name, version)
        c.recover_mem(["a", "it"] if _has(c, "it") else ["a"])
        c.restart_end()
        return a, int(it[0])


def _has(client, region_id):
    return client._restoring.rankfile.region(region_id) is not None


def test_guard_never_tears_a_snapshot(cfg):
    """The model overwrites its state right after the guard; every persisted version
    holds exactly the state at its snapshot."""
    with veloc.init_single(0, cfg) as c:
        a, it = np.zeros(N), np.zeros(1, np.int64)
        c.protect("a", a)
        c.protect("it", it)
        for v in range(1, 6):
            a[:] = v
            it[0] = v
            c.snapshot("s", v)
            with c.guard():
                a[:] = -1.0                    # the "optimizer step"
                it[0] = -1
        c.checkpoint_wait()
        assert c.checkpoint_finished() and c.snapshot_stats["persists"] == 5
    for v in range(1, 6):
        a, it = restored(cfg, v)
        assert it == v and (a == v).all()


def test_persists_run_in_snapshot_order_and_overlap_the_caller(cfg, monkeypatch):
    order = []
    with veloc.init_single(0, cfg | {"snapshot": {"max_in_flight": 3}}) as c:
        real = c.host.checkpoint

        def slow_checkpoint(name, version):
            time.sleep(0.2)
            order.append(version)
            real(name, version)
        monkeypatch.setattr(c.host, "checkpoint", slow_checkpoint)
        a = np.zeros(1000)
        c.protect("a", a)
        start = time.perf_counter()
        for v in (4, 2, 9, 1):
            a[:] = v
            c.snapshot("s", v)
            c.wait_snapshot()
        returned = time.perf_counter() - start
        assert not c.checkpoint_finished()         # persists still in flight
        c.checkpoint_wait()
        assert order == [4, 2, 9, 1]
        assert returned < 0.6      # only the 4th waited (for one persist); in sequence: >= 0.8 s
        assert c.restart_test("s") == 9


def test_max_in_flight_bounds_outstanding_and_buffers_are_reused(cfg, monkeypatch):
    running, peak = [0], [0]
    lock = threading.Lock()
    with veloc.init_single(0, cfg | {"snapshot": {"max_in_flight": 2}}) as c:
        real = c._write_regions

        def tracked(pending, snaps):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], len(c._jobs))
            time.sleep(0.02)
            real(pending, snaps)
            with lock:
                running[0] -= 1
        monkeypatch.setattr(c, "_write_regions", tracked)
        a = np.zeros(N)
        c.protect("a", a)
        buffers_seen = set()
        for v in range(1, 8):
            a[:] = v
            c.snapshot("s", v)
            assert len(c._jobs) <= 2
            buffers_seen.add(id(c._jobs[-1].buffer))
            first_host = c._jobs[-1].buffer.host
            c.wait_snapshot()
            assert c._jobs[-1].buffer.host is first_host
        c.checkpoint_wait()
        assert peak[0] <= 2 and len(buffers_seen) == 2
        assert c.snapshot_stats["allocations"] == 2          # one host arena per buffer, ever
    a, it = restored(cfg, 7)
    assert (a == 7).all()


def test_second_snapshot_allocates_nothing(cfg):
    with veloc.init_single(0, cfg) as c:
        a = np.ones(N)
        c.protect("a", a)
        c.snapshot("s", 1)
        assert c.snapshot_stats["allocations"] == 1
        c.snapshot("s", 2)
        c.snapshot("s", 3)
        assert c.snapshot_stats["allocations"] == 1
        c.protect("b", np.ones(2 * N))           # the state grew: the buffer grows once
        c.snapshot("s", 4)
        c.snapshot("s", 5)
        assert c.snapshot_stats["allocations"] == 2


def test_persist_error_is_raised_at_the_next_wait_point_and_discards_the_version(cfg, monkeypatch):
    with veloc.init_single(0, cfg | {"snapshot": {"max_in_flight": 2}}) as c:
        real = c._write_regions
        calls = [0]

        def failing(pending, snaps):
            calls[0] += 1
            if calls[0] == 2:
                raise CheckpointError("rank 0: injected write failure")
            real(pending, snaps)
        monkeypatch.setattr(c, "_write_regions", failing)
        a = np.zeros(1000)
        c.protect("a", a)
        c.snapshot("s", 1)
        c.snapshot("s", 2)
        c.wait_snapshot()                          # staging is fine: nothing raised here
        with pytest.raises(CheckpointError, match="injected write failure"):
            c.checkpoint_wait()
        c.checkpoint_wait()                        # raised once, then cleared
        c.snapshot("s", 3)
        c.checkpoint_wait()
        assert c.restart_test("s", 2) == 1         # v2 was discarded, v1 and v3 are there
        assert c.restart_test("s") == 3


def test_persist_error_raised_by_the_snapshot_that_reuses_the_buffer(cfg, monkeypatch):
    with veloc.init_single(0, cfg) as c:
        monkeypatch.setattr(c, "_write_regions", lambda pending, snaps: (_ for _ in ()).throw(
            CheckpointError("rank 0: disk full (injected)")))
        c.protect("a", np.zeros(10))
        c.snapshot("s", 1)
        with pytest.raises(CheckpointError, match="disk full"):
            c.snapshot("s", 2)
        monkeypatch.undo()


def test_staging_failure_surfaces_later_and_keeps_the_client_usable(cfg):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.zeros(10))
        c.protect("bad", Unpicklable(), pickle=True)
        c.snapshot("s", 1)
        c.wait_snapshot()
        with pytest.raises(CheckpointError, match="cannot pickle"):
            c.checkpoint_wait()
        c.unprotect("bad")
        c.snapshot("s", 2)
        c.checkpoint_wait()
        assert c.restart_test("s") == 2 and c.restart_test("s", 1) is None


def test_foreground_persist_when_mpi_is_not_thread_multiple(cfg, monkeypatch):
    monkeypatch.setattr(snapshot_module, "background_persist_allowed", lambda: False)
    with veloc.init_single(0, cfg) as c:
        assert c.snapshot_stats["background"] is False
        a = np.zeros(N)
        c.protect("a", a)
        a[:] = 1
        c.snapshot("s", 1)
        with c.guard():
            a[:] = -1
        assert not any(t.name.startswith("veloc-persist") for t in threading.enumerate())
        assert c.snapshot_stats["persists"] == 0      # nothing persisted behind the caller's back
        a[:] = 2
        c.snapshot("s", 2)                             # persists v1 first, on this thread
        assert c.snapshot_stats["persists"] == 1
    a, _ = restored(cfg, 1)
    assert (a == 1).all()
    a, _ = restored(cfg, 2)                            # finalize persisted v2
    assert (a == 2).all()


def test_checkpoint_and_snapshot_interleave(cfg):
    with veloc.init_single(0, cfg) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        a[:] = 1
        c.snapshot("s", 1)
        a[:] = 1              # unchanged state: no guard needed for the check below
        c.checkpoint("s", 2)  # waits for the snapshot's persist first
        assert c.checkpoint_finished()
        assert c.restart_test("s") == 2 and c.restart_test("s", 1) == 1


def test_bad_input(cfg):
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.zeros(10))
        with pytest.raises(CheckpointError, match="invalid checkpoint name"):
            c.snapshot("../x", 1)
        with pytest.raises(CheckpointError, match="non-negative int"):
            c.snapshot("s", -1)
        c.checkpoint_begin("s", 1)
        with pytest.raises(CheckpointError, match="checkpoint_end first"):
            c.snapshot("s", 2)
        c.checkpoint_mem()
        c.checkpoint_end()
        c.wait_snapshot()            # nothing pending: returns at once
    with pytest.raises(CheckpointError, match="finalized"):
        c.snapshot("s", 3)
    for bad in ({"max_in_flight": 0}, {"device_staging": "gpu"}, {"depth": 2}):
        with pytest.raises(ConfigError, match="max_in_flight|device_staging|depth"):
            veloc.load_config(cfg | {"snapshot": bad})


def test_finalize_waits_for_persists(cfg):
    c = veloc.init_single(0, cfg)
    a = np.full(N, 3.0)
    c.protect("a", a)
    c.snapshot("s", 3)
    c.finalize()
    assert not any(t.name.startswith("veloc-") and t.is_alive() for t in threading.enumerate())
    a, _ = restored(cfg, 3)
    assert (a == 3).all()
