"""VELOC compatibility of the configuration: every key VELOC's runtime reads is accepted,
keys without an effect here are logged once at INFO, and the default scratch rotation."""
import logging

import numpy as np
import pytest

import veloc
from veloc import config as config_mod
from veloc.config import COMPAT_ONLY, DEFAULT_SCRATCH_VERSIONS, TOP_KEYS, load_config
from veloc.errors import ConfigError

# Every top-level key VELOC's C++ runtime reads (config reader, client, backend, modules).
VELOC_KEYS = {
    "scratch": "/s/{node}", "persistent": "/p", "mode": "sync", "persistent_interval": "0",
    "ec_interval": "0", "watchdog_interval": "5", "max_versions": "2", "scratch_versions": "1",
    "failure_domain": "rack1", "chksum": "true", "meta": "/tmp/meta", "max_parallelism": "4",
    "axl_type": "AXL_XFER_SYNC", "axl_config": "/tmp/axl.cfg", "threaded": "true",
    "aggregated": "false", "cache": "/tmp/cache", "daos_pool": "pool0", "daos_cont": "cont0",
    "log_prefix": "/tmp/logs",
}


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(config_mod, "_told", set())
    caplog.set_level(logging.INFO, logger="veloc.config")
    return caplog


def test_every_veloc_key_is_accepted(tmp_path, fresh_log):
    assert set(VELOC_KEYS) <= set(TOP_KEYS)
    ini = tmp_path / "veloc.cfg"
    ini.write_text("".join(f"{k} = {v}\n" for k, v in VELOC_KEYS.items()))
    cfg = load_config(ini, environ={})
    assert cfg.threaded is True and cfg.axl_config == "/tmp/axl.cfg" and cfg.aggregated is False
    assert cfg.scratch_versions == 1 and cfg.max_parallelism == 4
    told = [r.getMessage() for r in fresh_log.records if r.name == "veloc.config"]
    assert all(r.levelno == logging.INFO for r in fresh_log.records if r.name == "veloc.config")
    for key in COMPAT_ONLY:
        lines = [m for m in told if m.startswith(f"config key {key} is accepted for VELOC compatibility "
                                                 "and has no effect here")]
        assert len(lines) == 1, (key, told)
    mapped = set(VELOC_KEYS) - set(COMPAT_ONLY)
    assert not [m for m in told if any(f"config key {k} " in m for k in mapped)]


def test_compat_keys_are_logged_once_per_process(fresh_log):
    for _ in range(3):
        load_config({"scratch": "/s", "threaded": "true", "axl_config": "/a"}, environ={})
    msgs = [r.getMessage() for r in fresh_log.records if r.name == "veloc.config"]
    assert len(msgs) == 2 and sum("threaded" in m for m in msgs) == 1
    load_config({"scratch": "/s"}, environ={"VELOC_AGGREGATED": "true"})     # env overrides too
    assert any("config key aggregated" in r.getMessage() for r in fresh_log.records)


@pytest.mark.parametrize("text, needle", [
    ("threaded = maybe\n", "'threaded' = 'maybe': expected a boolean"),
    ("axl_config = \n", "'axl_config' is empty"),
    ("aggregated = 2\n", "expected a boolean"),
    ("daos_pool = \n", "'daos_pool' is empty"),
    ("thredaed = true\n", "unknown config key 'thredaed'"),
])
def test_bad_compat_values_are_config_errors(tmp_path, text, needle):
    ini = tmp_path / "c.ini"
    ini.write_text("scratch = /s\n" + text)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(ini, environ={})


def test_default_scratch_rotation():
    cfg = load_config({"scratch": "/s"}, environ={})
    assert cfg.scratch_versions == DEFAULT_SCRATCH_VERSIONS == 2
    assert load_config({"scratch": "/s", "scratch_versions": 0}, environ={}).scratch_versions == 0


def _scratch_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.vck"))


def test_default_config_recycles_files_and_bounds_scratch(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    root = dirs["scratch"] / "n0"
    client = veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")})
    data = np.arange(100_000, dtype=np.float64)
    client.protect("d", data)
    inodes = set()
    for version in range(1, 9):
        data += 1
        client.checkpoint("rot", version)
        inodes.add((root / "rot" / f"v{version}" / "r0.vck").stat().st_ino)
        assert len(list(root.glob("rot/v*/r0.manifest.json"))) <= DEFAULT_SCRATCH_VERSIONS
    client.finalize()
    files = _scratch_files(root)
    kept = [f for f in files if not f.startswith(".recycle/")]
    assert kept == ["rot/v7/r0.vck", "rot/v8/r0.vck"], files
    assert len(files) <= DEFAULT_SCRATCH_VERSIONS + 2      # rotation + recycle pool
    assert len(inodes) <= DEFAULT_SCRATCH_VERSIONS + 2, "scratch files were not recycled"
    again = veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")})
    out = np.zeros_like(data)
    again.protect("d", out)
    assert again.restart_test("rot") == 8
    again.restart("rot", 8)
    assert np.array_equal(out, data)
    again.finalize()


def test_keep_all_is_still_available(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    client = veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}"), "scratch_versions": 0})
    client.protect("d", np.zeros(10))
    for version in range(1, 6):
        client.checkpoint("all", version)
    client.finalize()
    assert len(list((dirs["scratch"] / "n0" / "all").glob("v*/r0.manifest.json"))) == 5
