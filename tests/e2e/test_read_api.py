"""End-to-end: a real MPI job writes a global array; the analysis side reads it back.

``tests/e2e/apps/global_app.py`` runs under ``mpiexec`` on 2 (and 4) virtual nodes, one
rank each, in sync mode with partner copies and a persistent level. Then, in this
pytest process (no MPI): ``veloc.open`` stitches the global grid and must equal the
grid the job gathered itself; after one node's scratch is lost the view falls back to
the other levels; ``veloc export`` writes one HDF5 file that plain h5py reads.
"""
import shutil

import numpy as np
import pytest

import veloc
from conftest import REPO, run_mpi
from veloc.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
APP = REPO / "tests" / "e2e" / "apps" / "global_app.py"


def job(dirs, nodes, persistent_interval=0):
    cfg = dirs["tmp"] / "global.ini"
    cfg.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\nmode = sync\n"
                   f"persistent_interval = {persistent_interval}\nscratch_versions = 2\n\n[partner]\nenabled = true\n")
    out = dirs["tmp"] / "gathered.npz"
    run_mpi([APP, "--config", cfg, "--versions", "3", "--out", out], nodes=nodes, timeout=120)
    return cfg, np.load(out)


def test_open_read_global_matches_the_jobs_own_grid_and_export(dirs, capsys):
    cfg, expected = job(dirs, ["n0", "n1"])
    with veloc.open(cfg, "glob") as view:
        assert (view.version, view.level, view.nranks) == (3, "scratch", 2)
        assert view.regions["grid"].is_global and view.regions["grid"].shape == (24, 30)
        assert view.regions["grid"].shapes == {0: (24, 13), 1: (24, 17)}
        assert np.array_equal(view.read_global("grid"), expected["grid"])
        assert np.array_equal(view.read_global("step"), expected["step"])
        for rank in (0, 1):
            assert np.array_equal(view.read("mine", rank), expected[f"mine{rank}"])
    with veloc.open(cfg, "glob", level="partner") as view:
        assert view.level == "partner" and np.array_equal(view.read_global("grid"), expected["grid"])
    with veloc.open(cfg, "glob", version=1, level="persistent") as view:
        assert view.read_global("step").tolist() == [5]

    # node n1 is lost: its scratch (with the partner copy of n0's rank) goes
    shutil.rmtree(dirs["scratch"] / "n1")
    with veloc.open(cfg, "glob") as view:
        assert view.level == "persistent" and np.array_equal(view.read_global("grid"), expected["grid"])
    with pytest.raises(veloc.RestartError, match="ranks 0 have no intact copy"):
        veloc.open(cfg, "glob", level="partner")

    h5py = pytest.importorskip("h5py")
    out = dirs["tmp"] / "glob3.h5"
    assert main(["export", str(cfg), "glob", "3", str(out)]) == 0, capsys.readouterr().err
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["grid"][...], expected["grid"])
        assert f["step"][...].tolist() == expected["step"].tolist()
        assert np.array_equal(f["rank1/mine"][...], expected["mine1"])
        assert (f.attrs["name"], int(f.attrs["version"]), int(f.attrs["nranks"])) == ("glob", 3, 2)


def test_four_ranks_mixed_levels_after_a_node_loss(dirs):
    cfg, expected = job(dirs, ["n0", "n1", "n2", "n3"], persistent_interval=-1)
    shutil.rmtree(dirs["scratch"] / "n2")       # no persistent level written: scratch + partner
    with veloc.open(cfg, "glob") as view:
        assert view.level == "mixed" and view.rank_levels[2] == "partner"
        assert np.array_equal(view.read_global("grid"), expected["grid"])


def test_heat_example_hdf5_copies_read_back_and_export(dirs, capsys):
    """examples/heat.py (grid global, counter replicated) on 2 virtual nodes with the HDF5
    persistent format: read_global from scratch and from the .h5 copies equals the grid the
    job gathered itself."""
    h5py = pytest.importorskip("h5py")
    cfg = dirs["tmp"] / "heat.ini"
    cfg.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\nmode = sync\n"
                   "persistent_interval = 0\n\n[flush]\nformat = hdf5\n")
    out = dirs["tmp"] / "final.npy"
    run_mpi([REPO / "examples" / "heat.py", "--config", cfg, "--rows", "37", "--cols", "23", "--steps", "40",
             "--every", "20", "--out", out], nodes=["n0", "n1"], timeout=120)
    final = np.load(out)
    with veloc.open(cfg, "heat") as view:
        assert (view.version, view.level, view.nranks) == (40, "scratch", 2)
        assert view.regions["grid"].shapes == {0: (19, 23), 1: (18, 23)}
        assert np.array_equal(view.read_global("grid"), final) and view.read_global("it").tolist() == [40]
    with veloc.open(cfg, "heat", level="persistent") as view:
        assert view.files[0].name == "r0.h5" and view.files[1].name == "r1.h5"
        assert np.array_equal(view.read_global("grid"), final)
    with veloc.open(cfg, "heat", version=20, level="persistent") as view:
        assert view.read_global("it").tolist() == [20]
    h5 = dirs["tmp"] / "heat40.h5"
    assert main(["export", str(cfg), "heat", "40", str(h5), "--level", "persistent"]) == 0, capsys.readouterr()
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["grid"][...], final) and f["it"][...].tolist() == [40]
