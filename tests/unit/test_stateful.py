"""protect_stateful over plain Python/numpy Stateful objects and the RNG wrappers (no torch).

Run without mpiexec (mpi4py singleton on COMM_SELF).
"""
import json
import random

import numpy as np
import pytest

import veloc
from veloc.storage.rankfile import RankFile, build_header
from veloc.errors import CheckpointError, RestartError
from veloc.training import NumpyRNGState, PythonRNGState, RNGState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


class Trainer:
    """A Stateful with nested containers, shared arrays and plain values."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.w = rng.random((32, 16))
        self.m = np.zeros((32, 16), np.float32)
        self.step = 0
        self.groups = [{"lr": 0.1, "params": [0, 1]}]
        self.loaded = 0

    def state_dict(self):
        return {"params": {"w": self.w, "tied": self.w},
                "state": {0: {"m": self.m, "step": self.step}},
                "groups": self.groups, "shape": (32, 16)}

    def load_state_dict(self, state):
        assert state["params"]["w"] is state["params"]["tied"]
        self.w = state["params"]["w"]
        self.m = state["state"][0]["m"]
        self.step = state["state"][0]["step"]
        self.groups = state["groups"]
        self.loaded += 1

    def train(self):
        self.w *= 0.5
        self.m += 1
        self.step += 1
        self.groups[0]["lr"] *= 0.9


def leaf_ids(path):
    with RankFile(path) as f:
        return [r.id for r in f.regions]


@pytest.mark.parametrize("two_phase", [False, True], ids=["checkpoint", "snapshot"])
def test_round_trip_in_place_and_tied_leaf_written_once(cfg, dirs, two_phase):
    t = Trainer(0)
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("trainer", t)
        t.train()
        t.train()
        expected = (t.w.copy(), t.m.copy(), t.step, json.dumps(t.groups))
        if two_phase:
            c.snapshot("tr", 2)
            with c.guard():
                t.train()
        else:
            c.checkpoint("tr", 2)
    ids = leaf_ids(dirs["persistent"] / "tr" / "v2" / "r0.vck")
    assert ids == ["trainer", "trainer/params/w", "trainer/state/0/m"]     # tied: written once
    fresh = Trainer(1)
    w_obj, m_obj = fresh.w, fresh.m
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("trainer", fresh)
        c.restart("tr", c.restart_test("tr"))
    assert fresh.loaded == 1 and fresh.w is w_obj and fresh.m is m_obj      # in place
    assert np.array_equal(fresh.w, expected[0]) and np.array_equal(fresh.m, expected[1])
    assert fresh.step == expected[2] and json.dumps(fresh.groups) == expected[3]


def test_new_leaves_are_created_when_the_live_state_lacks_them(cfg):
    class Growing:
        def __init__(self):
            self.state = {}

        def state_dict(self):
            return {"state": self.state}

        def load_state_dict(self, sd):
            self.state = sd["state"]
    g = Growing()
    g.state["buf"] = np.arange(5, dtype=np.int16)
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("g", g)
        c.checkpoint("g", 1)
    empty = Growing()
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("g", empty)
        c.restart("g", 1)
    assert empty.state["buf"].dtype == np.int16 and list(empty.state["buf"]) == [0, 1, 2, 3, 4]


def test_rng_states_round_trip(cfg):
    gen = np.random.default_rng(7)
    mine = random.Random(3)
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("rng", RNGState())
        c.protect_stateful("gen", NumpyRNGState(gen))
        c.protect_stateful("mine", PythonRNGState(mine))
        random.seed(11)
        np.random.seed(12)
        c.snapshot("r", 1)
        c.wait_snapshot()
        draws = (random.random(), np.random.random(3).tolist(), gen.random(2).tolist(), mine.random())
    random.seed(0)
    np.random.seed(0)
    gen2, mine2 = np.random.default_rng(0), random.Random(0)
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("rng", RNGState())
        c.protect_stateful("gen", NumpyRNGState(gen2))
        c.protect_stateful("mine", PythonRNGState(mine2))
        c.restart("r", 1)
    assert (random.random(), np.random.random(3).tolist(), gen2.random(2).tolist(), mine2.random()) == draws


def test_bad_stateful_input(cfg):
    class Broken:
        def state_dict(self):
            raise ValueError("no state today")

        def load_state_dict(self, sd):
            raise ValueError("refused")
    with veloc.init_single(0, cfg) as c:
        with pytest.raises(CheckpointError, match="no state_dict"):
            c.protect_stateful("x", object())
        with pytest.raises(CheckpointError, match="invalid region id"):
            c.protect_stateful("a/b", Trainer(0))
        c.protect_stateful("b", Broken())
        with pytest.raises(CheckpointError, match="no state today"):
            c.checkpoint("b", 1)
        c.unprotect("b")
        c.protect_stateful("t", Trainer(0))
        c.checkpoint("b", 2)
        c.protect("t", np.zeros(3))                         # now an array under the same id
        with pytest.raises(RestartError, match="pickled object"):
            c.restart("b", 2)
        refusing = Broken()
        refusing.state_dict = lambda: Trainer(0).state_dict()
        c.protect_stateful("t", refusing)
        with pytest.raises(RestartError, match="load_state_dict.*refused"):
            c.restart("b", 2)


def test_rank_file_dtype_name_is_optional():
    header, infos, _ = build_header("n", 1, 0, [
        {"id": "old", "kind": "array", "dtype": "<f4", "shape": [2], "order": "C", "nbytes": 8},
        {"id": "bf", "kind": "array", "dtype": "<u2", "shape": [2], "order": "C", "nbytes": 4,
         "dtype_name": "bfloat16"}])
    body = json.loads(header[16:])
    assert "dtype_name" not in body["regions"][0]            # old layout unchanged for numpy regions
    assert body["regions"][1]["dtype_name"] == "bfloat16"
    assert infos[0].dtype_name == "" and infos[1].dtype_name == "bfloat16"
