"""Pipeline manager: modules ordered by configurable priority, errors named, levels fastest first."""
import pytest

from veloc.config import load_config
from veloc.engine.module import CHECKPOINT, Command, Module
from veloc.engine.pipeline import Engine
from veloc.errors import CheckpointError


def engine(tmp_path, **sections):
    cfg = {"scratch": str(tmp_path / "s"), "persistent": str(tmp_path / "p")}
    cfg.update(sections)
    return Engine(load_config(cfg, environ={}), "n0")


def names(e):
    return [name for name, _ in e.describe()]


def test_default_order(tmp_path):
    assert names(engine(tmp_path)) == ["scratch", "checksum", "flush", "versioning"]


def test_priority_is_configurable(tmp_path):
    e = engine(tmp_path, checksum={"priority": 60}, versioning={"priority": 5})
    assert names(e) == ["scratch", "versioning", "flush", "checksum"]
    assert [m.level for m in e.levels] == ["scratch", "persistent"]


def test_disabled_modules_and_levels(tmp_path):
    e = engine(tmp_path, flush={"enabled": False}, checksum={"enabled": "no"})
    assert names(e) == ["scratch", "versioning"] and [m.level for m in e.levels] == ["scratch"]
    cfg = load_config({"scratch": str(tmp_path / "s"), "chksum": False}, environ={})
    assert "checksum" not in names(Engine(cfg, "n0")) and "flush" not in names(Engine(cfg, "n0"))


def test_failing_module_is_named(tmp_path, monkeypatch):
    e = engine(tmp_path)

    def boom(self, cmd):
        raise OSError(28, "No space left on device")
    flush = next(m for m in e.modules if m.name == "flush")
    monkeypatch.setattr(type(flush), "checkpoint", boom)
    with pytest.raises(CheckpointError, match=r"node n0: module flush failed on x v3: .*No space"):
        e.checkpoint(Command(CHECKPOINT, "x", 3, [0], 1))


def test_every_n_versions(tmp_path):
    e = engine(tmp_path, flush={"every": 3})
    flush = next(m for m in e.modules if m.name == "flush")
    assert [flush.due(Command(CHECKPOINT, "x", v, [0], 1)) for v in range(6)] == [True, False, False] * 2


def test_negative_persistent_interval_disables_flush(tmp_path):
    cfg = load_config({"scratch": str(tmp_path), "persistent": str(tmp_path / "p"), "persistent_interval": -1},
                      environ={})
    assert "flush" not in names(Engine(cfg, "n0"))


def test_base_module_is_not_my_business(tmp_path):
    m = Module(engine(tmp_path).ctx)
    cmd = Command(CHECKPOINT, "x", 1, [0], 1)
    assert m.checkpoint(cmd) is False and m.restart(cmd) is False and m.restore("x", 1, [0]) is False
