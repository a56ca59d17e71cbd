"""Runs the size-agnostic collective case files under real mpiexec (mpi4py-style):
tests/mpi/mpi_cases.py with 2 and 4 ranks, tests/mpi/trust_cases.py with 2 and 4 ranks
on 2 virtual nodes and with 4 ranks on 4 (erasure coding needs three or more nodes)."""
import pytest

from conftest import REPO, run_mpi

TWO_NODES = {"np2": ["n0", "n1"], "np4": ["n0", "n0", "n1", "n1"]}
FOUR_NODES = {"np4-4nodes": ["n0", "n1", "n2", "n3"]}


def run_cases(case_file, nodes):
    proc = run_mpi(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(REPO / "tests" / "mpi" / case_file)],
                   nodes=nodes, timeout=240, check=False, env={"VELOC_MPI_CASES": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("nodes", list(TWO_NODES.values()), ids=list(TWO_NODES))
def test_collective_cases(nodes):
    run_cases("mpi_cases.py", nodes)


@pytest.mark.mpi
@pytest.mark.parametrize("nodes", list({**TWO_NODES, **FOUR_NODES}.values()), ids=list({**TWO_NODES, **FOUR_NODES}))
def test_trust_cases(nodes):
    run_cases("trust_cases.py", nodes)
