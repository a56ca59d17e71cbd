"""GPU copies of two-phase snapshots: cupy arrays and torch CUDA tensors.

Used by :mod:`veloc.training.staging` on each application rank. A snapshot of device
state is staged either into spare device memory (a device-to-device copy) or into
pinned host memory, always on a side stream that first waits for the work already
queued on the application's current stream, so the copy sees the state as of
``snapshot()`` and overlaps whatever the application queues next. ``wait`` blocks the
host until the copy is complete (the ``guard`` of a training step).

Interop goes through the objects' own libraries (cupy for cupy arrays, torch for torch
tensors, both views of the same device memory via ``__cuda_array_interface__``); no
host round trip happens unless pinned staging is chosen. Neither library is imported
unless such an object is protected.
"""
import numpy as np

MEMCPY_DEFAULT = 4           # cudaMemcpyDefault: direction from unified addressing


def is_cupy(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "cupy" and hasattr(obj, "__cuda_array_interface__")


class CupyOps:
    """Device operations for cupy arrays (one instance per process)."""
    name = "cupy"

    def __init__(self):
        import cupy
        self.cp = cupy
        self.streams = {}

    def device_of(self, arr) -> int:
        return int(arr.device.id)

    def flat_bytes(self, arr, order="C"):
        return arr.reshape(-1, order=order).view(np.uint8)

    def mem_info(self, device):
        with self.cp.cuda.Device(device):
            return self.cp.cuda.runtime.memGetInfo()

    def peak_extra(self, device) -> int:
        return 0      # cupy tracks no peak; the sampled high-water mark stands alone

    def empty_device(self, nbytes, device):
        with self.cp.cuda.Device(device):
            return self.cp.empty(max(nbytes, 1), dtype=self.cp.uint8)

    def empty_pinned(self, nbytes):
        memory = self.cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        return np.frombuffer(memory, np.uint8, max(nbytes, 1))   # the array keeps memory alive

    def host_view(self, pinned, offset, nbytes):
        return pinned[offset:offset + nbytes]

    def start(self, device):
        """The device's side stream, ordered after the current stream's queued work."""
        with self.cp.cuda.Device(device):
            stream = self.streams.get(device)
            if stream is None:
                stream = self.streams[device] = self.cp.cuda.Stream(non_blocking=True)
            stream.wait_event(self.cp.cuda.get_current_stream().record())
        return stream

    def copy_to_device(self, dst, src, stream, device):
        with self.cp.cuda.Device(device):
            self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, MEMCPY_DEFAULT, stream.ptr)

    def copy_to_host(self, dst, src, stream, device):
        with self.cp.cuda.Device(device):
            self.cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src.data.ptr, src.nbytes, MEMCPY_DEFAULT,
                                             stream.ptr)

    def finish(self, stream, device):
        with self.cp.cuda.Device(device):
            return stream.record()

    def wait(self, event):
        event.synchronize()

    def device_to_host(self, dst, src, device):
        """Blocking copy of staged device bytes into the host array ``dst``."""
        with self.cp.cuda.Device(device):
            self.cp.cuda.runtime.memcpy(dst.ctypes.data, src.data.ptr, src.nbytes, MEMCPY_DEFAULT)

    def slice(self, arena, offset, nbytes):
        return arena[offset:offset + nbytes]


class TorchOps:
    """Device operations for torch CUDA tensors (one instance per process)."""
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch
        self.streams = {}

    def device_of(self, tensor) -> int:
        return int(tensor.device.index)

    def flat_bytes(self, tensor, order="C"):
        return tensor.reshape(-1).view(self.torch.uint8)

    def mem_info(self, device):
        return self.torch.cuda.mem_get_info(device)

    def peak_extra(self, device) -> int:
        cuda = self.torch.cuda
        return max(0, int(cuda.max_memory_reserved(device)) - int(cuda.memory_reserved(device)))

    def empty_device(self, nbytes, device):
        return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=f"cuda:{device}")

    def empty_pinned(self, nbytes):
        return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, pin_memory=True)

    def host_view(self, pinned, offset, nbytes):
        return pinned[offset:offset + nbytes].numpy()

    def start(self, device):
        cuda = self.torch.cuda
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = cuda.Stream(device=device)
        stream.wait_stream(cuda.current_stream(device))
        return stream

    def copy_to_device(self, dst, src, stream, device):
        with self.torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(stream)      # the caching allocator must not reuse src mid-copy

    def copy_to_host(self, dst, src, stream, device):
        with self.torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)      # dst: a slice of a pinned tensor
        src.record_stream(stream)

    def finish(self, stream, device):
        event = self.torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event):
        event.synchronize()

    def device_to_host(self, dst, src, device):
        self.torch.from_numpy(dst).copy_(src)

    def slice(self, arena, offset, nbytes):
        return arena[offset:offset + nbytes]


_OPS = {}


def ops_for(obj):
    """The device operations for a cupy array or torch CUDA tensor (cached per library)."""
    kind = "cupy" if is_cupy(obj) else "torch"
    if kind not in _OPS:
        _OPS[kind] = CupyOps() if kind == "cupy" else TorchOps()
    return _OPS[kind]


class DeviceMemoryWatch:
    """High-water mark of device memory use per device, sampled at each snapshot."""

    def __init__(self):
        self.peak = {}

    def fits(self, ops, device, staged_bytes, margin_bytes) -> bool:
        """Whether ``staged_bytes`` more fit under the device's memory minus ``margin_bytes``
        next to the job's peak use (sampled now and at earlier snapshots)."""
        free, total = ops.mem_info(device)
        used = int(total) - int(free)
        peak = max(self.peak.get(device, 0), used + ops.peak_extra(device))
        self.peak[device] = peak
        return staged_bytes + peak <= int(total) - margin_bytes
