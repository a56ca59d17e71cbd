"""The HDF5 persistent format: files checked with plain h5py, virtual datasets, config.

Rank files are built with the rank-file writer, converted by ``write_rank_h5`` and read
back both with plain h5py (what an analysis tool sees) and with veloc's readers.
"""
import json
import os
import shutil
import stat
import sys

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import veloc  # noqa: E402
from conftest import flip_bytes  # noqa: E402
from veloc.config import load_config  # noqa: E402
from veloc.storage.formats import make_writer, open_rank_file, version_complete  # noqa: E402
from veloc.storage.hashing import digest_file  # noqa: E402
from veloc.storage.hdf5_format import GlobalFile, Hdf5RankFile, write_global, write_rank_h5  # noqa: E402
from veloc.storage.rankfile import RankFile, build_header, dtype_descr, write_rank_file  # noqa: E402
from veloc.errors import ConfigError, CorruptCheckpointError  # noqa: E402


def rank_file(path, arrays, rank=0, layouts=None, name="x", version=1):
    """Write a .vck rank file holding ``arrays`` ({id: ndarray or bytes}); return its path."""
    layouts = layouts or {}
    regions, views = [], []
    for rid, value in arrays.items():
        if isinstance(value, bytes):
            regions.append({"id": rid, "kind": "pickle", "dtype": "", "shape": [], "order": "C",
                            "nbytes": len(value)})
            views.append(value)
            continue
        order = "C" if value.flags.c_contiguous else "F"
        regions.append({"id": rid, "kind": "array", "dtype": dtype_descr(value.dtype), "shape": list(value.shape),
                        "order": order, "nbytes": value.nbytes, **layouts.get(rid, {})})
        views.append(value.reshape(-1, order=order).view(np.uint8) if value.size else np.empty(0, np.uint8))
    header, infos, total = build_header(name, version, rank, regions)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_rank_file(fd, header, infos, views, total)
    finally:
        os.close(fd)
    return path


def to_h5(tmp_path, arrays, rank=0, nranks=1, layouts=None):
    src = rank_file(tmp_path / f"r{rank}.vck", arrays, rank, layouts)
    dst = tmp_path / f"r{rank}.h5"
    with RankFile(src) as rf:
        size, digest, _ = write_rank_h5(rf, dst, "x", 1, rank, nranks, checksum="xxh3_128")
    return dst, size, digest


ARRAYS = {
    "f64": np.random.default_rng(1).random((33, 17)),
    7: np.arange(10, dtype=">i4"),                                  # int id, big endian
    "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "empty": np.zeros((0, 5), np.int16),
    "scalar": np.array(3.5),
    "rec": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i2"), ("b", "<f8")]),
    "big": np.random.default_rng(2).integers(0, 255, 300_000, dtype=np.uint8),   # 4 KiB aligned, O_DIRECT
    "obj": b"\x80\x05pickled bytes",
}


def test_rank_file_reads_in_plain_h5py(tmp_path):
    path, size, digest = to_h5(tmp_path, ARRAYS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert size == path.stat().st_size and digest == digest_file(path, "xxh3_128")
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {"veloc_format": 1, "veloc_name": "x", "veloc_version": 1, "veloc_rank": 0,
                                 "veloc_nranks": 1}
        assert np.array_equal(f["f64"][()], ARRAYS["f64"])
        assert np.array_equal(f["7"][()], ARRAYS[7]) and f["7"].dtype == np.dtype(">i4")
        assert np.array_equal(f["fortran"][()], ARRAYS["fortran"].T)       # stored as its transpose
        assert f["fortran"].attrs["veloc_order"] == "F"
        assert f["empty"].shape == (0, 5) and f["scalar"][()] == 3.5
        assert np.array_equal(f["rec"][()], ARRAYS["rec"])
        assert np.array_equal(f["big"][()], ARRAYS["big"])
        assert f["obj"].attrs["veloc_kind"] == "pickle" and f["obj"][()].tobytes() == ARRAYS["obj"]
        for key in f:
            assert f[key].id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
        assert json.loads(f["7"].attrs["veloc_id"]) == 7
        assert f["f64"].attrs["veloc_dtype"] == "<f8" and list(f["f64"].attrs["veloc_shape"]) == [33, 17]
        assert f["f64"].attrs["veloc_version"] == 1 and f["f64"].attrs["veloc_rank"] == 0


def test_veloc_reader_round_trip_and_dispatch(tmp_path):
    path, _, digest = to_h5(tmp_path, ARRAYS)
    with open_rank_file(path) as h:
        assert isinstance(h, Hdf5RankFile) and h.digest("xxh3_128") == digest
        for rid, value in ARRAYS.items():
            info = h.region(rid)
            if isinstance(value, bytes):
                assert h.bytes_view(info).tobytes() == value
                continue
            out = np.empty_like(value, order="F" if info.order == "F" else "C")
            h.read_into(info, out)
            assert np.array_equal(out, value) and out.dtype == value.dtype
    with open_rank_file(tmp_path / "r0.vck") as rf:
        assert isinstance(rf, RankFile)


def test_int_and_string_ids_spelled_alike_do_not_collide(tmp_path):
    path, _, _ = to_h5(tmp_path, {1: np.arange(3), "1": np.arange(4.0)})
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["1", "str:1"]
    with Hdf5RankFile(path) as h:
        assert h.as_array(h.region(1)).tolist() == [0, 1, 2]
        assert h.as_array(h.region("1")).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_truncated_or_foreign_file_is_corrupt(tmp_path):
    path, size, _ = to_h5(tmp_path, ARRAYS)
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(CorruptCheckpointError, match="r0.h5"):
        Hdf5RankFile(path)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["a"] = np.arange(3)
    with pytest.raises(CorruptCheckpointError, match="veloc attributes"):
        Hdf5RankFile(plain)
    grouped = tmp_path / "grouped.h5"
    with h5py.File(grouped, "w") as f:
        f.create_group("g")
    with pytest.raises(CorruptCheckpointError, match="grouped.h5"):
        Hdf5RankFile(grouped)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CorruptCheckpointError, match="junk.h5"):
        Hdf5RankFile(tmp_path / "junk.h5")


def slabs(tmp_path, rows, gshape=(10, 6), order="C", counter=True, local=False):
    """One rank file per row block of a global array; return ({rank: path}, full array)."""
    full = np.arange(np.prod(gshape), dtype=np.float64).reshape(gshape)
    paths = {}
    for rank, (lo, hi) in enumerate(rows):
        part = full[lo:hi].copy() if order == "C" else np.asfortranarray(full[lo:hi])
        arrays = {"grid": part}
        layouts = {"grid": {"global_shape": list(gshape), "global_offset": [lo, 0]}}
        if counter:
            arrays["it"] = np.array([42], np.int64)
            layouts["it"] = {"replicated": True}
        if local:
            arrays["mine"] = np.full(3, rank)
        paths[rank] = to_h5(tmp_path, arrays, rank, len(rows), layouts)[0]
    return paths, full


@pytest.mark.parametrize("order", ["C", "F"])
def test_virtual_datasets_stitch_slabs_in_plain_h5py(tmp_path, order):
    paths, full = slabs(tmp_path, [(0, 4), (4, 5), (5, 10)], order=order, local=True)
    local = write_global(paths, tmp_path / "global.h5", "x", 1, 3)
    assert local == [{"id": "mine", "reason": "neither global (global_shape, offset) nor replicated"}]
    cwd = os.getcwd()
    os.chdir("/")      # source files are found relative to global.h5, not the working directory
    try:
        with h5py.File(tmp_path / "global.h5", "r") as f:
            assert f["grid"].is_virtual and f["it"].is_virtual and "mine" not in f
            assert np.array_equal(f["grid"][()], full if order == "C" else full.T)
            assert f["it"][()].tolist() == [42]
            assert f.attrs["veloc_nranks"] == 3
        with GlobalFile(tmp_path / "global.h5") as g:
            out = np.empty((3, 6), order=order)
            g.read_slab("grid", (3, 0), out)
            assert np.array_equal(out, full[3:6])
            assert g.regions["it"]["how"] == "replicated" and g.local_regions[0]["id"] == "mine"
    finally:
        os.chdir(cwd)


def test_slabs_with_a_gap_or_overlap_are_not_stitched(tmp_path):
    gap, _ = slabs(tmp_path, [(0, 4), (5, 10)], counter=False)
    local = write_global(gap, tmp_path / "global.h5", "x", 1, 2)
    assert local and "do not tile" in local[0]["reason"]
    with h5py.File(tmp_path / "global.h5", "r") as f:
        assert "grid" not in f


def test_missing_rank_file_leaves_its_regions_out(tmp_path):
    paths, _ = slabs(tmp_path, [(0, 5), (5, 10)])
    del paths[1]
    local = write_global(paths, tmp_path / "global.h5", "x", 1, 2)
    assert {item["id"] for item in local} == {"grid", "it"}


def test_version_complete_only_with_global_file(tmp_path):
    to_h5(tmp_path, {"a": np.arange(3)})
    assert not version_complete(tmp_path, 0)
    (tmp_path / "global.h5").write_bytes(b"")
    assert version_complete(tmp_path, 0)
    assert version_complete(tmp_path, 5)      # a rank with a native copy


# --------------------------------------------------------------------------- config

def test_config_format_key(dirs):
    base = {"scratch": str(dirs["scratch"]), "persistent": str(dirs["persistent"])}
    assert load_config(base).section("flush")["format"] == "native"
    assert load_config({**base, "flush": {"format": "hdf5"}}).section("flush")["format"] == "hdf5"
    with pytest.raises(ConfigError, match="flush.format.*native, hdf5"):
        load_config({**base, "flush": {"format": "netcdf"}})
    with pytest.raises(ConfigError, match="placeholder"):
        load_config({**base, "persistent": str(dirs["persistent"] / "{rank}"), "flush": {"format": "hdf5"}})


def test_missing_h5py_is_a_config_error_saying_how_to_install(dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)     # import h5py now raises ImportError
    cfg = {"scratch": str(dirs["scratch"]), "persistent": str(dirs["persistent"]), "flush": {"format": "hdf5"}}
    with pytest.raises(ConfigError, match=r"pip install 'veloc\[hdf5\]'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"pip install 'veloc\[hdf5\]'"):
        make_writer({"format": "hdf5"})


# --------------------------------------------------------------------------- one rank, end to end

@pytest.fixture
def hdf5_cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"]),
            "flush": {"format": "hdf5"}}


def test_single_rank_flush_and_restart_from_hdf5(dirs, hdf5_cfg):
    grid = np.random.default_rng(0).random((64, 32))
    it = np.array([5], np.int64)
    with veloc.init_single(0, hdf5_cfg) as c:
        c.protect("grid", grid, global_shape=(64, 32), offset=(0, 0))
        c.protect("it", it, replicated=True)
        c.protect("meta", {"lr": 0.1}, pickle=True)
        c.checkpoint("sim", 5)
    vdir = dirs["persistent"] / "sim" / "v5"
    assert sorted(p.name for p in vdir.iterdir()) == ["global.h5", "n0-0.commit.json", "r0.h5"]
    manifest = json.loads((vdir / "n0-0.commit.json").read_text())["manifests"][0]
    assert manifest["files"][0]["name"] == "r0.h5"
    assert manifest["files"][0]["digest"] == digest_file(vdir / "r0.h5", manifest["checksum"])
    with h5py.File(vdir / "global.h5", "r") as f:
        assert np.array_equal(f["grid"][()], grid) and f["it"][()].tolist() == [5]
    shutil.rmtree(dirs["scratch"])
    saved = grid.copy()
    grid[:] = 0
    it[0] = 0
    with veloc.init_single(0, hdf5_cfg) as c:
        c.protect("grid", grid, global_shape=(64, 32), offset=(0, 0))
        c.protect("it", it, replicated=True)
        c.protect("meta", {}, pickle=True)
        assert c.restart_test("sim") == 5
        c.restart("sim", 5)
        assert c.last_restart.level == "persistent"
        assert np.array_equal(grid, saved) and it[0] == 5 and c.recovered["meta"] == {"lr": 0.1}


def test_incomplete_or_corrupt_hdf5_version_is_not_restored(dirs, hdf5_cfg):
    a = np.arange(1000.0)
    with veloc.init_single(0, hdf5_cfg) as c:
        c.protect(0, a)
        c.checkpoint("s", 1)
        c.checkpoint("s", 2)
    shutil.rmtree(dirs["scratch"])
    (dirs["persistent"] / "s" / "v2" / "global.h5").unlink()       # v2 never completed
    flip_bytes(dirs["persistent"] / "s" / "v1" / "r0.h5")
    with veloc.init_single(0, hdf5_cfg) as c:
        c.protect(0, a)
        assert c.restart_test("s") is None


def test_old_versions_go_with_their_global_file(dirs, hdf5_cfg):
    a = np.arange(100.0)
    with veloc.init_single(0, {**hdf5_cfg, "max_versions": 1}) as c:
        c.protect(0, a)
        for version in (1, 2, 3):
            c.checkpoint("s", version)
    assert sorted(p.name for p in (dirs["persistent"] / "s").iterdir()) == ["v3"]
    assert (dirs["persistent"] / "s" / "v3" / "global.h5").is_file()


def test_global_file_is_written_once_every_rank_is_committed(dirs, tmp_path):
    """Two nodes flush their ranks independently; the second to finish writes global.h5,
    and a later call (another node seeing the same) leaves it alone."""
    from types import SimpleNamespace
    from veloc.storage.formats import Hdf5Writer
    from veloc.storage.levels import LevelStore
    from veloc.storage.manifest import FileEntry, Manifest
    scratch, persistent = LevelStore("scratch", dirs["scratch"]), LevelStore("persistent", dirs["persistent"])
    manifests = {}
    for rank in range(2):
        vdir = scratch.version_dir("h", 4)
        vdir.mkdir(parents=True, exist_ok=True)
        path = rank_file(vdir / f"r{rank}.vck", {"g": np.full((2, 3), float(rank)), "it": np.array([4])}, rank,
                         {"g": {"global_shape": [4, 3], "global_offset": [2 * rank, 0]}, "it": {"replicated": True}},
                         name="h", version=4)
        manifests[rank] = Manifest("h", 4, rank, 2, "n", "scratch", checksum="xxh3_128",
                                   files=[FileEntry(path.name, path.stat().st_size,
                                                    digest=digest_file(path, "xxh3_128"))])
    log = SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
    ctx = SimpleNamespace(scratch=lambda r: scratch, persistent=lambda r: persistent, log=log)
    writer = Hdf5Writer()
    for rank in range(2):
        cmd = SimpleNamespace(name="h", version=4, nranks=2, fresh_digests=set(), mapped=None)
        persistent.commit_manifest(writer.write_rank(ctx, cmd, rank, manifests[rank]))
        done = writer.finish_version(ctx, cmd)
        assert (done is not None) == (rank == 1)
    target = persistent.version_dir("h", 4) / "global.h5"
    with h5py.File(target, "r") as f:
        assert f["g"][()].tolist() == [[0.0] * 3, [0.0] * 3, [1.0] * 3, [1.0] * 3] and f["it"][()].tolist() == [4]
    assert writer.finish_version(ctx, cmd) is None
    flip_bytes(persistent.version_dir("h", 4) / "r1.h5")
    from veloc.engine.modules.scratch import verify_copy
    assert "checksum mismatch" in verify_copy(persistent, "h", 4, 1)
