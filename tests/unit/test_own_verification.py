"""restart_test: each rank checks its own scratch or persistent copy itself (all ranks at
once); the node's engine checks only the ranks that could not, and a corrupt copy falls
back to the next level or an older version, arrays untouched until the read."""
import numpy as np
import pytest

import veloc
from veloc.engine.pipeline import Engine
from conftest import flip_bytes, rank0_file, two_versions_newest_corrupt


@pytest.fixture
def engine_checks(monkeypatch):
    """The ranks the engine is asked to verify, per call that asks for any (the engine
    is called with no rank too: its collective modules need every node)."""
    calls = []
    real = Engine.verify

    def spy(self, name, version, ranks, nranks=None):
        if ranks:
            calls.append(list(ranks))
        return real(self, name, version, ranks, nranks)
    monkeypatch.setattr(Engine, "verify", spy)
    return calls


def test_an_intact_scratch_copy_is_checked_by_the_rank_not_the_engine(node_cfg, engine_checks):
    a = np.arange(5000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        a[:] = -1
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        assert c.last_restart.level == "scratch" and np.array_equal(a, np.arange(5000.0))
    assert engine_checks == []


def test_a_corrupt_scratch_copy_is_read_from_persistent_checked_by_the_rank(node_cfg, dirs, engine_checks):
    a = np.arange(5000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        flip_bytes(rank0_file(dirs, "h", 1, "scratch"))
        a[:] = -1
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(5000.0))
    assert engine_checks == []


def test_no_intact_copy_asks_the_engine_and_falls_back_to_an_older_version(node_cfg, dirs, engine_checks):
    a = np.arange(5000.0)
    with veloc.init_single(0, node_cfg) as c:
        two_versions_newest_corrupt(c, a, dirs)
        assert c.restart_test("h") == 1
        assert (a == -1).all()                    # nothing restored by the agreement
        c.restart("h", 1)
        assert np.array_equal(a, np.arange(5000.0))
    assert engine_checks == [[0]]                 # v2: the engine says why; v1: the rank's own check


def test_a_copy_changed_after_the_check_is_found_on_read_and_replaced(node_cfg, dirs):
    """The read hashes the changed copy as it fills the array, finds it corrupt, and every
    rank checks its copies again: the array ends up holding the persistent copy."""
    a = np.arange(5000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        assert c.restart_test("h") == 1
        flip_bytes(rank0_file(dirs, "h", 1, "scratch"))
        a[:] = -1
        c.restart("h", 1)
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(5000.0))


def test_a_copy_changed_after_the_check_with_no_other_copy_names_the_version_left(dirs):
    a = np.arange(5000.0)
    with veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")}) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        a += 1
        c.checkpoint("h", 2)
        assert c.restart_test("h") == 2
        flip_bytes(rank0_file(dirs, "h", 2, "scratch"))
        a[:] = -1
        with pytest.raises(veloc.RestartError, match="mismatch.*no other intact copy of v2.*is now 1"):
            c.restart("h", 2)
        assert c.last_restart is None
        c.restart("h", 1)
        assert c.last_restart.version == 1 and np.array_equal(a, np.arange(5000.0))
