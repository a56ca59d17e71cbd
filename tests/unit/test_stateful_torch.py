"""PyTorch state through protect_stateful: model + Adam + LR scheduler + GradScaler + RNG,
bit-exact across a restart, bfloat16 and float8 included (CPU; GPU cases are in
test_gpu_staging.py). Skipped when the torch extra is not installed.
"""
import subprocess
import sys

import numpy as np
import pytest

import veloc
from veloc.storage.rankfile import RankFile
from veloc.training import RNGState

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


class Job:
    """A small bf16/fp32 model trained with Adam, a step LR schedule and dropout."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Dropout(0.2), torch.nn.BatchNorm1d(24),
                                         torch.nn.Linear(24, 24), torch.nn.Linear(24, 3))
        self.model[3].to(torch.bfloat16)
        self.model[4].weight = torch.nn.Parameter(self.model[4].weight)   # plain fp32 head
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def protect(self, c):
        c.protect_stateful("model", self.model)
        c.protect_stateful("opt", self.opt)
        c.protect_stateful("sched", self.sched)
        c.protect_stateful("scaler", self.scaler)
        c.protect_stateful("rng", RNGState())

    def step(self):
        x = torch.randn(8, 12)
        h = self.model[2](self.model[1](self.model[0](x)))
        loss = self.model[4](self.model[3](h.to(torch.bfloat16)).float()).square().mean()
        self.opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.item()

    def weights(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}


@pytest.mark.parametrize("two_phase", [False, True], ids=["checkpoint", "snapshot"])
def test_restarted_training_is_bit_identical(cfg, dirs, two_phase):
    job = Job()
    with veloc.init_single(0, cfg) as c:
        job.protect(c)
        for _ in range(3):
            job.step()
        if two_phase:
            c.snapshot("t", 3)
            with c.guard():
                pass
        else:
            c.checkpoint("t", 3)
        losses = [job.step() for _ in range(4)]
        weights, opt_state = job.weights(), job.opt.state_dict()
    with RankFile(dirs["persistent"] / "t" / "v3" / "r0.vck") as f:
        names = {r.id: r.dtype_name for r in f.regions}
    assert names["model/3.weight"] == "bfloat16" and names["opt/state/0/exp_avg"] == "float32"
    assert names["opt/state/0/step"] == "float32" and names["rng/torch/cpu"] == "uint8"

    again = Job(seed=1)                 # different init, no optimizer state yet
    param = again.model[0].weight
    with veloc.init_single(0, cfg) as c:
        again.protect(c)
        c.restart("t", c.restart_test("t"))
    assert again.model[0].weight is param                  # restored in place
    assert again.opt.state_dict()["state"][0]["step"].item() == 3
    assert again.sched.last_epoch == 3 and again.scaler.get_scale() == job_scale_after(3)
    assert [again.step() for _ in range(4)] == losses
    for key, value in again.weights().items():
        assert value.dtype == weights[key].dtype and torch.equal(value, weights[key]), key
    for pid, state in again.opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_state["state"][pid][name]), (pid, name)


def job_scale_after(steps):
    job = Job()
    for _ in range(steps):
        job.step()
    return job.scaler.get_scale()


def test_float8_tied_and_strided_tensors(cfg, dirs):
    class Holder:
        def __init__(self):
            base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
            self.sd = {"f8": torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn),
                       "f8b": torch.linspace(-1, 1, 8).to(torch.float8_e5m2),
                       "tied_a": base, "tied_b": base, "strided": base.t(), "half": torch.ones(3, dtype=torch.half),
                       "flag": torch.tensor(True), "np": np.arange(4, dtype=np.uint16), "empty": torch.empty(0, 5)}

        def state_dict(self):
            return self.sd

        def load_state_dict(self, sd):
            self.sd = sd
    h = Holder()
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("h", h)
        c.snapshot("f", 1)
        with c.guard():
            h.sd["tied_a"].fill_(-7)           # mutated after the guard: must not leak in
    with RankFile(dirs["persistent"] / "f" / "v1" / "r0.vck") as f:
        ids = [r.id for r in f.regions]
    assert "h/tied_b" not in ids and "h/tied_a" in ids and "h/strided" in ids
    fresh = Holder()
    for t in fresh.sd.values():
        if torch.is_tensor(t) and t.dtype.is_floating_point:
            t.zero_() if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) else None
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("h", fresh)
        c.restart("f", 1)
    ref = Holder().sd
    for key, value in ref.items():
        got = fresh.sd[key]
        if isinstance(value, np.ndarray):
            assert np.array_equal(got, value)
        else:
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.contiguous().view(torch.uint8) if got.numel() else got,
                               value.contiguous().view(torch.uint8) if value.numel() else value), key
    assert fresh.sd["tied_a"] is fresh.sd["tied_b"]


def test_module_state_dict_metadata_reaches_load_state_dict(cfg):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    seen = {}
    real = model.load_state_dict

    def spy(state, *args, **kwargs):
        seen["metadata"] = getattr(state, "_metadata", None)
        return real(state, *args, **kwargs)
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("m", model)
        c.checkpoint("md", 1)
        model.load_state_dict = spy
        c.restart("md", 1)
    assert seen["metadata"] == model.state_dict()._metadata and "1" in seen["metadata"]


def test_core_never_imports_torch():
    code = "import sys, veloc, veloc.training; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
