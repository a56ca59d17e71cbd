"""Runs tests/mpi/snapshot_cases.py under real mpiexec with 2 and 4 ranks, sync and async mode."""
import shutil
import tempfile

import pytest

from conftest import REPO, run_mpi

CASES = REPO / "tests" / "mpi" / "snapshot_cases.py"


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nodes", [["n0", "n1"], ["n0", "n0", "n1", "n1"]], ids=["np2", "np4"])
def test_snapshot_cases(nodes):
    runtime = tempfile.mkdtemp(prefix="vsnap-", dir="/tmp")     # this run's backend sockets
    try:
        proc = run_mpi(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CASES)],
                       nodes=nodes, timeout=240, check=False,
                       env={"VELOC_MPI_CASES": "1", "VELOC_RUNTIME_DIR": runtime})
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
