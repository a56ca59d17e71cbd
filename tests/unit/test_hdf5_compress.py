"""``[compress]`` with ``[flush] format = hdf5``: chunked datasets through HDF5's deflate
filter, checked with plain h5py; incompressible regions stay contiguous; virtual datasets
over chunked sources; restart and ``veloc.open`` from compressed HDF5 copies."""
import json
import shutil
import sys

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import veloc  # noqa: E402
from test_hdf5_format import rank_file  # noqa: E402
from veloc.cli import main  # noqa: E402
from veloc.errors import ConfigError, CorruptCheckpointError  # noqa: E402
from veloc.storage.hashing import digest_file  # noqa: E402
from veloc.storage.hdf5_filters import chunk_shape, deflate_level, plan_filters  # noqa: E402
from veloc.storage.hdf5_format import Hdf5RankFile, write_global, write_rank_h5  # noqa: E402
from veloc.storage.rankfile import RankFile  # noqa: E402

SMOOTH = np.outer(np.linspace(0, 1, 300), np.ones(200))                  # compresses well
NOISE = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8)   # does not


def to_h5(tmp_path, arrays, codec="auto", level=None, rank=0, nranks=1, layouts=None, block_size=None):
    src = rank_file(tmp_path / f"r{rank}.vck", arrays, rank, layouts)
    dst = tmp_path / f"r{rank}.h5"
    with RankFile(src) as rf:
        filters = plan_filters(rf, codec, level)
        size, digest, _ = write_rank_h5(rf, dst, "x", 1, rank, nranks, checksum="xxh3_128", filters=filters,
                                        level=level, block_size=block_size)
    return dst, size, digest, filters


def test_compressible_regions_are_deflated_and_read_in_plain_h5py(tmp_path):
    fortran = np.asfortranarray(np.tile(np.arange(50, dtype=np.float32), (40, 1)))
    arrays = {"smooth": SMOOTH, "noise": NOISE, "fortran": fortran, "scalar": np.array(2.5),
              "obj": b"\x80\x05" + b"pickled " * 200}
    path, size, digest, filters = to_h5(tmp_path, arrays)
    assert set(filters) == {"smooth", "fortran", "obj"}          # the probe left noise (and the scalar) raw
    assert size == path.stat().st_size and digest == digest_file(path, "xxh3_128")
    assert size < SMOOTH.nbytes // 5 + NOISE.nbytes + 8192
    with h5py.File(path, "r") as f:
        smooth, noise = f["smooth"], f["noise"]
        assert smooth.compression == "gzip" and smooth.compression_opts == 1 and smooth.shuffle
        assert smooth.chunks is not None and np.array_equal(smooth[()], SMOOTH)
        assert noise.chunks is None and noise.compression is None and noise.id.get_offset() is not None
        assert np.array_equal(noise[()], NOISE)
        assert np.array_equal(f["fortran"][()], fortran.T) and f["fortran"].compression == "gzip"
        assert f["obj"].compression == "gzip" and not f["obj"].shuffle      # bytes: nothing to shuffle
        assert f["scalar"].chunks is None and f["scalar"][()] == 2.5


def filter_ids(dset):
    plist = dset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


@pytest.mark.parametrize("codec,filter_id", [("auto", 1), ("zstd", 32015), ("blosc2", 32026), ("lz4", 32004)])
def test_veloc_reader_decodes_into_the_callers_array(tmp_path, codec, filter_id):
    fortran = np.asfortranarray(np.tile(np.arange(50, dtype=np.float32), (40, 1)))
    arrays = {"smooth": SMOOTH, "noise": NOISE.reshape(400, 500).T, "fortran": fortran,
              "obj": b"pickled " * 200}
    if codec == "auto":
        arrays["noise"] = np.asfortranarray(SMOOTH * 2)  # every region compressible
    path, _, digest, _ = to_h5(tmp_path, arrays, codec=codec, level=6)
    with Hdf5RankFile(path) as h:
        assert h.digest("xxh3_128") == digest
        for rid in ("smooth", "fortran", "noise"):     # noise: an F-ordered view of bytes
            info = h.region(rid)
            assert h.is_filtered(info) and info.nbytes == arrays[rid].nbytes
            out = np.empty_like(arrays[rid], order="F" if info.order == "F" else "C")
            h.read_into(info, out)
            assert np.array_equal(out, arrays[rid])
            assert np.array_equal(h.as_array(info), arrays[rid])
            assert h.bytes_view(info).tobytes() == arrays[rid].tobytes(order="A")
        strided = np.empty((300, 400))[:, ::2]                       # not contiguous: through a temporary
        h.read_into(h.region("smooth"), strided)
        assert np.array_equal(strided, SMOOTH)
        assert h.load_bytes(h.region("obj")).tobytes() == arrays["obj"]
    with h5py.File(path, "r") as f:             # a named codec: every region, even incompressible
        for rid in ("smooth", "noise", "fortran", "obj"):
            assert filter_id in filter_ids(f[rid]) and f[rid].chunks is not None, rid
        assert np.array_equal(f["noise"][()], arrays["noise"].T)


def test_named_codec_without_hdf5plugin_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)
    with pytest.raises(ConfigError, match="compress.codec.*zstd.*hdf5plugin.*pip install"):
        to_h5(tmp_path, {"smooth": SMOOTH}, codec="zstd")


def test_codec_none_level_clamp_and_chunk_shape(tmp_path):
    path, _, _, filters = to_h5(tmp_path, {"smooth": SMOOTH}, codec="none")
    assert filters == {}
    with h5py.File(path, "r") as f:
        assert f["smooth"].chunks is None
    assert deflate_level(None) == 1 and deflate_level(22) == 9 and deflate_level(-3) == 1
    assert chunk_shape((1000, 1000), 8, 1 << 20) == (131, 1000)
    assert chunk_shape((4, 3_000_000), 8, 1 << 20) == (1, 131072)
    assert chunk_shape((10,), 8) == (10,)
    path, _, _, _ = to_h5(tmp_path, {"smooth": SMOOTH}, block_size=64 << 10)
    with h5py.File(path, "r") as f:
        assert f["smooth"].chunks == (40, 200)


def test_damaged_chunk_is_a_corrupt_checkpoint_error(tmp_path):
    path, _, _, _ = to_h5(tmp_path, {"smooth": np.random.default_rng(0).random(100_000).round(2)})
    with h5py.File(path, "r") as f:
        offset, size = f["smooth"].id.get_chunk_info(0).byte_offset, f["smooth"].id.get_chunk_info(0).size
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        fh.write(b"\xff" * 64)
    with Hdf5RankFile(path) as h:
        with pytest.raises(CorruptCheckpointError, match="cannot decode dataset .*smooth"):
            h.read_into(h.region("smooth"), np.empty(100_000))


def test_virtual_datasets_stitch_chunked_sources(tmp_path):
    full = np.repeat(np.arange(10.0)[:, None], 600, axis=1)
    paths = {}
    for rank, (lo, hi) in enumerate([(0, 4), (4, 10)]):
        layouts = {"grid": {"global_shape": [10, 600], "global_offset": [lo, 0]}, "it": {"replicated": True}}
        path, _, _, filters = to_h5(tmp_path, {"grid": full[lo:hi].copy(), "it": np.array([7] * 100)},
                                    rank=rank, nranks=2, layouts=layouts)
        assert "grid" in filters
        paths[rank] = path
    assert write_global(paths, tmp_path / "global.h5", "x", 1, 2) == []
    with h5py.File(tmp_path / "global.h5", "r") as f:
        assert f["grid"].is_virtual and np.array_equal(f["grid"][()], full)
        assert np.array_equal(f["grid"][3:6, 10:20], full[3:6, 10:20]) and f["it"][()].tolist() == [7] * 100


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"]),
            "flush": {"format": "hdf5"}, "compress": {"enabled": True}}


@pytest.mark.parametrize("codec", ["auto", "blosc2"])
def test_restart_and_open_from_compressed_hdf5(dirs, cfg, codec):
    cfg["compress"]["codec"] = codec
    grid = np.outer(np.linspace(0, 1, 256), np.linspace(1, 2, 128))
    noise = np.random.default_rng(5).integers(0, 256, 160_000, dtype=np.uint8)   # incompressible
    it = np.array([5], np.int64)
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid, global_shape=(256, 128), offset=(0, 0))
        c.protect("noise", noise)
        c.protect("it", it, replicated=True)
        c.protect("meta", {"lr": 0.1}, pickle=True)
        c.checkpoint("sim", 5)
    vdir = dirs["persistent"] / "sim" / "v5"
    assert sorted(p.name for p in vdir.iterdir()) == ["global.h5", "n0-0.commit.json", "r0.h5"]   # no .vcz
    assert not list(dirs["scratch"].rglob("*.vcz"))
    manifest = json.loads((vdir / "n0-0.commit.json").read_text())["manifests"][0]
    assert manifest["files"][0]["digest"] == digest_file(vdir / "r0.h5", manifest["checksum"])
    with h5py.File(vdir / "r0.h5", "r") as f:
        if codec == "auto":
            assert f["grid"].compression == "gzip" and f["noise"].chunks is None
        else:
            assert 32026 in filter_ids(f["grid"]) and 32026 in filter_ids(f["noise"])
    with h5py.File(vdir / "global.h5", "r") as f:
        assert np.array_equal(f["grid"][()], grid)
    with veloc.open(cfg, "sim", level="persistent") as view:
        assert np.array_equal(view.read("grid", 0), grid) and np.array_equal(view.read_global("grid"), grid)
        assert np.array_equal(view.read("noise", 0), noise)
    ini = dirs["tmp"] / "h5z.ini"
    ini.write_text(f"scratch = {cfg['scratch']}\npersistent = {cfg['persistent']}\n[flush]\nformat = hdf5\n"
                   f"[compress]\nenabled = true\ncodec = {codec}\n")
    out = dirs["tmp"] / "export.h5"
    assert main(["export", str(ini), "sim", "5", str(out), "--level", "persistent"]) == 0
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["grid"][()], grid) and np.array_equal(f["rank0/noise"][()], noise)
    shutil.rmtree(dirs["scratch"])
    saved, saved_noise = grid.copy(), noise.copy()
    grid[:] = 0
    noise[:] = 0
    it[0] = 0
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid, global_shape=(256, 128), offset=(0, 0))
        c.protect("noise", noise)
        c.protect("it", it, replicated=True)
        c.protect("meta", {}, pickle=True)
        c.restart("sim", 5)
        assert c.last_restart.level == "persistent"
        assert np.array_equal(grid, saved) and np.array_equal(noise, saved_noise) and it[0] == 5
        assert c.recovered["meta"] == {"lr": 0.1}


def test_lossy_region_is_stored_exactly(dirs, cfg):
    field = np.sin(np.linspace(0, 20, 50_000))
    with veloc.init_single(0, cfg) as c:
        c.protect("f", field, lossy=("zfp", 1e-3))
        c.checkpoint("z", 1)
    with h5py.File(dirs["persistent"] / "z" / "v1" / "r0.h5", "r") as f:
        assert f["f"].compression == "gzip" and np.array_equal(f["f"][()], field)


def test_named_codec_without_hdf5plugin_fails_when_the_engine_is_built(dirs, cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)
    cfg["compress"]["codec"] = "zstd"
    with pytest.raises(ConfigError, match="hdf5plugin"):
        with veloc.init_single(0, cfg) as c:
            c.protect("a", np.zeros(10))
            c.checkpoint("a", 1)
