"""End to end: ``examples/heat.py`` with ``[flush] format = hdf5``.

Real ``mpiexec`` runs crash the heat example after iteration ``FAIL_AT``, lose every
node's scratch, and restart from the HDF5 copies at persistent: on the same rank count
(sync and async mode), and on another one (4 -> 3, 4 -> 2, 2 -> 4 ranks), reading each
new rank's rows through ``global.h5``'s virtual dataset. Every restarted run must end
bit-for-bit equal to an uninterrupted run (the Jacobi result does not depend on the
decomposition). A job whose regions are not all global or replicated is refused on
another rank count, with the region named.

With ``[compress] enabled = true`` the rank files' datasets are chunked and deflated
(HDF5's own filter): the same runs restart bit-for-bit from them, on 4 and on 2 ranks.

Layout relied on (veloc/storage/hdf5_format.py): ``{persistent}/heat/v{V}/r{rank}.h5``,
the nodes' ``n<first>-<last>.commit.json`` records and ``global.h5``.
"""
import os
import re
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, kill_job_backends, persistent_ranks, run_mpi

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.e2e

HEAT = REPO / "examples" / "heat.py"
STEPS, EVERY, FAIL_AT = 40, 10, 30
GRID = ["--rows", 50, "--cols", 40, "--steps", STEPS, "--every", EVERY]
RESTART_LINE = re.compile(r"^veloc: restarted from version (\d+) \(levels: ([^)]*)\)$", re.M)
TIMEOUT = 60


def write_config(dirs, mode="sync", compress=False):
    path = dirs["tmp"] / "hdf5.ini"
    path.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n"
                    f"mode = {mode}\n[flush]\nformat = hdf5\n"
                    + ("[compress]\nenabled = true\n" if compress else ""))
    return path


def nodes_for(nranks):
    """Two ranks per virtual node."""
    return [f"n{rank // 2}" for rank in range(nranks)]


def heat(cfg, nranks, *args, env=None, check=True):
    return run_mpi([HEAT, *GRID, "--config", cfg, *args], nodes=nodes_for(nranks), env=env, check=check,
                   timeout=TIMEOUT)


def crash(cfg, nranks, env=None):
    proc = heat(cfg, nranks, "--fail-at", FAIL_AT, "--fail-rank", nranks - 1, env=env, check=False)
    assert proc.returncode != 0 and f"failing after iteration {FAIL_AT}" in proc.stderr, proc.stderr


def restart(cfg, nranks, out, env=None):
    proc = heat(cfg, nranks, "--out", out, env=env)
    match = RESTART_LINE.search(proc.stdout)
    assert match, f"no restart line in:\n{proc.stdout}\n{proc.stderr}"
    assert f"heat: done at iteration {STEPS} " in proc.stdout, proc.stdout
    return int(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "reference.npy"
    run_mpi([HEAT, *GRID, "--no-checkpoint", "--out", out], n=3, timeout=TIMEOUT)
    return out


def assert_bit_exact(out, reference):
    got, want = np.load(out), np.load(reference)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), f"max diff {np.abs(got - want).max()}"


def check_files(dirs, version, nranks):
    """The version's files at persistent, read with plain h5py."""
    vdir = dirs["persistent"] / "heat" / f"v{version}"
    names = sorted(p.name for p in vdir.iterdir())
    assert names == sorted(["global.h5"] + [f"r{r}.h5" for r in range(nranks)]
                           + [p.name for p in vdir.glob("n*.commit.json")]), names
    assert persistent_ranks(vdir) == list(range(nranks))
    with h5py.File(vdir / "global.h5", "r") as f:
        assert f["grid"].is_virtual and f["grid"].shape == (50, 40)
        grid = f["grid"][()]
        assert f["it"][()].tolist() == [version]
    assert np.all(grid[0] == 100.0) and np.all(grid[-1] == 0.0) and grid[1:-1, 1:-1].max() > 0
    with h5py.File(vdir / "r0.h5", "r") as f:
        assert np.array_equal(f["grid"][()], grid[:f["grid"].shape[0]])


@pytest.mark.timeout(120)
def test_sync_restart_from_hdf5_after_losing_all_scratch(dirs, reference):
    cfg = write_config(dirs)
    crash(cfg, 4)
    check_files(dirs, FAIL_AT, 4)
    shutil.rmtree(dirs["scratch"])
    out = dirs["tmp"] / "out.npy"
    assert restart(cfg, 4, out) == (FAIL_AT, "persistent=4")
    assert_bit_exact(out, reference)


@pytest.fixture
def async_env(dirs):
    runtime = Path(tempfile.mkdtemp(prefix="vh5-", dir="/tmp"))
    env = {"VELOC_RUNTIME_DIR": str(runtime)}
    cfg = write_config(dirs, mode="async")
    yield cfg, env
    kill_job_backends(cfg, dict(os.environ, **env))
    shutil.rmtree(runtime, ignore_errors=True)


def wait_then_stop_backends(dirs, cfg, env):
    """Wait until the backends, alone after the crash, completed the version at persistent
    (global.h5 exists), then stop them as a lost job's would be."""
    target = dirs["persistent"] / "heat" / f"v{FAIL_AT}" / "global.h5"
    deadline = time.monotonic() + 30
    while not target.exists():
        assert time.monotonic() < deadline, "the backends did not complete the version at persistent"
        time.sleep(0.1)
    kill_job_backends(cfg, dict(os.environ, **env))


@pytest.mark.timeout(120)
def test_async_restart_from_hdf5_after_losing_all_scratch(dirs, reference, async_env):
    """The node backends flush in the background and each writes global.h5 once it sees
    every rank's copy; after the crash they finish alone."""
    cfg, env = async_env
    crash(cfg, 4, env=env)
    wait_then_stop_backends(dirs, cfg, env)
    check_files(dirs, FAIL_AT, 4)
    shutil.rmtree(dirs["scratch"])
    out = dirs["tmp"] / "out.npy"
    assert restart(cfg, 4, out, env=env) == (FAIL_AT, "persistent=4")
    assert_bit_exact(out, reference)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("before,after", [(4, 3), (4, 2), (2, 4)])
def test_restart_on_another_rank_count(dirs, reference, before, after):
    cfg = write_config(dirs)
    crash(cfg, before)
    shutil.rmtree(dirs["scratch"])
    out = dirs["tmp"] / "out.npy"
    assert restart(cfg, after, out) == (FAIL_AT, f"persistent={after}")
    assert_bit_exact(out, reference)


LOCAL_APP = textwrap.dedent("""
    import sys, numpy as np, veloc
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rows = 12
    lo = comm.rank * rows // comm.size
    hi = (comm.rank + 1) * rows // comm.size
    grid = np.full((hi - lo, 4), float(comm.rank))
    own = np.full(3, comm.rank)
    with veloc.init(sys.argv[1], comm) as ck:
        ck.protect("grid", grid, global_shape=(rows, 4), offset=(lo, 0))
        ck.protect("own", own)
        if sys.argv[2] == "write":
            ck.checkpoint("loc", 1)
        else:
            print(f"rank {comm.rank} restart_test {ck.restart_test('loc')}", flush=True)
            try:
                ck.restart("loc", 1)
            except veloc.RestartError as exc:
                print(f"rank {comm.rank} RestartError {exc}", flush=True)
""")


@pytest.mark.timeout(60)
def test_non_global_region_is_refused_on_another_rank_count(dirs):
    cfg = write_config(dirs)
    app = dirs["tmp"] / "local_app.py"
    app.write_text(LOCAL_APP)
    run_mpi([app, cfg, "write"], n=2, timeout=TIMEOUT)
    shutil.rmtree(dirs["scratch"])
    proc = run_mpi([app, cfg, "read"], n=3, timeout=TIMEOUT)
    for rank in range(3):     # (the ranks' lines may interleave on the shared stdout)
        assert f"rank {rank} restart_test None" in proc.stdout, proc.stdout
        assert f"rank {rank} RestartError cannot restart 'loc' v1" in proc.stdout, proc.stdout
    assert proc.stdout.count("region 'own' of loc v1 (written by 2 ranks, restarting on 3) cannot be "
                             "redistributed") == 3, proc.stdout
    assert "region 'own'" in proc.stderr and "not restorable on this job's 3 ranks" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_async_restart_on_another_rank_count(dirs, reference, async_env):
    """Async mode, 4 -> 2 ranks: the backends wrote global.h5 in the background."""
    cfg, env = async_env
    crash(cfg, 4, env=env)
    wait_then_stop_backends(dirs, cfg, env)
    shutil.rmtree(dirs["scratch"])
    out = dirs["tmp"] / "out.npy"
    assert restart(cfg, 2, out, env=env) == (FAIL_AT, "persistent=2")
    assert_bit_exact(out, reference)


REPLICATED_APP = textwrap.dedent("""
    import sys, numpy as np, veloc
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    it = np.zeros(2, np.int64)
    state = {}
    with veloc.init(sys.argv[1], comm) as ck:
        ck.protect("it", it, replicated=True)
        ck.protect("state", state, pickle=True, replicated=True)
        if sys.argv[2] == "write":
            it[:] = [7, 8]
            state.update(lr=0.5, name="run")
            ck.checkpoint("rep", 3)
        else:
            v = ck.restart_test("rep")
            ck.restart("rep", v)
            print(f"rank {comm.rank} v{v} it={it.tolist()} state={sorted(state.items())}", flush=True)
""")


@pytest.mark.timeout(60)
def test_replicated_regions_come_from_any_intact_copy(dirs):
    """Rank 0's file is corrupt: a job of another size reads the replicated regions from
    the next intact rank file (global.h5 points at rank 0's copy)."""
    from conftest import flip_bytes
    cfg = write_config(dirs)
    app = dirs["tmp"] / "rep_app.py"
    app.write_text(REPLICATED_APP)
    run_mpi([app, cfg, "write"], n=2, timeout=TIMEOUT)
    shutil.rmtree(dirs["scratch"])
    flip_bytes(dirs["persistent"] / "rep" / "v3" / "r0.h5")
    proc = run_mpi([app, cfg, "read"], n=3, timeout=TIMEOUT)
    for rank in range(3):
        assert f"rank {rank} v3 it=[7, 8] state=[('lr', 0.5), ('name', 'run')]" in proc.stdout, proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [4, 2])
def test_restart_from_compressed_hdf5(dirs, reference, after):
    """[compress] with format = hdf5: the grid is a deflated, chunked dataset (plain h5py
    reads it), no .vcz is written, and the restart (same size and 4 -> 2) is bit-exact."""
    cfg = write_config(dirs, compress=True)
    crash(cfg, 4)
    check_files(dirs, FAIL_AT, 4)
    with h5py.File(dirs["persistent"] / "heat" / f"v{FAIL_AT}" / "r0.h5", "r") as f:
        assert f["grid"].compression == "gzip" and f["grid"].chunks is not None
    assert not list(dirs["scratch"].rglob("*.vcz")) and not list(dirs["persistent"].rglob("*.vcz"))
    shutil.rmtree(dirs["scratch"])
    out = dirs["tmp"] / "out.npy"
    assert restart(cfg, after, out) == (FAIL_AT, f"persistent={after}")
    assert_bit_exact(out, reference)
