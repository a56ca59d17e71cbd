"""Protected memory regions of one application rank.

Called by the application rank only (``Client.protect``/``unprotect``; the checkpoint
and restart phases). numpy arrays are written straight from their buffers and restored
in place; cupy arrays are staged through host memory and restored in place on their
device; any other object only with an explicit ``pickle=True``, so nothing is ever
unpickled that the user did not ask for.

A pickled region is restored *in place* when the protected object can be refilled: a
dict (``clear`` + ``update``), list (``[:] = ...``), set (``clear`` + ``update``),
bytearray (``[:] = ...``), numpy array of the same dtype and shape (``[...] = ...``),
or an object with a ``__dict__`` (its ``__dict__`` cleared and updated); the checkpoint
must hold an object of the same type. ``Client.recovered[id]`` then refers to that same
object. Anything else (int, float, str, tuple, None, objects with ``__slots__`` only,
...) cannot be changed in place: the restored object is only in
``Client.recovered[id]``.
"""
import math
import operator
import pickle as pickle_module

import numpy as np

from veloc.storage.rankfile import dtype_descr
from veloc.errors import CheckpointError, RestartError
from veloc.names import check_region_id


_IN_PLACE = (dict, list, set, bytearray, np.ndarray)


def in_place_kind(target):
    """The kind under which ``target`` is refilled in place, or ``None`` if it cannot be."""
    for kind in _IN_PLACE:
        if isinstance(target, kind):
            return kind
    if hasattr(target, "__dict__") and not isinstance(target, type):
        return object
    return None


def check_in_place(target, loaded):
    """Whether ``target`` is refilled in place from ``loaded``; raises ``TypeError`` when
    ``target`` could be but ``loaded`` is of another type (or array dtype/shape)."""
    kind = in_place_kind(target)
    if kind is None:
        return False
    same = type(loaded) is type(target) if kind is object else isinstance(loaded, kind)
    if not same:
        raise TypeError(f"the checkpoint holds a {type(loaded).__name__}, the protected object is a "
                        f"{type(target).__name__}")
    if kind is np.ndarray and (target.shape != loaded.shape or target.dtype != loaded.dtype):
        raise TypeError(f"the checkpoint holds an array {loaded.dtype} {loaded.shape}, the protected "
                        f"array is {target.dtype} {target.shape}")
    return True


def restore_in_place(target, loaded):
    """Refill ``target`` with the state of ``loaded``; ``False`` (nothing done) if
    ``target`` cannot be changed in place. Raises ``TypeError`` as :func:`check_in_place`."""
    if not check_in_place(target, loaded):
        return False
    if isinstance(target, (dict, set)):
        target.clear()
        target.update(loaded)
    elif isinstance(target, np.ndarray):
        target[...] = loaded
    elif isinstance(target, (list, bytearray)):
        target[:] = loaded
    elif loaded is not target:
        target.__dict__.clear()
        target.__dict__.update(loaded.__dict__)
    return True


def _is_cupy(obj):
    return type(obj).__module__.split(".")[0] == "cupy" and hasattr(obj, "__cuda_array_interface__")


def _index_tuple(region_id, key, value, ndim):
    try:
        out = tuple(operator.index(v) for v in value)
    except TypeError:
        raise CheckpointError(f"cannot protect region {region_id!r}: {key} must be a tuple of ints, "
                              f"got {value!r}") from None
    if len(out) != ndim:
        raise CheckpointError(f"cannot protect region {region_id!r}: {key} {out} has {len(out)} dimension(s), "
                              f"the array has {ndim}")
    if any(v < 0 for v in out):
        raise CheckpointError(f"cannot protect region {region_id!r}: {key} {out} has a negative entry")
    return out


def region_layout(region_id, kind, shape, global_shape=None, offset=None, replicated=False):
    """The header keys that place a region in the job-wide picture (checked here, on the
    protecting rank): ``global_shape``/``global_offset`` for the slab of a global array,
    ``replicated`` for a region every rank holds identically, nothing for a rank's own."""
    if not isinstance(replicated, bool):
        raise CheckpointError(f"cannot protect region {region_id!r}: replicated must be True or False, "
                              f"got {replicated!r}")
    if global_shape is None and offset is None:
        return {"replicated": True} if replicated else {}
    if replicated:
        raise CheckpointError(f"cannot protect region {region_id!r}: a region is either a slab of a global "
                              "array (global_shape, offset) or replicated, not both")
    if global_shape is None or offset is None:
        raise CheckpointError(f"cannot protect region {region_id!r}: global_shape and offset go together "
                              "(the global array's shape and this rank's first index in every dimension)")
    if kind == "pickle":
        raise CheckpointError(f"cannot protect region {region_id!r}: a pickled object cannot be a slab of a "
                              "global array")
    shape = tuple(shape)
    global_shape = _index_tuple(region_id, "global_shape", global_shape, len(shape))
    offset = _index_tuple(region_id, "offset", offset, len(shape))
    if any(o + n > g for o, n, g in zip(offset, shape, global_shape)):
        raise CheckpointError(f"cannot protect region {region_id!r}: the slab at offset {offset} of shape "
                              f"{shape} does not fit in global_shape {global_shape}")
    return {"global_shape": list(global_shape), "global_offset": list(offset)}


class Region:
    """One protected region: ``kind`` is ``"array"``, ``"device"`` (cupy) or ``"pickle"``."""

    def __init__(self, region_id, obj, use_pickle=False, global_shape=None, offset=None, replicated=False,
                 lossy=None):
        self.id = check_region_id(region_id)
        self.obj = obj
        self.lossy = None
        if use_pickle:
            self.kind = "pickle"
        elif isinstance(obj, np.ndarray):
            self.kind = "array"
            self._check_array(obj)
        elif _is_cupy(obj):
            self.kind = "device"
            self._check_array(obj)
        else:
            raise CheckpointError(
                f"cannot protect region {self.id!r}: {type(obj).__name__} is neither a numpy nor a cupy "
                "array; pass pickle=True to protect a picklable Python object explicitly")
        self.layout = region_layout(self.id, self.kind, getattr(obj, "shape", None), global_shape, offset,
                                    replicated)
        if lossy is not None:
            self.lossy = self._check_lossy(lossy)

    def _check_lossy(self, lossy):
        """``("zfp", bound)`` validated: a float32/float64 array and a positive finite bound."""
        from veloc.storage.codecs import get_codec
        try:
            codec, bound = lossy
            bound = float(bound)
        except (TypeError, ValueError):
            raise CheckpointError(f"cannot protect region {self.id!r}: lossy={lossy!r}; expected "
                                  "(\"zfp\", absolute_error_bound), e.g. lossy=(\"zfp\", 1e-6)") from None
        if codec != "zfp":
            raise CheckpointError(f"cannot protect region {self.id!r}: lossy codec {codec!r} is unknown; "
                                  "accepted: zfp")
        if not (math.isfinite(bound) and bound > 0):
            raise CheckpointError(f"cannot protect region {self.id!r}: lossy error bound {bound!r} must be a "
                                  "positive finite number")
        if self.kind == "pickle" or np.dtype(self.obj.dtype) not in (np.float32, np.float64):
            raise CheckpointError(f"cannot protect region {self.id!r} lossy: zfp takes float32 or float64 "
                                  "arrays only")
        get_codec("zfp")      # ConfigError saying what to install when zfpy is missing
        return ["zfp", bound]

    def _check_array(self, arr):
        if arr.dtype.hasobject:
            raise CheckpointError(f"cannot protect region {self.id!r}: dtype {arr.dtype} holds Python objects; "
                                  "use pickle=True or a numeric dtype")
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            raise CheckpointError(f"cannot protect region {self.id!r}: the array is not contiguous "
                                  "(a strided view); protect the base array or np.ascontiguousarray(...) "
                                  "kept alive by you")
        if not arr.flags.writeable:
            raise CheckpointError(f"cannot protect region {self.id!r}: the array is read-only, so it cannot "
                                  "be restored in place")

    def snapshot(self):
        """``(descriptor, buffer)`` for the rank file; arrays are not copied."""
        if self.kind == "pickle":
            try:
                data = pickle_module.dumps(self.obj, protocol=pickle_module.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise CheckpointError(f"cannot pickle region {self.id!r}: {exc}") from exc
            return {"id": self.id, "kind": "pickle", "dtype": "", "shape": [], "order": "C",
                    "nbytes": len(data), **self.layout}, memoryview(data)
        arr = self.obj.get() if self.kind == "device" else self.obj
        order = "C" if arr.flags.c_contiguous else "F"
        raw = arr.reshape(-1, order=order).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        desc = {"id": self.id, "kind": "array", "dtype": dtype_descr(arr.dtype), "shape": list(arr.shape),
                "order": order, "nbytes": int(arr.nbytes), **self.layout}
        if self.lossy:
            desc["lossy"] = list(self.lossy)
        return desc, raw

    def snapshots(self):
        """The ``(descriptor, buffer)`` pairs this region writes (one for a plain region)."""
        return [self.snapshot()]

    def check_restorable(self, info, path):
        """Raise RestartError unless the stored region ``info`` fits this region in place."""
        if self.kind == "pickle":
            if info.kind != "pickle":
                raise RestartError(f"region {self.id!r} in {path} is an array, but it is protected as a "
                                   "pickled object now")
            return
        if info.kind != "array":
            raise RestartError(f"region {self.id!r} in {path} is a pickled object; protect it with "
                               "pickle=True to recover it")
        stored = info.numpy_dtype()
        if stored != self.obj.dtype or tuple(info.shape) != tuple(self.obj.shape):
            raise RestartError(
                f"region {self.id!r} in {path} holds {stored} {tuple(info.shape)} but the protected array "
                f"is {self.obj.dtype} {tuple(self.obj.shape)}: protect an array of the checkpointed "
                "dtype and shape before restart")

    def load(self, rankfile, info):
        """Unpickle a pickled region and check that it can be restored (``None`` for
        arrays, which are read straight into place by :meth:`restore`)."""
        if self.kind != "pickle":
            return None
        view = rankfile.load_bytes(info)
        try:
            loaded = pickle_module.loads(view)
        except Exception as exc:
            raise RestartError(f"cannot unpickle region {self.id!r} from {rankfile.path}: {exc}") from exc
        finally:
            del view
        try:
            check_in_place(self.obj, loaded)
        except TypeError as exc:
            raise RestartError(f"region {self.id!r} in {rankfile.path} cannot be restored in place: {exc}; "
                               "protect an object of the checkpointed type") from None
        return (loaded,)

    def read_target(self, info):
        """The array that region ``info`` of a rank file can be read straight into, in its
        stored memory order (the protected array itself, or for a cupy array a host
        staging array), or ``None`` (a pickled object, or an array laid out otherwise)."""
        if self.kind == "pickle":
            return None
        if self.kind == "device":
            return np.empty(info.shape, info.numpy_dtype(), order=info.order)
        arr = self.obj
        same_order = arr.flags.c_contiguous if info.order == "C" else arr.flags.f_contiguous
        return arr if same_order and arr.flags.writeable and arr.nbytes == info.nbytes else None

    def finish_target(self, target):
        """After ``target`` (from :meth:`read_target`) holds verified bytes: a cupy array is
        filled from its staging array; a numpy array already holds them."""
        if self.kind == "device":
            self.obj.set(target)

    def restore(self, rankfile, info, recovered, loaded=None):
        """Fill the region from ``rankfile`` (any region file reader: a raw ``RankFile`` or a
        ``CompressedReader``, which decodes straight into the array) in place; a pickled
        region is refilled in place
        when it can be (see the module docstring), and is in ``recovered[id]`` in any case.
        ``loaded``: what :meth:`load` returned, if it was called already."""
        if self.kind == "pickle":
            value = (loaded or self.load(rankfile, info))[0]
            try:
                refilled = restore_in_place(self.obj, value)
            except TypeError as exc:
                raise RestartError(f"region {self.id!r} in {rankfile.path} cannot be restored in place: "
                                   f"{exc}; protect an object of the checkpointed type") from None
            recovered[self.id] = self.obj if refilled else value
            return
        if self.kind == "device":
            host = np.empty(info.shape, info.numpy_dtype(), order=info.order)
            rankfile.read_into(info, host)
            self.obj.set(host)
        else:
            rankfile.read_into(info, self.obj)
