"""``veloc.open``: read a version without MPI, choose the newest complete version and the
fastest intact level, stitch global arrays, and fail clearly on every bad input.

Versions are written here the way the client and the engine write them (a rank file
from ``build_header``/``write_rank_file``, an xxh3 digest, a manifest committed through
``LevelStore``), one rank at a time; one test uses the real client (``init_single``).
"""
import os
import subprocess
import sys
import pickle

import numpy as np
import pytest

import veloc
from conftest import REPO, flip_bytes
from veloc.storage.fileio import FILE_MODE, make_dirs
from veloc.storage.hashing import digest_file
from veloc.storage.levels import LevelStore
from veloc.storage.manifest import FileEntry, Manifest
from veloc.storage.rankfile import build_header, dtype_descr, write_rank_file
from veloc.errors import ConfigError, CorruptCheckpointError, RestartError

pytestmark = pytest.mark.timeout(60)


def region(rid, array, global_shape=None, offset=None, replicated=False):
    array = np.ascontiguousarray(array)
    out = {"id": rid, "kind": "array", "dtype": dtype_descr(array.dtype), "shape": list(array.shape),
           "order": "C", "nbytes": array.nbytes, "data": array}
    if global_shape is not None:
        out["global_shape"], out["global_offset"] = list(global_shape), list(offset)
    if replicated:
        out["replicated"] = True
    return out


def pickled(rid, obj):
    data = pickle.dumps(obj)
    return {"id": rid, "kind": "pickle", "dtype": "", "shape": [], "order": "C", "nbytes": len(data),
            "data": np.frombuffer(data, np.uint8)}


def write_copy(root, name, version, rank, nranks, regions, level="scratch", checksum=True, file_name=None):
    """One rank's committed copy at ``root``, as the client and checksum module leave it."""
    store = LevelStore(level, root)
    vdir = store.version_dir(name, version)
    make_dirs(vdir)
    header, infos, total = build_header(name, version, rank, [{k: v for k, v in r.items() if k != "data"}
                                                              for r in regions])
    path = vdir / (file_name or store.regions_file_name(rank))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        write_rank_file(fd, header, infos, [memoryview(r["data"].reshape(-1).view(np.uint8)) for r in regions], total)
    finally:
        os.close(fd)
    entry = FileEntry(path.name, total, "regions")
    manifest = Manifest(name, version, rank, nranks, "n0", level, [entry])
    if checksum:
        manifest.checksum, entry.digest = "xxh3_128", digest_file(path, "xxh3_128")
    store.commit_manifest(manifest)
    return path


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


def node_root(dirs, node="n0"):
    return dirs["scratch"] / node


GRID = np.arange(6 * 10, dtype=np.float64).reshape(6, 10)


def write_heat(dirs, version=1, level="scratch", roots=None, nranks=4, skip=()):
    """A 6x10 global grid in 4 uneven 2-D slabs (rows 0:2/2:6 x cols 0:3/3:10), a
    replicated counter and a per-rank array."""
    slabs = [((0, 0), (2, 3)), ((0, 3), (2, 7)), ((2, 0), (4, 3)), ((2, 3), (4, 7))][:nranks]
    paths = []
    for rank, (off, shape) in enumerate(slabs):
        if rank in skip:
            continue
        root = (roots or {}).get(rank) or (dirs["persistent"] if level == "persistent" else node_root(dirs))
        part = GRID[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1]] + version
        paths.append(write_copy(root, "heat", version, rank, nranks, [
            region("grid", part, GRID.shape, off),
            region(1, np.array([version], np.int64), replicated=True),
            region("local", np.full(rank + 1, rank, np.int32))], level=level))
    return paths


def test_read_global_2d_uneven_slabs_replicated_and_per_rank(dirs, cfg):
    write_heat(dirs, version=3)
    with veloc.open(cfg, "heat") as view:
        assert (view.version, view.level, view.nranks, view.ranks) == (3, "scratch", 4, (0, 1, 2, 3))
        assert view.verified and view.rank_levels == {0: "scratch", 1: "scratch", 2: "scratch", 3: "scratch"}
        spec = view.regions["grid"]
        assert spec.is_global and spec.shape == (6, 10) and spec.dtype == np.float64
        assert spec.shapes == {0: (2, 3), 1: (2, 7), 2: (4, 3), 3: (4, 7)}
        assert view.regions[1].replicated and view.regions[1].shape == (1,)
        assert view.regions["local"].shape is None and not view.regions["local"].is_global
        assert np.array_equal(view.read_global("grid"), GRID + 3)
        assert view.read_global(1).tolist() == [3] and view.read_global(np.int64(1)).tolist() == [3]
        part = view.read("grid", 3)
        assert np.array_equal(part, GRID[2:, 3:] + 3) and not part.flags.writeable
        assert view.read("local", 2).tolist() == [2, 2, 2]
        with pytest.raises(RestartError, match="per-rank region .*read\\(id, rank\\), ranks 0-3"):
            view.read_global("local")
        with pytest.raises(RestartError, match="'local' is not a global array"):
            view.slabs("local")
        assert [(r, index) for r, index, _ in view.slabs("grid")][3] == (3, (slice(2, 6), slice(3, 10)))
        with pytest.raises(RestartError, match="no region 'nope'; regions: 'grid', 1, 'local'"):
            view.read_global("nope")
        with pytest.raises(RestartError, match="rank 2 .*no region '1'"):
            view.read("1", 2)          # the int id 1 exists, the string does not
        with pytest.raises(RestartError, match="no rank 7; ranks held: 0-3"):
            view.read("grid", 7)
    with pytest.raises(RestartError, match="view is closed"):
        view.read("grid", 0)
    view.close()     # idempotent


def test_no_mpi_in_a_plain_process(dirs, cfg):
    write_heat(dirs)
    code = ("import sys, veloc; v = veloc.open(%r, 'heat'); g = v.read_global('grid'); v.close(); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print(g.sum())" % (cfg,))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == (GRID + 1).sum()


def test_newest_complete_version_skips_incomplete(dirs, cfg):
    write_heat(dirs, version=1)
    write_heat(dirs, version=2, skip={2})                 # rank 2 never committed v2
    with veloc.open(cfg, "heat") as view:
        assert view.version == 1 and [v for v, _ in view.skipped] == [2]
        assert "ranks 2 have no intact copy" in view.skipped[0][1]
    with veloc.open(cfg, "heat", nodes="n0") as view:        # one node id as a plain string
        assert view.version == 1
    with pytest.raises(RestartError, match="no checkpoint named 'heat' at any level .*nodes elsewhere"):
        veloc.open(cfg, "heat", nodes=["elsewhere"])
    with pytest.raises(RestartError, match=r"heat v2 \(4 ranks\): ranks 2 have no intact copy .*"
                                           r"scratch ranks 0-1,3.*rank 2: no copy at any level read"):
        veloc.open(cfg, "heat", version=2)
    with pytest.raises(RestartError, match="no copy of heat v5 at any level; versions found: 2, 1"):
        veloc.open(cfg, "heat", version=5)
    with pytest.raises(RestartError, match="no checkpoint named 'other' at any level"):
        veloc.open(cfg, "other")


def test_fallback_to_persistent_when_scratch_is_corrupt(dirs, cfg):
    scratch = write_heat(dirs, version=4)
    write_heat(dirs, version=4, level="persistent")
    flip_bytes(scratch[1])
    with veloc.open(cfg, "heat") as view:
        assert view.level == "persistent" and np.array_equal(view.read_global("grid"), GRID + 4)
    with veloc.open(cfg, "heat", verify=False) as view:      # sizes and headers only
        assert view.level == "scratch" and not view.verified
    with pytest.raises(CorruptCheckpointError, match=r"heat v4 \(4 ranks\): ranks 1 have no intact copy.*"
                                                     r"rank 1: scratch: .*r1.vck: xxh3_128 checksum mismatch"):
        veloc.open(cfg, "heat", level="scratch")
    with veloc.open(cfg, "heat", level="persistent") as view:
        assert view.level == "persistent"


def test_mixed_levels_when_no_single_level_holds_every_rank(dirs, cfg):
    # node n1's scratch is gone; its ranks survive only as partner copies on n0
    roots = {0: node_root(dirs, "n0"), 1: node_root(dirs, "n0"),
             2: node_root(dirs, "n0") / ".partner" / "n1", 3: node_root(dirs, "n0") / ".partner" / "n1"}
    for rank in range(4):
        write_heat(dirs, version=2, roots=roots, skip=set(range(4)) - {rank},
                   level="partner" if rank >= 2 else "scratch")
    with veloc.open(cfg, "heat") as view:
        assert view.level == "mixed"
        assert view.rank_levels == {0: "scratch", 1: "scratch", 2: "partner", 3: "partner"}
        assert np.array_equal(view.read_global("grid"), GRID + 2)
    with pytest.raises(RestartError, match="ranks 2-3 have no intact copy"):
        veloc.open(cfg, "heat", level="scratch")


def test_erasure_only_copies_need_a_rebuild(dirs, cfg):
    write_heat(dirs, version=2, skip={3})
    from veloc.redundancy.striping import FORMAT, GroupStore
    record = {"format": FORMAT, "name": "heat", "version": 2, "scheme": "xor", "m": 1, "parity_len": 8,
              "parity": [], "members": [{"node": "n0", "manifests": [{"rank": r, "nranks": 4} for r in range(4)]}]}
    GroupStore(node_root(dirs, "n0") / ".erasure").commit(record, {})
    with pytest.raises(RestartError, match="rank 3: .*erasure-coded parity.*restart the job"):
        veloc.open(cfg, "heat", version=2)
    with pytest.raises(RestartError, match="does not decode erasure-coded copies"):
        veloc.open(cfg, "heat", level="erasure")


def test_pickle_regions_need_allow_pickle(dirs, cfg):
    write_copy(node_root(dirs), "obj", 1, 0, 1, [pickled("meta", {"lr": 0.1})])
    with veloc.open(cfg, "obj") as view:
        assert view.regions["meta"].kind == "pickle" and view.regions["meta"].dtype is None
        with pytest.raises(RestartError, match="pickled Python object: pass allow_pickle=True"):
            view.read("meta", 0)
        with pytest.raises(RestartError, match="pickled object, not an array"):
            view.read_global("meta")
        assert view.read("meta", 0, allow_pickle=True) == {"lr": 0.1}


@pytest.mark.parametrize("slabs, message", [
    ([((0, 0), (3, 10)), ((4, 0), (2, 10))], r"slab gap: no rank's slab covers global index \[3:4, 0:10\]"),
    ([((0, 0), (4, 10)), ((3, 0), (3, 10))], r"slab overlap: ranks 0, 1 all hold global index \[3:4, 0:10\]"),
])
def test_read_global_names_a_gap_or_an_overlap(dirs, cfg, slabs, message):
    for rank, (off, shape) in enumerate(slabs):
        write_copy(node_root(dirs), "bad", 1, rank, 2,
                   [region("g", GRID[off[0]:off[0] + shape[0]], GRID.shape, off)])
    with veloc.open(cfg, "bad") as view:
        with pytest.raises(CorruptCheckpointError, match=message):
            view.read_global("g")


def test_read_global_refuses_disagreeing_ranks(dirs, cfg):
    write_copy(node_root(dirs), "dis", 1, 0, 2, [region("g", GRID[:3], GRID.shape, (0, 0))])
    write_copy(node_root(dirs), "dis", 1, 1, 2, [region("g", GRID[3:].astype(np.float32), GRID.shape, (3, 0))])
    with veloc.open(cfg, "dis") as view:
        with pytest.raises(CorruptCheckpointError, match="rank 1 .*<f4 slab.*the ranks disagree"):
            view.read_global("g")


def test_compressed_copy_is_named_and_another_level_used(dirs, cfg):
    write_heat(dirs, version=1, level="persistent")
    store = LevelStore("persistent", dirs["persistent"])
    manifest = store.read_manifest("heat", 1, 0)
    manifest.files[0].name = "r0.vcz"
    os.replace(dirs["persistent"] / "heat" / "v1" / "r0.vck", dirs["persistent"] / "heat" / "v1" / "r0.vcz")
    store.commit_manifest(manifest)
    with pytest.raises(RestartError, match="rank 0: persistent: compressed copy: r0.vcz .*no decoder"):
        veloc.open(cfg, "heat")
    write_heat(dirs, version=1)                 # a raw copy on scratch is read instead
    with veloc.open(cfg, "heat") as view:
        assert view.level == "scratch"


def test_bad_arguments(dirs, cfg):
    write_heat(dirs)
    with pytest.raises(ConfigError, match="unknown level 'fast'; accepted: scratch, partner, erasure, persistent"):
        veloc.open(cfg, "heat", level="fast")
    with pytest.raises(RestartError, match="no partner level here"):
        veloc.open(cfg, "heat", level="partner")
    with pytest.raises(RestartError, match="invalid checkpoint name '../x'"):
        veloc.open(cfg, "../x")
    with pytest.raises(RestartError, match="non-negative int"):
        veloc.open(cfg, "heat", version=-1)
    with pytest.raises(ConfigError):
        veloc.open({"persistent": "/tmp/x"}, "heat")
    with pytest.raises(RestartError, match="no checkpoint named 'heat' at level persistent"):
        veloc.open(cfg, "heat", level="persistent")


def test_truncated_and_unreadable_manifest(dirs, cfg):
    paths = write_heat(dirs, version=1, nranks=2)
    os.truncate(paths[0], paths[0].stat().st_size - 10)
    (paths[1].parent / "r1.manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"rank 0: scratch: .*size \d+ != \d+ recorded.*"
                                                     r"rank 1: scratch: .*malformed manifest"):
        veloc.open(cfg, "heat")


def test_reads_what_the_real_client_wrote(dirs, cfg):
    with veloc.init_single(0, cfg) as client:
        grid = np.random.default_rng(1).random((8, 5)).astype(np.float32)
        client.protect("grid", grid, global_shape=(8, 5), offset=(0, 0))
        client.protect("it", np.array([12]), replicated=True)
        client.checkpoint("real", 12)
    with veloc.open(cfg, "real") as view:
        assert (view.version, view.nranks, view.ranks) == (12, 1, (0,))
        assert np.array_equal(view.read_global("grid"), grid) and view.read_global("it").tolist() == [12]


def test_fortran_order_slabs_and_arrays_outliving_the_view(dirs, cfg):
    full = np.arange(7 * 4, dtype=np.int16).reshape(7, 4)
    for rank, (a, b) in enumerate([(0, 3), (3, 7)]):
        with veloc.init_single(rank, cfg) as client:
            client.protect("f", np.asfortranarray(full[a:b]), global_shape=full.shape, offset=(a, 0))
            client.checkpoint("fort", 1)
    view = veloc.open(cfg, "fort")
    assert view.ranks == (0, 1) and view.nranks == 1      # two init_single processes, ids 0 and 1
    part = view.read("f", 1)
    assert part.flags.f_contiguous and np.array_equal(part, full[3:])
    assert np.array_equal(view.read_global("f"), full)
    view.close()
    assert np.array_equal(part, full[3:])                 # still mapped while referenced


def test_object_dtype_in_a_header_is_refused(dirs, cfg):
    write_copy(node_root(dirs), "evil", 1, 0, 1, [dict(region("x", np.zeros(2, np.int64)), dtype="|O")])
    with pytest.raises(CorruptCheckpointError, match="Python-object dtype"):
        veloc.open(cfg, "evil", verify=False)


def test_hdf5_persistent_copies(dirs, cfg):
    pytest.importorskip("h5py")
    hcfg = dict(cfg, flush={"format": "hdf5"})
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    with veloc.init_single(0, hcfg) as client:
        client.protect("grid", grid, global_shape=(3, 4), offset=(0, 0))
        client.protect("meta", [1, 2], pickle=True)
        client.checkpoint("h", 1)
    vdir = dirs["persistent"] / "h" / "v1"
    assert (vdir / "r0.h5").exists() and (vdir / "global.h5").exists()
    with veloc.open(cfg, "h", level="persistent") as view:
        assert view.files[0] == vdir / "r0.h5"
        assert np.array_equal(view.read_global("grid"), grid) and view.read("meta", 0, allow_pickle=True) == [1, 2]
    flip_bytes(vdir / "r0.h5")
    with veloc.open(cfg, "h") as view:         # scratch is read first anyway
        assert view.level == "scratch"
    with pytest.raises(CorruptCheckpointError, match="r0.h5: xxh3_128 checksum mismatch"):
        veloc.open(cfg, "h", level="persistent")
    (vdir / "global.h5").unlink()
    with pytest.raises(RestartError, match="not complete at this level yet .*global.h5"):
        veloc.open(cfg, "h", level="persistent", verify=False)


def test_compressed_persistent_copies_are_decoded(dirs, cfg):
    pytest.importorskip("zstandard")
    ccfg = dict(cfg, compress={"enabled": "true", "codec": "zstd"})
    grid = np.zeros((64, 256))
    grid[0] = 100.0
    with veloc.init_single(0, ccfg) as client:
        client.protect("grid", grid, global_shape=grid.shape, offset=(0, 0))
        client.protect("meta", {"lr": 0.5}, pickle=True)
        client.checkpoint("z", 1)
    vdir = dirs["persistent"] / "z" / "v1"
    assert (vdir / "r0.vcz").exists() and not (vdir / "r0.vck").exists()
    with veloc.open(cfg, "z", level="persistent") as view:
        assert view.files[0] == vdir / "r0.vcz"
        got = view.read_global("grid")
        assert np.array_equal(got, grid) and not view.read("grid", 0).flags.writeable
        assert view.read("meta", 0, allow_pickle=True) == {"lr": 0.5}
    flip_bytes(vdir / "r0.vcz")
    with pytest.raises(CorruptCheckpointError, match="r0.vcz: xxh3_128 checksum mismatch"):
        veloc.open(cfg, "z", level="persistent")


def test_a_registered_reader_decodes_its_kind(dirs, cfg, monkeypatch):
    """The seam: a reader registered for a manifest file kind is used for it (here a
    kind 'mystery' entry whose file happens to be a plain .vck, read by the native reader)."""
    from veloc import reader_formats
    write_heat(dirs, version=1, nranks=2)
    for rank in (0, 1):
        store = LevelStore("scratch", node_root(dirs))
        manifest = store.read_manifest("heat", 1, rank)
        manifest.files[0].kind = "mystery"
        store.commit_manifest(manifest)
    with pytest.raises(RestartError, match="r0.vck .*stored as 'mystery', a format veloc.open cannot read"):
        veloc.open(cfg, "heat")
    opened = []

    def factory(path):
        opened.append(path.name)
        return reader_formats.RankFileReader(path)
    monkeypatch.setitem(reader_formats.READERS, "mystery", factory)
    with veloc.open(cfg, "heat", verify=False) as view:
        assert np.array_equal(view.read("grid", 1), GRID[:2, 3:] + 1)
    assert sorted(opened) == ["r0.vck", "r1.vck"]
