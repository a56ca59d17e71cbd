"""Compression: codecs, the ``.vcz`` container, the ``[compress]`` module with the client
in one process (``init_single``, no mpiexec), lossy regions and bad configuration."""
import os
import shutil

import numpy as np
import pytest

import veloc
from conftest import flip_bytes, write_vck
from veloc.storage.codecs import Codec, codec_names, get_codec, register_codec
from veloc.config import load_config
from veloc.storage.compressed_file import CompressedReader, plan_codecs, write_compressed
from veloc.storage.manifest import verify_files
from veloc.storage.rankfile import RankFile
from veloc.errors import CheckpointError, ConfigError, CorruptCheckpointError
from veloc.regions import Region

LOSSLESS = [n for n in codec_names() if n != "none"] + ["none"]
DTYPES = [np.bool_, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64,
          np.complex64, np.complex128, np.dtype([("x", "<i4"), ("y", "<f8"), ("z", "u1", (3,))])]


def sample(dtype, n, kind, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, n * np.dtype(dtype).itemsize, dtype=np.uint8) if kind == "random" else \
        np.repeat(np.arange(n * np.dtype(dtype).itemsize // 64 + 1, dtype=np.uint8), 64)[:n * np.dtype(dtype).itemsize]
    out = raw.view(dtype) if n else np.zeros(0, dtype)
    return out.copy() if np.dtype(dtype) != np.bool_ else (out.view(np.uint8) & 1).astype(np.bool_)


def compress(tmp_path, regions, codec, block_size=4096):
    write_vck(tmp_path / "r0.vck", regions)
    with RankFile(tmp_path / "r0.vck") as rf:
        plan = plan_codecs(rf, codec)
        write_compressed(rf, tmp_path / "r0.vcz", plan, block_size=block_size, checksum="xxh3_128",
                         source_digest=rf.digest("xxh3_128"))
    return tmp_path / "r0.vcz"


@pytest.mark.parametrize("codec", LOSSLESS)
@pytest.mark.parametrize("kind", ["random", "repetitive"])
def test_codec_round_trip_every_dtype_and_size(tmp_path, codec, kind):
    arrays = {f"a{i}_{n}": sample(dt, n, kind, seed=i)
              for i, dt in enumerate(DTYPES) for n in (0, 1, 4097)}
    arrays["fortran"] = np.asfortranarray(np.arange(35 * 17, dtype=np.float64).reshape(35, 17))
    arrays["scalar"] = np.array(3.5)
    regions = [Region(k, v) for k, v in arrays.items()] + [Region("obj", {"k": [1, 2]}, use_pickle=True)]
    path = compress(tmp_path, regions, codec)
    with CompressedReader(path) as reader:
        for key, arr in arrays.items():
            info = reader.region(key)
            out = np.empty_like(arr)
            reader.read_into(info, out)
            assert out.tobytes() == arr.tobytes(), key
            assert reader.codec(info)[0] in (codec, "none")
        import pickle
        assert pickle.loads(reader.load_bytes(reader.region("obj"))) == {"k": [1, 2]}
        rebuilt = tmp_path / "back.vck"
        fd = os.open(rebuilt, os.O_RDWR | os.O_CREAT, 0o600)
        reader.restore_raw(fd)
        os.close(fd)
    assert rebuilt.read_bytes() == (tmp_path / "r0.vck").read_bytes()


def test_blocks_decode_in_parallel(tmp_path):
    arr = np.repeat(np.arange(1000, dtype=np.float64), 100)
    path = compress(tmp_path, [Region("g", arr)], "blosc2")
    with CompressedReader(path, workers=3) as reader:
        assert len(reader.meta["regions"][0]["blocks"]) > 3
        out = np.empty_like(arr)
        reader.read_into(reader.region("g"), out)
    assert np.array_equal(out, arr)


def test_decode_into_an_array_of_the_other_memory_order(tmp_path):
    arr = np.arange(600, dtype=np.int32).reshape(20, 30)
    path = compress(tmp_path, [Region("g", arr)], "zstd")
    with CompressedReader(path) as reader:
        out = np.asfortranarray(np.zeros_like(arr))
        reader.read_into(reader.region("g"), out)
    assert np.array_equal(out, arr)


def test_every_codec_encodes_and_decodes_a_buffer_directly():
    data = np.random.default_rng(1).integers(0, 4, 100_003, dtype=np.uint8)
    for name in LOSSLESS:
        codec = get_codec(name)
        out = bytearray(len(data))
        codec.decode_into(memoryview(codec.encode(memoryview(data), 1)), memoryview(out))
        assert bytes(out) == data.tobytes(), name
        with pytest.raises(CorruptCheckpointError):
            codec.decode_into(memoryview(b"\x01\x02garbage"), memoryview(bytearray(len(data))))


def test_auto_stores_incompressible_data_raw_and_compresses_zeros(tmp_path):
    weights = np.random.default_rng(2).standard_normal(1 << 18).astype(np.float32)
    sparse = np.zeros(1 << 18, np.float32)
    write_vck(tmp_path / "r0.vck", [Region("w", weights), Region("z", sparse)])
    with RankFile(tmp_path / "r0.vck") as rf:
        assert plan_codecs(rf, "auto") == {"w": "none", "z": "zstd"}


def test_a_damaged_block_is_found_before_decode(tmp_path):
    arr = np.zeros(1 << 16)
    path = compress(tmp_path, [Region("z", arr)], "zstd")
    with CompressedReader(path) as reader:
        first = reader.meta["regions"][0]["blocks"][1]     # [offset, stored, raw, how, check]
    data = bytearray(path.read_bytes())
    data[first[0] + first[1] // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with CompressedReader(path) as reader, pytest.raises(CorruptCheckpointError, match="damaged"):
        reader.read_into(reader.region("z"), np.empty_like(arr))


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = compress(tmp_path, [Region("z", np.zeros(1000))], "zstd")
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CorruptCheckpointError, match="trailer|magic"):
        CompressedReader(path)
    path.write_bytes(b"x" * 100)
    with pytest.raises(CorruptCheckpointError, match="not a compressed"):
        CompressedReader(path)


def test_lossy_region_respects_its_bound_and_is_recorded(tmp_path):
    x = np.linspace(0, 20, 300 * 400)
    field = (np.sin(x) * np.exp(-x / 10)).reshape(300, 400)
    f32 = np.cos(x).astype(np.float32)
    f32[5] = np.nan                                     # a slab with a NaN is stored exactly
    path = compress(tmp_path, [Region("f", field, lossy=("zfp", 1e-6)), Region("g", f32, lossy=("zfp", 1e-3))],
                    "auto", block_size=64 << 10)
    with CompressedReader(path) as reader:
        out = np.empty_like(field)
        reader.read_into(reader.region("f"), out)
        assert reader.codec(reader.region("f")) == ("zfp", 1e-6)
        assert np.abs(out - field).max() <= 1e-6 and not np.array_equal(out, field)
        assert reader.stored_bytes(reader.region("f")) < field.nbytes / 2
        got = np.empty_like(f32)
        reader.read_into(reader.region("g"), got)
        assert np.isnan(got[5]) and np.nanmax(np.abs(got - f32)) <= 1e-3


@pytest.mark.parametrize("lossy, match", [
    (("zfp", 0), "positive finite"), (("zfp", float("inf")), "positive finite"),
    (("sz3", 1e-3), "unknown"), ("zfp", "expected"), (("zfp", "x"), "expected")])
def test_bad_lossy_requests_are_refused(lossy, match):
    with pytest.raises(CheckpointError, match=match):
        Region("f", np.zeros(4), lossy=lossy)


def test_lossy_needs_a_float_array():
    with pytest.raises(CheckpointError, match="float32 or float64"):
        Region("i", np.zeros(4, np.int32), lossy=("zfp", 1e-3))
    with pytest.raises(CheckpointError, match="float32 or float64"):
        Region("p", {"a": 1}, use_pickle=True, lossy=("zfp", 1e-3))


@pytest.mark.parametrize("key, value, match", [
    ("codec", "gzip", "compress.codec"), ("level", "40", "compress.level"),
    ("block_size", "1K", "compress.block_size"), ("block_size", "lots", "compress.block_size"),
    ("levels", "scratch", "compress.levels"), ("levels", "", "compress.levels"),
    ("enabled", "maybe", "compress.enabled"), ("priority", "x", "compress.priority")])
def test_bad_compress_config_names_the_key(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"scratch": str(tmp_path), "compress": {"enabled": "true", key: value}}, environ={})


def test_compress_config_defaults_and_sizes(tmp_path):
    cfg = load_config({"scratch": str(tmp_path), "compress": {"block_size": "1M"}}, environ={})
    sec = cfg.section("compress")
    assert (sec["enabled"], sec["priority"], sec["codec"], sec["block_size"], sec["levels"]) == \
        (None, 20, "auto", 1 << 20, ("persistent",))


def test_a_registered_codec_is_usable_by_name(tmp_path):
    class FirstByte(Codec):
        """A toy codec for constant blocks: the first byte (a new codec is one class)."""
        name = "first_byte_test"

        def encode(self, data, itemsize=1, level=None):
            return bytes(data[:1])

        def decode_into(self, data, out):
            out[:] = bytes(data) * len(out)
    register_codec(FirstByte())
    try:
        arr = np.full(10_000, 7, np.uint8)
        path = compress(tmp_path, [Region("c", arr)], "first_byte_test")
        with CompressedReader(path) as reader:
            out = np.empty_like(arr)
            reader.read_into(reader.region("c"), out)
            assert reader.codec(reader.region("c"))[0] == "first_byte_test"
        assert np.array_equal(out, arr)
    finally:
        from veloc.storage import codecs
        codecs._CODECS.pop("first_byte_test", None)
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec("nope")


# ------------------------------------------------------------------ module + client

@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"]),
            "compress": {"enabled": "true", "block_size": "64K"}}


def pdir(dirs, version):
    return dirs["persistent"] / "sim" / f"v{version}"


def run_versions(cfg, versions, grid, weights):
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid)
        c.protect("w", weights)
        for v in versions:
            grid[v] = v
            c.checkpoint("sim", v)


def restart_fresh(cfg, shape, wshape):
    grid, weights = np.empty(shape), np.empty(wshape, np.float32)
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid)
        c.protect("w", weights)
        v = c.restart_test("sim")
        c.restart("sim", v)
        return v, c.last_restart.level, grid, weights


def test_persistent_holds_only_the_compressed_copy_and_restores_in_place(dirs, cfg):
    grid, weights = np.zeros((256, 256)), np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    run_versions(cfg, [1, 2], grid, weights)
    names = sorted(p.name for p in pdir(dirs, 2).iterdir())
    assert names == ["n0-0.commit.json", "r0.vcz"]
    manifest = veloc.storage.levels.LevelStore("persistent", dirs["persistent"]).read_manifest("sim", 2, 0)
    assert [f.kind for f in manifest.files] == ["compressed"] and manifest.files[0].digest
    verify_files(manifest, pdir(dirs, 2))
    assert (pdir(dirs, 2) / "r0.vcz").stat().st_size < grid.nbytes / 10
    shutil.rmtree(dirs["scratch"])
    v, level, got, w = restart_fresh(cfg, grid.shape, weights.shape)
    assert (v, level) == (2, "persistent")
    assert got.tobytes() == grid.tobytes() and w.tobytes() == weights.tobytes()


def test_damaged_compressed_copy_is_answered_by_scratch_or_an_older_version(dirs, cfg):
    grid, weights = np.zeros((128, 128)), np.ones(1000, np.float32)
    run_versions(cfg, [1, 2], grid, weights)
    flip_bytes(pdir(dirs, 2) / "r0.vcz")
    manifest = veloc.storage.levels.LevelStore("persistent", dirs["persistent"]).read_manifest("sim", 2, 0)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        verify_files(manifest, pdir(dirs, 2))
    v, level, got, _ = restart_fresh(cfg, grid.shape, weights.shape)      # scratch still intact
    assert (v, level) == (2, "scratch") and got.tobytes() == grid.tobytes()
    shutil.rmtree(dirs["scratch"])
    v, level, got, _ = restart_fresh(cfg, grid.shape, weights.shape)
    assert (v, level) == (1, "persistent")
    want = np.zeros_like(grid)
    want[1] = 1
    assert got.tobytes() == want.tobytes()


def test_incompressible_rank_is_flushed_raw_without_a_sidecar(dirs, cfg):
    grid = np.random.default_rng(4).standard_normal((64, 64))
    run_versions(cfg, [1], grid, np.random.default_rng(5).standard_normal(5000).astype(np.float32))
    assert sorted(p.name for p in pdir(dirs, 1).iterdir()) == ["n0-0.commit.json", "r0.vck"]
    scratch_vdir = next(dirs["scratch"].iterdir()) / "sim" / "v1"
    assert not (scratch_vdir / "r0.vcz").exists()


def test_lossy_region_restarts_within_bound_from_persistent_exactly_from_scratch(dirs, cfg):
    x = np.linspace(0, 6, 128 * 128)
    field = np.sin(x).reshape(128, 128)
    with veloc.init_single(0, cfg) as c:
        c.protect("f", field, lossy=("zfp", 1e-5))
        c.checkpoint("sim", 1)
    for remove_scratch, exact in ((False, True), (True, False)):
        if remove_scratch:
            shutil.rmtree(dirs["scratch"])
        got = np.empty_like(field)
        with veloc.init_single(0, cfg) as c:
            c.protect("f", got)
            c.restart("sim", c.restart_test("sim"))
        assert np.array_equal(got, field) == exact
        assert np.abs(got - field).max() <= 1e-5
    manifest = veloc.storage.levels.LevelStore("persistent", dirs["persistent"]).read_manifest("sim", 1, 0)
    record = [m["params"] for m in manifest.modules if m["module"] == "compress"][0]
    assert record["codecs"] == {"f": "zfp"} and record["lossy_error_bounds"] == {"f": 1e-5}


def test_veloc_verify_fails_a_damaged_compressed_copy(dirs, cfg, capsys):
    from veloc.cli import main
    ini = dirs["tmp"] / "c.ini"
    ini.write_text(f"scratch = {cfg['scratch']}\npersistent = {cfg['persistent']}\n[compress]\nenabled = true\n")
    run_versions(cfg, [1], np.zeros((64, 64)), np.ones(100, np.float32))
    assert main(["verify", str(ini), "sim"]) == 0
    assert "compressed copy" in capsys.readouterr().out
    flip_bytes(pdir(dirs, 1) / "r0.vcz")
    assert main(["verify", str(ini), "sim"]) == 1
    out = capsys.readouterr().out
    assert "FAIL    persistent sim v1 rank 0" in out and "checksum mismatch" in out


def test_restore_to_scratch_rebuilds_the_raw_file_for_routed_files(dirs, cfg):
    grid = np.zeros((64, 64))
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid)
        c.checkpoint_begin("sim", 1)
        with open(c.route_file("notes.txt"), "w") as f:
            f.write("hello")
        c.checkpoint_mem()
        c.checkpoint_end()
    shutil.rmtree(dirs["scratch"])
    got = np.full_like(grid, 5.0)
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", got)
        c.restart_begin("sim", c.restart_test("sim"))
        c.recover_mem()
        with open(c.route_file("notes.txt")) as f:
            assert f.read() == "hello"
        c.restart_end()
        assert c.last_restart.level == "persistent"
    assert got.tobytes() == grid.tobytes()
    scratch_vdir = next(dirs["scratch"].iterdir()) / "sim" / "v1"
    with RankFile(scratch_vdir / "r0.vck") as rf:
        assert rf.region("grid") is not None


def test_show_and_extract_read_a_compressed_file(tmp_path):
    from veloc.cli.inspect import describe_rankfile, extract_region
    field = np.sin(np.linspace(0, 9, 50_000))
    grid = np.zeros((200, 100))
    path = compress(tmp_path, [Region("g", grid), Region("f", field, lossy=("zfp", 1e-4))], "zstd")
    info = describe_rankfile(path)
    assert info["compressed"] and info["raw_size"] == (tmp_path / "r0.vck").stat().st_size
    by_id = {r["id"]: r for r in info["regions"]}
    assert (by_id["g"]["codec"], by_id["f"]["codec"], by_id["f"]["error_bound"]) == ("zstd", "zfp", 1e-4)
    assert by_id["g"]["stored"] < grid.nbytes / 100
    extract_region(path, "f", tmp_path / "f.npy")
    assert np.abs(np.load(tmp_path / "f.npy") - field).max() <= 1e-4


def test_compress_follows_the_flush(dirs, cfg):
    grid = np.zeros((64, 64))
    cfg = dict(cfg, flush={"every": "2"})
    with veloc.init_single(0, cfg) as c:
        c.protect("grid", grid)
        for v in (1, 2, 3):
            c.checkpoint("sim", v)
    scratch = next(dirs["scratch"].iterdir()) / "sim"
    assert [(scratch / f"v{v}" / "r0.vcz").exists() for v in (2, 3)] == [False, True]
    assert [(pdir(dirs, v) / "r0.vcz").exists() for v in (1, 3)] == [True, True]
    assert not pdir(dirs, 2).exists()
    off = dict(cfg, persistent_interval="-1")
    with veloc.init_single(0, off) as c:
        c.protect("grid", grid)
        c.checkpoint("sim", 4)
    assert not (scratch / "v4" / "r0.vcz").exists()
