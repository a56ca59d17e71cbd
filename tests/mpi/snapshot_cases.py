"""Size-agnostic two-phase snapshot cases; run under mpiexec by test_snapshot_under_mpiexec.py.

Every rank runs this pytest module; each test is collective over COMM_WORLD. The
application keeps calling its own collectives on COMM_WORLD while persists (with their
own collectives on veloc's private communicator) run in the background.
"""
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
from mpi4py import MPI

import veloc
from veloc.errors import CheckpointError

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
N = 1 << 18


@pytest.fixture(params=["sync", "async"])
def cfg(request):
    base = comm.bcast(tempfile.mkdtemp(prefix="veloc-snap-", dir="/dev/shm") if rank == 0 else None)
    pers = comm.bcast(tempfile.mkdtemp(prefix="veloc-snap-p-") if rank == 0 else None)
    config = {"scratch": base + "/{node}", "persistent": pers, "mode": request.param,
              "snapshot": {"max_in_flight": 2}}
    yield config
    comm.Barrier()
    if rank == 0:
        if request.param == "async":
            from veloc_backend import control
            for ep, _ in control.job_backends(config):
                control.shutdown(ep, drain_first=False)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(pers, ignore_errors=True)
    comm.Barrier()


def data(version):
    return np.arange(N, dtype=np.float64) * (rank + 1) + version


def check_versions(cfg, versions):
    for v in versions:
        with veloc.init(cfg, comm) as c:
            a = np.zeros(N)
            c.protect("a", a)
            assert c.restart_test("s", v) == v
            c.restart("s", v)
            assert np.array_equal(a, data(v)), f"rank {rank}: v{v} is torn or stale"


def test_snapshots_overlap_application_collectives(cfg):
    with veloc.init(cfg, comm) as c:
        # Background persists need MPI_THREAD_MULTIPLE (mpi4py's default); the driver also
        # runs these cases at "serialized", where they are persisted on the main thread.
        multiple = os.environ.get("MPI4PY_RC_THREAD_LEVEL", "multiple") == "multiple"
        assert c.snapshot_stats["background"] is multiple
        assert c.comm != comm and c.app_comm is comm
        a = np.zeros(N)
        c.protect("a", a)
        for v in range(1, 6):
            a[:] = data(v)
            c.snapshot("s", v)
            # The application's own collectives while copies and persists run behind it.
            total = 0
            for i in range(20):
                total += comm.allreduce(i + rank, op=MPI.SUM)
            assert total == sum(size * i + size * (size - 1) // 2 for i in range(20))
            comm.Barrier()
            with c.guard():
                a[:] = -1.0                            # the update right after the guard
            time.sleep(0.002 * ((rank + v) % 3))       # ranks drift apart
        c.checkpoint_wait()
        assert c.checkpoint_finished()
    check_versions(cfg, [1, 3, 5])


def test_failure_on_one_rank_is_raised_on_every_rank(cfg):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("refuses to pickle")
    with veloc.init(cfg, comm) as c:
        a = np.zeros(N)
        c.protect("a", a)
        if rank == size - 1:
            c.protect("bad", Unpicklable(), pickle=True)
        a[:] = data(1)
        c.snapshot("s", 1)
        c.wait_snapshot()
        with pytest.raises(CheckpointError):
            c.checkpoint_wait()
        c.unprotect("a")
        c.protect("a", a)
        if rank == size - 1:
            c.unprotect("bad")
        a[:] = data(2)
        c.snapshot("s", 2)
        c.checkpoint_wait()
        assert c.restart_test("s", 1) is None          # v1 was discarded everywhere
    check_versions(cfg, [2])


def test_one_call_checkpoint_after_snapshots(cfg):
    with veloc.init(cfg, comm) as c:
        a = np.zeros(N)
        c.protect("a", a)
        a[:] = data(1)
        c.snapshot("s", 1)
        c.wait_snapshot()
        a[:] = data(2)
        c.checkpoint("s", 2)           # waits for v1's persist, then runs in the foreground
    check_versions(cfg, [1, 2])

