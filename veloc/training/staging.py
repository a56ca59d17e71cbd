"""Staging buffers of two-phase snapshots, allocated once and reused.

Called on each application rank by :class:`veloc.training.snapshot.SnapshotMixin`:
``stage`` lays the regions out in one buffer (growing it only when the protected state
grew), queues device copies on side streams (from the calling thread) and returns a
:class:`StagedCopy`; ``StagedCopy.copy_host`` does the host memcpys (on the copy thread;
numpy releases the GIL) and waits for the device copies; ``StagedCopy.snaps`` gives the
``(descriptor, buffer)`` pairs that the persist phase writes to scratch.
"""
import numpy as np

from veloc.storage.rankfile import dtype_descr
from veloc.errors import CheckpointError
from veloc.training.gpu import DeviceMemoryWatch, ops_for

ALIGN = 4096


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Source:
    """One region's bytes to stage: live ``host`` bytes (a uint8 numpy view), live
    ``device`` bytes (a flat uint8 cupy array or torch CUDA tensor), or ``data``, bytes
    that are already a private copy (a pickle)."""
    __slots__ = ("desc", "host", "device", "data")

    def __init__(self, desc, host=None, device=None, data=None):
        self.desc, self.host, self.device, self.data = desc, host, device, data


def device_source(desc, arr, order="C"):
    """A :class:`Source` for a contiguous cupy array or torch CUDA tensor."""
    if not desc["nbytes"]:
        return Source(desc, host=np.empty(0, np.uint8))
    return Source(desc, device=ops_for(arr).flat_bytes(arr, order))


def region_sources(region):
    """The sources of a protected region: its own ``sources()`` if it has one (stateful
    objects), else a plain array, cupy array or pickled region of ``veloc.regions``."""
    own = getattr(region, "sources", None)
    if own is not None:
        return own()
    if region.kind == "device":
        arr = region.obj
        order = "C" if arr.flags.c_contiguous else "F"
        desc = {"id": region.id, "kind": "array", "dtype": dtype_descr(np.dtype(arr.dtype)),
                "shape": list(arr.shape), "order": order, "nbytes": int(arr.nbytes)}
        return [device_source(desc, arr, order)]
    desc, buf = region.snapshot()       # arrays: a live view (no copy); pickles: fresh bytes
    if region.kind == "pickle":
        return [Source(desc, data=buf)]
    return [Source(desc, host=np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf)]


class _DeviceArena:
    """Staging memory for one (library, device): device memory or pinned host memory."""

    def __init__(self, ops, device, nbytes, mode):
        self.ops, self.device, self.mode, self.capacity = ops, device, mode, nbytes
        self.memory = ops.empty_device(nbytes, device) if mode == "device" else ops.empty_pinned(nbytes)
        self.bounce = None       # host copy of device-staged bytes, for the persist phase


class StagingBuffer:
    """One reusable staging area (one per snapshot in flight)."""

    def __init__(self, settings, watch=None):
        self.settings = settings           # the [snapshot] config section
        self.watch = watch or DeviceMemoryWatch()
        self.host = np.empty(0, np.uint8)
        self.arenas = {}                   # (library, device) -> _DeviceArena
        self.allocations = 0

    def _host_capacity(self, nbytes):
        if nbytes > self.host.size:
            self.host = np.empty(nbytes, np.uint8)
            self.host[::ALIGN] = 0     # touch every page now, not during the first copy
            self.allocations += 1
        return self.host

    def _arena(self, ops, device, nbytes):
        key = (ops.name, device)
        arena = self.arenas.get(key)
        if arena is not None and arena.capacity >= nbytes:
            return arena
        self.arenas.pop(key, None)      # release the smaller one before sizing anew
        mode = self.settings["device_staging"]
        if mode == "auto":
            margin = self.settings["device_margin_mib"] << 20
            mode = "device" if self.watch.fits(ops, device, nbytes, margin) else "pinned"
        try:
            arena = _DeviceArena(ops, device, nbytes, mode)
        except Exception as exc:    # out of device or pinned memory
            raise CheckpointError(f"cannot allocate {nbytes} bytes of {mode} staging memory for GPU "
                                  f"{device}: {exc}; lower [snapshot] max_in_flight or set "
                                  "device_staging = pinned") from exc
        self.arenas[key] = arena
        self.allocations += 1
        return arena

    def stage(self, sources):
        """Lay ``sources`` out, queue their device copies now, and return the copy to finish."""
        host_size, device_sizes = 0, {}
        plan = []
        for src in sources:
            if src.host is not None and src.host.size:
                plan.append(("host", src, host_size))
                host_size = _align(host_size + src.host.size)
            elif src.device is not None:
                ops = ops_for(src.device)
                key = (ops, ops.device_of(src.device))
                offset = device_sizes.get(key, 0)
                plan.append(("device", src, (key, offset)))
                device_sizes[key] = _align(offset + src.desc["nbytes"])
            else:
                plan.append(("data", src, None))
        host = self._host_capacity(host_size)
        arenas = {key: self._arena(key[0], key[1], size) for key, size in device_sizes.items()}
        events = []
        for key, arena in arenas.items():
            ops, device = key
            stream = ops.start(device)
            for kind, src, where in plan:
                if kind == "device" and where[0] == key:
                    off, n = where[1], src.desc["nbytes"]
                    dst = ops.slice(arena.memory, off, n)
                    if arena.mode == "device":
                        ops.copy_to_device(dst, src.device, stream, device)
                    else:
                        ops.copy_to_host(dst, src.device, stream, device)
            events.append((ops, ops.finish(stream, device)))
        return StagedCopy(host, arenas, plan, events)

    @property
    def device_modes(self):
        """``{(library, device): "device" | "pinned"}`` of the current arenas."""
        return {key: arena.mode for key, arena in self.arenas.items()}


class StagedCopy:
    """The copy of one snapshot into a :class:`StagingBuffer`."""

    def __init__(self, host, arenas, plan, events):
        self.host, self.arenas, self.plan, self.events = host, arenas, plan, events

    def copy_host(self):
        """Copy every host region into the buffer, then wait for the device copies
        (called on the copy thread)."""
        for kind, src, offset in self.plan:
            if kind == "host":
                np.copyto(self.host[offset:offset + src.host.size], src.host)
        for ops, event in self.events:
            ops.wait(event)
        # Keep descriptors and pickled bytes, drop the references to live state.
        self.plan = [(kind, src.data, where, src.desc) for kind, src, where in self.plan]

    def snaps(self):
        """``(descriptor, host buffer)`` pairs of the staged copy (called by the persist phase)."""
        out = []
        for kind, data, where, desc in self.plan:
            n = desc["nbytes"]
            if kind == "host":
                out.append((desc, self.host[where:where + n]))
            elif kind == "data":
                out.append((desc, data if data is not None else np.empty(0, np.uint8)))
            else:
                key, off = where
                arena = self.arenas[key]
                if arena.mode == "pinned":
                    out.append((desc, key[0].host_view(arena.memory, off, n)))
                    continue
                if arena.bounce is None or arena.bounce.size < arena.capacity:
                    arena.bounce = np.empty(arena.capacity, np.uint8)
                dst = arena.bounce[off:off + n]
                key[0].device_to_host(dst, key[0].slice(arena.memory, off, n), key[1])
                out.append((desc, dst))
        return out
