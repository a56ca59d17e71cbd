#!/usr/bin/env python3
"""GPU check for two-phase snapshots, for a machine with a CUDA device.

    python scripts/gpu_check.py [--mib 512] [--skip-tests]

1. runs the GPU cases of tests/unit/test_gpu_staging.py (cupy and torch CUDA, device
   and pinned staging, restored in place on the right device);
2. measures, with whichever of torch / cupy is installed, the staging bandwidth of a
   device-to-device copy, a device-to-pinned-host copy and a device-to-pageable-host
   copy of the same bytes, and veloc's own snapshot of that state in each staging mode
   (time until ``wait_snapshot`` returns), each as a ratio against the raw copy of its
   kind measured in the same run.

Exits non-zero when a test fails or when pinned staging through veloc reaches less
than 80 % of the raw pinned bandwidth. Prints one table; no files are written outside
a temporary folder that is removed at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pick_library():
    try:
        import torch
        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cupy"
    except Exception:
        pass
    return None


class Lib:
    """Raw copies with the chosen library, timed with device events."""

    def __init__(self, name, nbytes):
        self.name = name
        if name == "torch":
            import torch
            self.t = torch
            self.src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
            self.dev = torch.empty_like(self.src)
            self.pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.pageable = torch.empty(nbytes, dtype=torch.uint8)
        else:
            import cupy
            import numpy as np
            self.cp = cupy
            self.src = cupy.random.randint(0, 255, nbytes, dtype=cupy.uint8)
            self.dev = cupy.empty_like(self.src)
            mem = cupy.cuda.alloc_pinned_memory(nbytes)
            self.pinned = np.frombuffer(mem, np.uint8, nbytes)
            self.pageable = np.empty(nbytes, np.uint8)

    def sync(self):
        if self.name == "torch":
            self.t.cuda.synchronize()
        else:
            self.cp.cuda.Device().synchronize()

    def copy(self, kind):
        if self.name == "torch":
            dst = {"d2d": self.dev, "pinned": self.pinned, "pageable": self.pageable}[kind]
            dst.copy_(self.src, non_blocking=kind != "pageable")
        elif kind == "d2d":
            self.dev[...] = self.src
        else:
            dst = self.pinned if kind == "pinned" else self.pageable
            self.cp.cuda.runtime.memcpyAsync(dst.ctypes.data, self.src.data.ptr, self.src.nbytes, 4,
                                             self.cp.cuda.get_current_stream().ptr)

    def state(self):
        """The device array to protect."""
        return self.src


def best_of(fn, sync, repeats=5):
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def snapshot_time(lib, mode, tmp):
    import veloc
    cfg = {"scratch": f"{tmp}/{mode}/s/{{node}}", "scratch_versions": 1, "snapshot": {"device_staging": mode}}
    with veloc.init_single(0, cfg) as c:
        if lib.name == "torch":
            holder = type("Holder", (), {"state_dict": lambda self: {"x": lib.src},
                                         "load_state_dict": lambda self, sd: None})()
            c.protect_stateful("state", holder)
        else:
            c.protect("x", lib.state())
        times = []
        for v in range(5):
            lib.sync()
            start = time.perf_counter()
            c.snapshot("bw", v)
            c.wait_snapshot()
            times.append(time.perf_counter() - start)
            c.checkpoint_wait()
        modes = set(c.snapshot_stats["device_modes"].values())
    return min(times), modes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="bytes of state to stage, MiB")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    status = 0
    if not args.skip_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               str(REPO / "tests" / "unit" / "test_gpu_staging.py")], cwd=REPO)
        status |= proc.returncode
    name = pick_library()
    if name is None:
        print("gpu_check: neither torch with CUDA nor cupy with a device is available; nothing measured")
        return status or 2
    nbytes = args.mib << 20
    lib = Lib(name, nbytes)
    raw = {kind: best_of(lambda: lib.copy(kind), lib.sync) for kind in ("d2d", "pinned", "pageable")}
    tmp = tempfile.mkdtemp(prefix="veloc-gpucheck-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        staged = {mode: snapshot_time(lib, mode, tmp) for mode in ("device", "pinned")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gbps = {k: nbytes / t / 1e9 for k, t in raw.items()}
    print(f"\nstaging bandwidth, {args.mib} MiB with {name} (best of 5)")
    print(f"{'copy':<28}{'GB/s':>10}{'vs pinned raw':>16}")
    for kind in ("d2d", "pinned", "pageable"):
        print(f"{'raw ' + kind:<28}{gbps[kind]:>10.1f}{gbps[kind] / gbps['pinned']:>16.2f}")
    for mode, (seconds, modes) in staged.items():
        ref = raw["d2d" if mode == "device" else "pinned"]
        print(f"{'veloc snapshot, ' + mode:<28}{nbytes / seconds / 1e9:>10.1f}"
              f"{ref / seconds:>16.2f}  (vs raw {'d2d' if mode == 'device' else 'pinned'}; modes {sorted(modes)})")
    pinned_ratio = raw["pinned"] / staged["pinned"][0]
    print(f"\npinned staging through veloc = {pinned_ratio:.0%} of raw pinned bandwidth (target >= 80%)")
    if pinned_ratio < 0.8:
        status |= 1
    return status


if __name__ == "__main__":
    sys.exit(main())
