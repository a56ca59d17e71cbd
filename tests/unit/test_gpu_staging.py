"""GPU staging of snapshots: spare device memory vs pinned host memory.

The layout and mode decisions run everywhere on an emulated device (numpy memory behind
the device-operations interface, copies deferred until the wait like a real stream).
The cupy and torch CUDA cases need a GPU and skip cleanly without one.
"""
import numpy as np
import pytest

import veloc
import veloc.training.staging as staging
from veloc.training.gpu import DeviceMemoryWatch
from veloc.training.staging import Source, StagingBuffer

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


class FakeDev(np.ndarray):
    """Memory of the emulated device."""


class FakeOps:
    name = "fake"

    def __init__(self, free, total):
        self.free, self.total, self.device_allocs, self.pinned_allocs = free, total, 0, 0

    def device_of(self, arr):
        return 0

    def mem_info(self, device):
        return self.free, self.total

    def peak_extra(self, device):
        return 0

    def empty_device(self, nbytes, device):
        self.device_allocs += 1
        return np.zeros(nbytes, np.uint8).view(FakeDev)

    def empty_pinned(self, nbytes):
        self.pinned_allocs += 1
        return np.zeros(nbytes, np.uint8)

    def host_view(self, pinned, offset, nbytes):
        return pinned[offset:offset + nbytes]

    def slice(self, arena, offset, nbytes):
        return arena[offset:offset + nbytes]

    def start(self, device):
        return []                                   # a "stream": the copies queued on it

    def copy_to_device(self, dst, src, stream, device):
        stream.append((dst, src.copy()))            # the value at enqueue time, as on a real stream

    copy_to_host = copy_to_device

    def finish(self, stream, device):
        return stream

    def wait(self, event):
        for dst, src in event:
            np.copyto(dst, src)

    def device_to_host(self, dst, src, device):
        np.copyto(dst, src)


@pytest.fixture
def fake(monkeypatch):
    ops = FakeOps(free=900 * MiB, total=1000 * MiB)
    monkeypatch.setattr(staging, "ops_for", lambda obj: ops)
    return ops


def device_sources(arrays):
    out = []
    for i, arr in enumerate(arrays):
        desc = {"id": f"d{i}", "kind": "array", "dtype": "<f4", "shape": [arr.size], "order": "C",
                "nbytes": arr.nbytes}
        out.append(Source(desc, device=arr.view(np.uint8).view(FakeDev)))
    return out


@pytest.mark.parametrize("free_mib, mode", [(900, "device"), (40, "pinned")])
def test_mode_follows_spare_device_memory_and_buffers_are_reused(fake, free_mib, mode):
    fake.free = free_mib * MiB
    settings = {"device_staging": "auto", "device_margin_mib": 64, "max_in_flight": 1}
    buf = StagingBuffer(settings)
    arrays = [np.arange(1000, dtype=np.float32) + i for i in range(3)]
    host = np.arange(10, dtype=np.int64)
    for round_ in range(3):
        for arr in arrays:
            arr += 1
        sources = device_sources(arrays) + [Source({"id": "h", "kind": "array", "dtype": "<i8", "shape": [10],
                                                    "order": "C", "nbytes": 80}, host=host.view(np.uint8))]
        copy = buf.stage(sources)
        expected = [a.copy() for a in arrays]
        copy.copy_host()
        for arr in arrays:
            arr[:] = -1                               # mutated after the guard
        snaps = copy.snaps()
        for (desc, view), want in zip(snaps, expected):
            assert np.array_equal(np.frombuffer(view, np.float32), want), (round_, desc["id"])
        assert np.array_equal(np.frombuffer(snaps[-1][1], np.int64), host)
        for arr, want in zip(arrays, expected):
            arr[:] = want
    assert buf.device_modes == {("fake", 0): mode}
    assert buf.allocations == 2                       # one host arena and one device-side arena, ever
    assert (fake.device_allocs, fake.pinned_allocs) == ((1, 0) if mode == "device" else (0, 1))


def test_forced_modes_and_peak_tracking(fake):
    for mode in ("device", "pinned"):
        buf = StagingBuffer({"device_staging": mode, "device_margin_mib": 0, "max_in_flight": 1})
        copy = buf.stage(device_sources([np.ones(10, np.float32)]))
        copy.copy_host()
        assert buf.device_modes[("fake", 0)] == mode
    watch = DeviceMemoryWatch()
    fake.free = 100 * MiB                             # 900 MiB in use at the peak
    assert not watch.fits(fake, 0, 150 * MiB, 0)
    fake.free = 900 * MiB                             # usage dropped, but the peak is remembered
    assert not watch.fits(fake, 0, 150 * MiB, 0)
    assert watch.fits(fake, 0, 50 * MiB, 0)


# ---------------------------------------------------------------- real GPUs


def _cupy_with_gpu():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


def _torch_with_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    return torch


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["device", "pinned"])
def test_cupy_snapshot_restores_in_place_on_its_device(cfg, mode):
    cupy = _cupy_with_gpu()
    cfg = cfg | {"snapshot": {"device_staging": mode}}
    with veloc.init_single(0, cfg) as c:
        x = cupy.arange(1 << 20, dtype=cupy.float32)
        c.protect("x", x)
        for v in range(1, 4):
            x += 1
            c.snapshot("g", v)
            with c.guard():
                x *= -1                                     # the update, queued right after
            x *= -1
        c.checkpoint_wait()
        assert c.snapshot_stats["device_modes"] == {f"cupy:{x.device.id}": mode}
    with veloc.init_single(0, cfg) as c:
        y = cupy.zeros(1 << 20, dtype=cupy.float32)
        c.protect("x", y)
        c.restart("g", 3)
        assert bool((y == cupy.arange(1 << 20, dtype=cupy.float32) + 3).all())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["device", "pinned"])
def test_torch_cuda_state_bit_exact(cfg, mode):
    torch = _torch_with_gpu()
    cfg = cfg | {"snapshot": {"device_staging": mode}}
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda().to(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = model(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("model", model)
        c.protect_stateful("opt", opt)
        step()
        at_v1 = {k: v.clone() for k, v in model.state_dict().items()}
        c.snapshot("tc", 1)
        with c.guard():
            step()                                          # mutates right after the guard
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        c.checkpoint_wait()
        assert c.snapshot_stats["device_modes"] == {f"torch:{model.weight.device.index}": mode}
    weight = model.weight
    with veloc.init_single(0, cfg) as c:
        c.protect_stateful("model", model)
        c.protect_stateful("opt", opt)
        c.restart("tc", 1)
    assert model.weight is weight and model.weight.is_cuda   # in place, on its device
    assert not torch.equal(model.weight, saved["weight"])    # v1 predates the guarded step
    for key, value in model.state_dict().items():
        assert torch.equal(value, at_v1[key]), key
    assert opt.state_dict()["state"][0]["step"].item() == 1
