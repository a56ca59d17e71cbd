"""cupy arrays are checkpointed through host memory and restored in place on their device.

Skips cleanly where cupy or a GPU is missing (CI never has one).
"""
import numpy as np
import pytest

import veloc

cupy = pytest.importorskip("cupy")
try:
    cupy.cuda.runtime.getDeviceCount()
except Exception:   # noqa: BLE001 - any CUDA failure means: no usable GPU here
    pytest.skip("no usable GPU", allow_module_level=True)


@pytest.mark.gpu
def test_cupy_round_trip_in_place(dirs):
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}
    with veloc.init_single(0, cfg) as c:
        g = cupy.arange(1 << 20, dtype=cupy.float32).reshape(1024, 1024)
        c.protect("g", g)
        c.checkpoint("gpu", 1)
        ref = cupy.asnumpy(g)
        g.fill(0)
        ptr = g.data.ptr
        c.restart("gpu", c.restart_test("gpu"))
        assert g.data.ptr == ptr and np.array_equal(cupy.asnumpy(g), ref)
