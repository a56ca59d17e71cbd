"""End to end: ``examples/heat.py`` with ``[compress] enabled = true``, sync and async.

The job checkpoints every ``EVERY`` iterations and is killed after ``FAIL_AT``; then all
scratch is lost (both virtual nodes), and the restart must come from the compressed
persistent copies (``r<rank>.vcz``, read in place) and end bit for bit equal to an
uninterrupted run. A damaged compressed copy of the newest version is refused by its
stored-bytes checksum and the job falls back to the older version.
"""
import shutil
from pathlib import Path

import pytest

import test_heat_restart as heat_e2e
from test_async_backend import ajob, drain_and_stop    # noqa: F401 (fixture)
from test_heat_restart import reference                               # noqa: F401 (fixture)
from conftest import flip_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def compress_config(dirs, mode, codec):
    cfg = heat_e2e.write_config(dirs)
    text = cfg.read_text().replace("mode = sync", f"mode = {mode}")
    cfg.write_text(text + f"[compress]\nenabled = true\ncodec = {codec}\nblock_size = 64K\n")
    return cfg


def persistent_files(dirs, version):
    return sorted(p.name for p in heat_e2e.version_dir(dirs["persistent"], version).iterdir())


def lose_all_scratch(dirs):
    for node in sorted(set(heat_e2e.NODES)):
        shutil.rmtree(Path(dirs["scratch"]) / node, ignore_errors=True)


def test_sync_heat_restarts_from_compressed_persistent(dirs, reference):
    cfg = compress_config(dirs, "sync", "zstd")
    out = dirs["tmp"] / "heat.npy"
    heat_e2e.crash(cfg, out)
    names = persistent_files(dirs, heat_e2e.FAIL_AT)
    for rank in range(len(heat_e2e.NODES)):
        assert f"r{rank}.vcz" in names and f"r{rank}.vck" not in names, names
    lose_all_scratch(dirs)
    version, levels = heat_e2e.restart(cfg, out)
    assert (version, levels) == (heat_e2e.FAIL_AT, {"persistent": 4})
    heat_e2e.assert_bit_exact(out, reference)


def test_sync_damaged_compressed_copy_falls_back_to_older_version(dirs, reference):
    cfg = compress_config(dirs, "sync", "zstd")
    out = dirs["tmp"] / "heat.npy"
    heat_e2e.crash(cfg, out)
    lose_all_scratch(dirs)
    flip_bytes(heat_e2e.version_dir(dirs["persistent"], heat_e2e.FAIL_AT) / "r1.vcz")
    version, levels = heat_e2e.restart(cfg, out)
    assert (version, levels) == (heat_e2e.FAIL_AT - heat_e2e.EVERY, {"persistent": 4})
    heat_e2e.assert_bit_exact(out, reference)


def test_async_heat_restarts_from_compressed_persistent(ajob, reference, monkeypatch):
    monkeypatch.setenv("VELOC_RUNTIME_DIR", ajob["env"]["VELOC_RUNTIME_DIR"])
    cfg = compress_config(ajob, "async", "auto")
    out = Path(ajob["tmp"]) / "heat.npy"
    heat_e2e.crash(cfg, out)
    for node in sorted(set(heat_e2e.NODES)):
        drain_and_stop(cfg, ajob, node)
    names = persistent_files(ajob, heat_e2e.FAIL_AT)
    # ranks 2 and 3 hold rows the heat has not reached yet: zeros, which auto compresses
    assert "r3.vcz" in names and "r3.vck" not in names, names
    lose_all_scratch(ajob)
    version, levels = heat_e2e.restart(cfg, out)
    assert (version, levels) == (heat_e2e.FAIL_AT, {"persistent": 4})
    heat_e2e.assert_bit_exact(out, reference)
