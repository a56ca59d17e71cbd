"""Runs tests/mpi/mpi_cases.py under real mpiexec with 2 and 4 ranks (mpi4py-style, size-agnostic)."""
import pytest

from conftest import REPO, run_mpi

CASES = REPO / "tests" / "mpi" / "mpi_cases.py"


@pytest.mark.mpi
@pytest.mark.parametrize("nodes", [["n0", "n1"], ["n0", "n0", "n1", "n1"]], ids=["np2", "np4"])
def test_collective_cases(nodes):
    proc = run_mpi(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CASES)],
                   nodes=nodes, timeout=240, check=False,
                   env={"VELOC_MPI_CASES": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
