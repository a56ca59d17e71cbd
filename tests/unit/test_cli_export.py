"""``veloc export``: one version into one HDF5 file read back with plain h5py; the file is
committed atomically with mode 0600; bad input is one clear line and exit status 2."""
import stat

import numpy as np
import pytest

from test_reader import GRID, node_root, pickled, region, write_copy, write_heat
from veloc.cli import main
from veloc.cli.export import export_version

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ini(dirs):
    path = dirs["tmp"] / "veloc.ini"
    path.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_global_replicated_and_per_rank(dirs, ini, capsys):
    write_heat(dirs, version=5)
    write_heat(dirs, version=5, level="persistent")
    out = dirs["tmp"] / "heat5.h5"
    code, text, err = run(capsys, "export", ini, "heat", 5, out, "--level", "persistent")
    assert code == 0, err
    assert "exported heat v5 (4 ranks, level persistent, 3 region(s)" in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with h5py.File(out, "r") as f:
        assert (f.attrs["name"], f.attrs["version"], f.attrs["nranks"], f.attrs["level"]) == ("heat", 5, 4,
                                                                                              "persistent")
        assert np.array_equal(f["grid"][...], GRID + 5) and f["grid"].attrs["kind"] == "global"
        assert f["grid"].attrs["dtype"] == "<f8" and f["grid"].attrs["region_id"] == "grid"
        assert f["1"][...].tolist() == [5] and f["1"].attrs["kind"] == "replicated"
        assert f["1"].attrs["region_id"] == 1 and f["1"].attrs["region_id_type"] == "int"
        assert sorted(f) == ["1", "grid", "rank0", "rank1", "rank2", "rank3"]
        assert f["rank2/local"][...].tolist() == [2, 2, 2] and f["rank2/local"].attrs["rank"] == 2
    # an existing file is kept unless --force
    code, _, err = run(capsys, "export", ini, "heat", 5, out)
    assert code == 2 and "exists: pass --force" in err
    code, _, err = run(capsys, "export", ini, "heat", 5, out, "--force", "--progress", "1e-9")
    assert code == 0 and "veloc export: " in err and " of 528 B (100 %)" in err and "B/s" in err
    code, _, err = run(capsys, "export", ini, "heat", 5, out, "--force", "--progress", "0")
    assert code == 2 and "expected a number of seconds > 0" in err


def test_export_pickle_regions_only_when_allowed(dirs, ini, capsys):
    write_copy(node_root(dirs), "obj", 2, 0, 1, [pickled("meta", {"a": 1}), region("x", np.arange(3))])
    out = dirs["tmp"] / "o.h5"
    code, text, err = run(capsys, "export", ini, "obj", 2, out)
    assert code == 0, err
    assert "skipped pickled region 'meta' (use --allow-pickle" in text
    with h5py.File(out, "r") as f:
        assert list(f["rank0"]) == ["x"]
    assert run(capsys, "export", ini, "obj", 2, out, "--allow-pickle", "--force")[0] == 0
    with h5py.File(out, "r") as f:
        import pickle
        assert f["rank0/meta"].attrs["kind"] == "pickle"
        assert pickle.loads(f["rank0/meta"][...].tobytes()) == {"a": 1}


def test_export_errors(dirs, ini, capsys):
    write_heat(dirs, version=1, skip={3})
    out = dirs["tmp"] / "x.h5"
    code, _, err = run(capsys, "export", ini, "heat", 1, out)
    assert code == 2 and "ranks 3 have no intact copy" in err and not out.exists()
    code, _, err = run(capsys, "export", ini, "heat", 9, out)
    assert code == 2 and "no copy of heat v9 at any level; versions found: 1" in err
    code, _, err = run(capsys, "export", ini, "../h", 1, out)
    assert code == 2 and "invalid checkpoint name" in err
    code, _, err = run(capsys, "export", ini, "heat", "-1", out)
    assert code == 2
    code, _, err = run(capsys, "export", ini, "heat", 1, dirs["tmp"] / "no" / "x.h5")
    assert code == 2


def test_export_failure_leaves_nothing(dirs, monkeypatch):
    import veloc
    write_heat(dirs, version=1)
    out = dirs["tmp"] / "fail.h5"
    with veloc.open({"scratch": f"{dirs['scratch']}/{{node}}"}, "heat") as view:
        def boom(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr("veloc.cli.export.write_export", boom)
        with pytest.raises(OSError):
            export_version(view, out)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_without_h5py_says_how_to_install(dirs, ini, capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("no h5py")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_h5py)
    code, _, err = run(capsys, "export", ini, "heat", 1, dirs["tmp"] / "x.h5")
    assert code == 2 and "pip install 'veloc[hdf5]'" in err



def test_export_dtypes_hdf5_lacks_are_stored_as_bytes(dirs, ini, capsys):
    stamps = np.array(["2024-01-01T00:00:00", "2025-06-30T12:00:00"], dtype="datetime64[s]")
    pairs = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    pairs["b"] = [0.5, 1.5, 2.5]
    write_copy(node_root(dirs), "dt", 1, 0, 1, [region("t", stamps, (2,), (0,)), region("p", pairs, replicated=True),
                                                region("c", np.array([1 + 2j]), None)])
    out = dirs["tmp"] / "dt.h5"
    code, _, err = run(capsys, "export", ini, "dt", 1, out)
    assert code == 0, err
    with h5py.File(out, "r") as f:
        assert f["t"].attrs["storage"] == "bytes" and f["t"].shape == (2, 8)
        assert np.array_equal(f["t"][...].view("<M8[s]").reshape(2), stamps)
        assert f["p"].attrs["storage"] == "typed" and f["p"]["b"].tolist() == [0.5, 1.5, 2.5]
        assert f["rank0/c"][...].tolist() == [1 + 2j]
