"""The interval policy with injected timings (a simulated clock, no MPI)."""
import logging
import math

import pytest

from veloc.config import load_config
from veloc.errors import CheckpointError, ConfigError
from veloc.training.interval_models import daly_interval, first_order_waste, multilevel_plan, young_interval
from veloc.training.policy import CALM_WINDOWS, IntervalPolicy


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TrainingSim:
    """A training loop on a simulated clock: each iteration takes ``iter_s`` (times
    ``slowdown(busy)``), a checkpoint stalls ``stall_s`` and persists for ``persist_s``."""

    def __init__(self, iter_s=1.0, stall_s=0.06, persist_s=1.5, **policy):
        self.clock = Clock()
        section = {"mode": "auto", "overhead": 0.05, "warmup": 5, **policy}
        self.policy = IntervalPolicy(section, clock=self.clock)
        self.iter_s, self.stall_s, self.persist_s = iter_s, stall_s, persist_s
        self.persist_end = None
        self.iteration = 0
        self.checkpoints = []

    def run(self, n, slowdown=1.0, only_while_persisting=False):
        for _ in range(n):
            busy = self.persist_end is not None
            factor = slowdown if (busy or not only_while_persisting) else 1.0
            self.clock.t += self.iter_s * factor
            if self.persist_end is not None and self.clock.t >= self.persist_end:
                self.policy.record_persist(self.persist_s)
                self.persist_end = None
            self.iteration += 1
            if self.policy.need_checkpoint(self.iteration):
                self.checkpoints.append(self.iteration)
                if self.persist_end is not None:        # one persist in flight at most: wait for it
                    self.policy.record_stall(self.persist_end - self.clock.t, for_buffer=True)
                    self.clock.t = self.persist_end
                    self.policy.record_persist(self.persist_s)
                self.policy.record_snapshot(self.stall_s)
                self.clock.t += self.stall_s
                self.persist_end = self.clock.t + self.persist_s

    def windows(self):
        return [b - a for a, b in zip(self.checkpoints, self.checkpoints[1:])]


def test_auto_profiles_then_picks_the_model_interval():
    sim = TrainingSim()
    sim.run(60)
    # stall 0.06 s over a 1 s iteration at a 5 % bound needs k >= 2; the 1.5 s persist, k - 1 >= 2
    assert sim.policy.k == 3
    assert sim.checkpoints[0] == 6                       # first call + a warm-up of 5
    assert sim.windows()[-5:] == [3] * 5
    d = sim.policy.last_decision
    assert d["Ti"] == pytest.approx(1.0) and d["stall"] == pytest.approx(0.06) and d["persist"] == 1.5


def test_persist_time_bounds_k_from_below():
    sim = TrainingSim(stall_s=0.01, persist_s=7.5)
    sim.run(200)
    assert sim.policy.k == 9                             # (k - 1) Ti >= Ts


@pytest.mark.parametrize("only_while_persisting", [False, True], ids=["all_iterations", "interference"])
def test_2x_slowdown_raises_k_within_2_windows_and_k_returns_after(only_while_persisting):
    sim = TrainingSim()
    sim.run(40)
    k0 = sim.policy.k
    start = len(sim.checkpoints)
    sim.run(2 * k0 + 1, slowdown=2.0, only_while_persisting=only_while_persisting)
    assert len(sim.checkpoints) - start <= 2 and sim.policy.k > k0   # raised at the 1st or 2nd boundary
    sim.run(60, slowdown=2.0, only_while_persisting=only_while_persisting)
    if only_while_persisting:       # the checkpoint itself costs more: k stays up while it does
        assert sim.policy.k > 2 * k0
    for _ in range(100):                                             # slowdown over: k comes back down
        sim.run(10)
        if sim.policy.k == k0:
            break
    assert sim.policy.k == k0
    sim.run(100)
    assert sim.policy.k == k0                                        # and stays there


def test_k_is_lowered_only_after_calm_windows():
    sim = TrainingSim(stall_s=0.01, persist_s=0.5)
    sim.run(30)
    sim.policy.k, sim.policy._calm = 20, 0               # as after a burst of interference
    sim.policy._next_sync = sim.iteration + 20
    before = len(sim.checkpoints)
    sim.run(20 * (CALM_WINDOWS - 1))
    assert sim.policy.k == 20 and len(sim.checkpoints) - before == CALM_WINDOWS - 1
    sim.run(20)
    assert sim.policy.k == math.floor(20 / 1.5)


def test_interval_caps_auto_k():
    sim = TrainingSim(stall_s=1.0, persist_s=0.5, interval=4)
    sim.run(40)
    assert sim.policy.k == 4


def test_fixed_interval_every_n_iterations():
    p = IntervalPolicy({"mode": "fixed", "interval": 3})
    assert [i for i in range(0, 13) if p.need_checkpoint(i)] == [0, 3, 6, 9, 12]


def test_fixed_seconds_turns_into_iterations():
    sim = TrainingSim(mode="fixed", seconds=10.0, stall_s=0.0, persist_s=0.1)
    sim.run(40)
    assert sim.checkpoints[0] == 6 and sim.windows() == [10, 10, 10]


def test_restart_at_an_earlier_iteration_profiles_again():
    sim = TrainingSim()
    sim.run(30)
    before = list(sim.checkpoints)
    sim.iteration = 10                                   # the loop resumes from iteration 10
    sim.run(5)
    assert sim.checkpoints == before                     # warming up again: no decision yet
    sim.run(1)
    assert sim.checkpoints[-1] == 16                     # first call (11) + a warm-up of 5


def test_mtbf_reports_young_and_daly(caplog):
    sim = TrainingSim(mtbf=3600.0)
    with caplog.at_level(logging.INFO, logger="veloc.policy"):
        sim.run(30)
    d = sim.policy.last_decision
    assert d["young_s"] == pytest.approx(math.sqrt(2 * d["checkpoint_cost"] * 3600))
    assert d["young_k"] == round(d["young_s"] / d["Ti"]) and d["daly_s"] < d["young_s"]
    logged = [r.getMessage() for r in caplog.records if r.name == "veloc.policy"]
    assert logged and all("Ti=" in m and "stall=" in m for m in logged[1:])
    assert "young_s=" in logged[-1] and "k=3" in logged[-1]


def test_without_hooks_the_cost_is_measured_from_the_window():
    clock = Clock()
    p = IntervalPolicy({"mode": "auto", "overhead": 0.05, "warmup": 4}, clock=clock)
    ckpts = []
    for it in range(1, 80):
        clock.t += 1.0
        if p.need_checkpoint(it):
            ckpts.append(it)
            clock.t += 0.27                  # a blocking checkpoint no hook reports
    assert p.k == math.ceil(0.27 / 0.05)
    assert p.last_decision["stall"] == pytest.approx(0.27)


@pytest.mark.parametrize("section, key", [
    ({"mode": "fixed"}, "interval"),
    ({"mode": "auto", "overhead": 1.5}, "policy.overhead"),
])
def test_bad_policy_settings(section, key):
    with pytest.raises(ConfigError, match=key):
        IntervalPolicy(section)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_iteration(bad):
    with pytest.raises(CheckpointError, match="iteration"):
        IntervalPolicy({"mode": "fixed", "interval": 2}).need_checkpoint(bad)


def test_policy_section_in_config(tmp_path):
    cfg = load_config({"scratch": str(tmp_path), "policy": {"mode": "fixed", "interval": "7", "mtbf": "3600"}})
    assert cfg.section("policy")["interval"] == 7 and cfg.section("policy")["mtbf"] == 3600.0
    assert load_config({"scratch": str(tmp_path)}).section("policy")["mode"] == "auto"
    for bad, key in [({"mode": "sometimes"}, "policy.mode"), ({"overhead": "lots"}, "policy.overhead"),
                     ({"seconds": "-4"}, "policy.seconds"), ({"mtbf": "inf"}, "policy.mtbf"),
                     ({"intervall": "3"}, "intervall"), ({"mode": "fixed"}, "needs 'interval'"),
                     ({"overhead": "1.5"}, "policy.overhead")]:
        with pytest.raises(ConfigError, match=key):
            load_config({"scratch": str(tmp_path), "policy": bad})


def test_interval_models():
    assert young_interval(20, 6 * 3600) == pytest.approx(929.5, abs=0.5)
    assert daly_interval(20, 6 * 3600) == pytest.approx(916, abs=1)
    assert daly_interval(10, 4) == 4
    assert first_order_waste(2, 200, 20) == pytest.approx(0.15)
    plan = multilevel_plan([("scratch", 0.5, 6 * 3600), ("partner", 2, 24 * 3600), ("persistent", 20, 168 * 3600)])
    assert [round(p.young) for p in plan] == [147, 588, 4919]
    assert plan[1].period == plan[1].multiple * plan[0].period and plan[1].multiple == 4
    assert sum(p.overhead for p in plan) == pytest.approx(0.0217, abs=0.001)
    with pytest.raises(ValueError, match="partner mtbf"):
        multilevel_plan([("scratch", 1, 10), ("partner", 1, 0)])


def test_noisy_iterations_do_not_ratchet_k_up():
    """Iteration times jitter by +-30 % with no checkpoint cost behind it: a window's excess
    within its own noise does not raise k (without that guard k climbs to 18 here)."""
    import numpy as np
    sim = TrainingSim()
    rng = np.random.default_rng(1)
    ks = []
    for _ in range(600):
        sim.iter_s = 1.0 + rng.uniform(-0.3, 0.3)
        sim.run(1)
        ks.append(sim.policy.k)
    assert max(ks[50:]) <= 5 and ks[-1] <= 5
    assert "noise" in sim.policy.last_decision
