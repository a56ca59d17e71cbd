"""Protected memory regions of one application rank.

Called by the application rank only (``Client.protect``/``unprotect``; the checkpoint
and restart phases). numpy arrays are written straight from their buffers and restored
in place; cupy arrays are staged through host memory and restored in place on their
device; any other object only with an explicit ``pickle=True`` (restored into
``Client.recovered``), so nothing is ever unpickled that the user did not ask for.
"""
import pickle as pickle_module

import numpy as np

from .engine.rankfile import dtype_descr
from .errors import CheckpointError, RestartError
from .names import check_region_id


def _is_cupy(obj):
    return type(obj).__module__.split(".")[0] == "cupy" and hasattr(obj, "__cuda_array_interface__")


class Region:
    """One protected region: ``kind`` is ``"array"``, ``"device"`` (cupy) or ``"pickle"``."""

    def __init__(self, region_id, obj, use_pickle=False):
        self.id = check_region_id(region_id)
        self.obj = obj
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
                    "nbytes": len(data)}, memoryview(data)
        arr = self.obj.get() if self.kind == "device" else self.obj
        order = "C" if arr.flags.c_contiguous else "F"
        raw = arr.reshape(-1, order=order).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        return {"id": self.id, "kind": "array", "dtype": dtype_descr(arr.dtype), "shape": list(arr.shape),
                "order": order, "nbytes": int(arr.nbytes)}, raw

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

    def restore(self, rankfile, info, recovered):
        """Fill the region from the file (in place), or put the object in ``recovered``."""
        if self.kind == "pickle":
            view = rankfile.bytes_view(info)
            try:
                recovered[self.id] = pickle_module.loads(view)
            except Exception as exc:
                raise RestartError(f"cannot unpickle region {self.id!r} from {rankfile.path}: {exc}") from exc
            finally:
                del view
            return
        src = rankfile.as_array(info)
        if self.kind == "device":
            self.obj.set(np.ascontiguousarray(src) if info.order == "C" else np.asfortranarray(src))
        else:
            np.copyto(self.obj, src, casting="no")
        del src
