"""Config parsing: VELOC files unchanged, sections, env overrides, and every bad input."""
import pytest

from veloc.config import load_config, node_id
from veloc.errors import ConfigError

VELOC_STYLE = """
# VELOC's own format: no section header
scratch = /dev/shm/x/{node}
persistent = /tmp/p   ; inline comment
mode = async
persistent_interval = 30
ec_interval = -1
watchdog_interval = 5
max_versions = 3
scratch_versions = 1
failure_domain = rack1
chksum = false
meta = /tmp/meta
max_parallelism = 4
axl_type = AXL_XFER_SYNC
log_prefix = /tmp/logs
"""


def write(tmp_path, text):
    path = tmp_path / "cfg.ini"
    path.write_text(text)
    return path


def test_veloc_file_works_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, VELOC_STYLE), environ={})
    assert cfg.mode == "async" and cfg.persistent_interval == 30 and cfg.ec_interval == -1
    assert cfg.max_versions == 3 and cfg.scratch_versions == 1 and cfg.chksum is False
    assert cfg.persistent == "/tmp/p" and cfg.failure_domain == "rack1"
    assert str(cfg.scratch_dir("n7")) == "/dev/shm/x/n7"


def test_defaults_and_sections(tmp_path):
    cfg = load_config(write(tmp_path, "scratch = /s\n[checksum]\nalgorithm = xxh3_64\n[flush]\nevery = 3\n"),
                      environ={})
    assert cfg.mode == "sync" and cfg.persistent is None and cfg.chksum is True
    assert cfg.section("checksum")["algorithm"] == "xxh3_64"
    assert cfg.section("flush")["every"] == 3 and cfg.section("flush")["priority"] == 50
    assert cfg.section("versioning")["priority"] == 90


def test_mapping_and_environment_overrides(tmp_path):
    env = {"VELOC_MODE": "async", "VELOC_FLUSH_EVERY": "4", "VELOC_NODE_ID": "ignored-here"}
    cfg = load_config({"scratch": "/s/{rank}", "mode": "sync", "flush": {"priority": 55}}, environ=env)
    assert cfg.mode == "async"
    assert cfg.section("flush")["every"] == 4 and cfg.section("flush")["priority"] == 55
    assert str(cfg.scratch_dir("n", 3)) == "/s/3"


def test_config_is_frozen():
    cfg = load_config({"scratch": "/s"}, environ={})
    with pytest.raises(Exception):
        cfg.values["mode"] = "async"
    with pytest.raises(Exception):
        cfg.sections = {}


@pytest.mark.parametrize("text, needle", [
    ("persistent = /p\n", "'scratch' is required"),
    ("scratch = /s\nmode = turbo\n", "accepted values are sync, async"),
    ("scratch = /s\nmax_versions = two\n", "'max_versions' = 'two': expected an integer"),
    ("scratch = /s\nscratch_versions = -1\n", "must be >= 0"),
    ("scratch = /s\nscrach_versions = 1\n", "unknown config key 'scrach_versions'"),
    ("scratch = /s\nchksum = maybe\n", "expected a boolean"),
    ("scratch = /s/{host}\n", "unknown placeholder"),
    ("scratch = /s\n[flsuh]\nevery = 1\n", "unknown config section [flsuh]"),
    ("scratch = /s\n[flush]\nevry = 1\n", "unknown config key 'evry' in [flush]"),
    ("scratch = /s\n[flush]\nevery = 0\n", "flush.every"),
    ("scratch = \n", "'scratch' is empty"),
    ("scratch = /s\nscratch = /t\n", "cannot parse"),
    ("scratch /s\n", "cannot parse"),
])
def test_bad_config_is_a_clear_config_error(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match="INI path, a mapping"):
        load_config(42)


def test_bad_env_override_names_the_key():
    with pytest.raises(ConfigError, match="max_versions"):
        load_config({"scratch": "/s"}, environ={"VELOC_MAX_VERSIONS": "lots"})


def test_node_identity():
    assert node_id({"VELOC_NODE_ID": "n3"}) == "n3"
    assert node_id({})   # host name
    with pytest.raises(ConfigError):
        node_id({"VELOC_NODE_ID": "../etc"})


def test_shipped_configs_parse():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.ini")):
        load_config(path, environ={})
