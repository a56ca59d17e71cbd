"""Runs tests/mpi/snapshot_cases.py under real mpiexec with 2 and 4 ranks, sync and async mode,
and with MPI initialised at MPI_THREAD_SERIALIZED (persists then run on the main thread)."""
import shutil
import tempfile

import pytest

from conftest import REPO, run_mpi

CASES = REPO / "tests" / "mpi" / "snapshot_cases.py"


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nodes, level", [(["n0", "n1"], "multiple"), (["n0", "n0", "n1", "n1"], "multiple"),
                                          (["n0", "n1"], "serialized")],
                         ids=["np2", "np4", "np2-serialized"])
def test_snapshot_cases(nodes, level):
    runtime = tempfile.mkdtemp(prefix="vsnap-", dir="/tmp")     # this run's backend sockets
    try:
        proc = run_mpi(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CASES)],
                       nodes=nodes, timeout=240, check=False,
                       env={"VELOC_MPI_CASES": "1", "VELOC_RUNTIME_DIR": runtime,
                            "MPI4PY_RC_THREAD_LEVEL": level})
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
