"""Objects with ``state_dict()``/``load_state_dict()`` as checkpoint regions.

``Client.protect_stateful(name, obj)`` (any rank, any object with both methods: torch
modules, optimizers, LR schedulers, GradScalers, samplers, the RNG wrappers of
:mod:`veloc.training.rng`) registers a :class:`StatefulRegion`. At every checkpoint or
snapshot ``obj.state_dict()`` is called and flattened: every tensor or numeric numpy
leaf becomes a raw region keyed by its path (``optimizer/state/3/exp_avg``), with its
dtype recorded by name; a leaf seen twice (tied weights) is written once; everything
else stays in one small pickled skeleton region named ``name``. The skeleton is
unpickled on restart because the user protected this object explicitly.

Restart (``recover_mem``) copies every leaf in place into the tensors and arrays that
``obj.state_dict()`` returns now (on their own devices), creates the ones that do not
exist yet (an optimizer's state before its first step), then calls
``obj.load_state_dict`` so step counts and other plain values come back too.
"""
import pickle

import numpy as np

from veloc.storage.rankfile import dtype_descr
from veloc.errors import CheckpointError, RestartError
from veloc.names import check_region_id
from veloc.training import torch_state
from veloc.training.gpu import is_cupy
from veloc.training.staging import Source, device_source

FORMAT = 1


class _Leaf:
    """Placeholder for a raw region in the pickled skeleton."""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return (_Leaf, (self.key,))


def _is_leaf(value):
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    return torch_state.is_tensor(value) or is_cupy(value)


def _children(value):
    """``(kind, items)`` of a container, or ``None`` for a leaf or a plain value."""
    if isinstance(value, dict):
        return "dict", list(value.items())
    if isinstance(value, (list, tuple)):
        return "seq", list(enumerate(value))
    return None


def _rebuild(container, items):
    if isinstance(container, dict):
        try:
            out = type(container)()
        except TypeError:
            out = {}
        out.update(items)
        extra = getattr(container, "__dict__", None)
        if extra:
            out.__dict__.update(extra)       # e.g. the _metadata of a module's state dict
        return out
    values = [v for _, v in items]
    if hasattr(container, "_fields"):            # namedtuple
        return type(container)(*values)
    return type(container)(values)


def _walk(value, path, visit):
    """Rebuild ``value`` with ``visit(path, leaf)`` applied to every raw leaf."""
    if _is_leaf(value):
        return visit(path, value)
    children = _children(value)
    if children is None:
        return value
    return _rebuild(value, [(k, _walk(v, f"{path}/{k}", visit)) for k, v in children[1]])


class StatefulRegion:
    """A protected object with ``state_dict()``/``load_state_dict()``."""
    kind = "stateful"

    def __init__(self, name, obj):
        self.id = check_region_id(name)
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(obj, method, None)):
                raise CheckpointError(f"cannot protect_stateful({name!r}, ...): {type(obj).__name__} has no "
                                      f"{method}() method; use protect() for arrays or pickle=True")
        self.obj = obj

    # -- checkpoint -----------------------------------------------------------------
    def _flatten(self):
        """``(skeleton bytes, [(descriptor, leaf)])`` of the current state."""
        try:
            state = self.obj.state_dict()
        except Exception as exc:
            raise CheckpointError(f"stateful {self.id!r}: state_dict() failed: {exc!r}") from exc
        leaves, seen = [], {}

        def visit(path, leaf):
            key = f"{self.id}{path}"
            ident = self._identity(leaf)
            if ident in seen:
                return _Leaf(seen[ident])
            seen[ident] = key
            leaves.append(self._describe(key, leaf))
            return _Leaf(key)

        skeleton = _walk(state, "", visit)
        try:
            data = pickle.dumps({"format": FORMAT, "state": skeleton}, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise CheckpointError(f"stateful {self.id!r}: a non-array value of its state_dict() cannot be "
                                  f"pickled: {exc}") from exc
        return data, leaves

    @staticmethod
    def _identity(leaf):
        if torch_state.is_tensor(leaf):
            return torch_state.same_storage_key(leaf)
        if is_cupy(leaf):
            return ("cupy", leaf.data.ptr, leaf.shape, leaf.strides, str(leaf.dtype))
        return ("numpy", leaf.__array_interface__["data"][0], leaf.shape, leaf.strides, leaf.dtype.str)

    @staticmethod
    def _describe(key, leaf):
        if torch_state.is_tensor(leaf):
            return torch_state.describe(key, leaf)
        if not (leaf.flags.c_contiguous or leaf.flags.f_contiguous):
            leaf = leaf.copy()     # a strided view: this copy is the snapshot
        order = "C" if leaf.flags.c_contiguous else "F"
        desc = {"id": key, "kind": "array", "dtype": dtype_descr(np.dtype(leaf.dtype)), "shape": list(leaf.shape),
                "order": order, "nbytes": int(leaf.nbytes)}
        return desc, leaf

    def _skeleton_desc(self, data):
        return {"id": self.id, "kind": "pickle", "dtype": "", "shape": [], "order": "C", "nbytes": len(data)}

    def sources(self):
        """Staging sources: the skeleton bytes, then every leaf (host or device)."""
        data, leaves = self._flatten()
        out = [Source(self._skeleton_desc(data), data=memoryview(data))]
        for desc, leaf in leaves:
            if torch_state.is_tensor(leaf) and leaf.device.type != "cpu" or is_cupy(leaf):
                out.append(device_source(desc, leaf, desc["order"]))
            elif torch_state.is_tensor(leaf):
                out.append(Source(desc, host=torch_state.host_bytes(leaf)))
            else:
                out.append(Source(desc, host=_raw(leaf, desc["order"])))
        return out

    def snapshots(self):
        """``(descriptor, host buffer)`` pairs for a one-call ``checkpoint``."""
        data, leaves = self._flatten()
        out = [(self._skeleton_desc(data), memoryview(data))]
        for desc, leaf in leaves:
            if torch_state.is_tensor(leaf):
                host = leaf if leaf.device.type == "cpu" else leaf.cpu()
                out.append((desc, torch_state.host_bytes(host)))
            elif is_cupy(leaf):
                out.append((desc, _raw(leaf.get(order=desc["order"]), desc["order"])))
            else:
                out.append((desc, _raw(leaf, desc["order"])))
        return out

    # -- restart --------------------------------------------------------------------
    def check_restorable(self, info, path):
        if info.kind != "pickle":
            raise RestartError(f"region {self.id!r} in {path} is an array, but it is protected as a "
                               "stateful object now; protect it with protect() instead")

    def load(self, rankfile, info):
        """Nothing to prepare before the in-place pass: the small pickled part is read by
        :meth:`restore` (the same two-step interface as :class:`veloc.regions.Region`)."""
        return None

    def restore(self, rankfile, info, recovered, loaded=None):
        """Refill the live tensors/arrays in place, then ``obj.load_state_dict(state)``."""
        view = rankfile.bytes_view(info)
        try:
            payload = pickle.loads(view)
            skeleton = payload["state"]
        except Exception as exc:
            raise RestartError(f"stateful {self.id!r}: cannot unpickle its state from {rankfile.path}: "
                               f"{exc}") from exc
        finally:
            del view
        live = {}
        _walk(self.obj.state_dict(), "", lambda path, leaf: live.setdefault(f"{self.id}{path}", leaf))
        infos = {}

        def check(path, leaf):
            if isinstance(leaf, _Leaf) and leaf.key not in infos:
                found = rankfile.region(leaf.key)
                if found is None or found.kind != "array":
                    raise RestartError(f"stateful {self.id!r}: leaf {leaf.key!r} is missing from "
                                       f"{rankfile.path}; the file is incomplete")
                infos[leaf.key] = found
            return leaf

        _walk_placeholders(skeleton, "", check)       # validate everything before writing
        restored = {}
        for key, found in infos.items():
            restored[key] = _restore_leaf(live.get(key), rankfile, found)
        state = _walk_placeholders(skeleton, "", lambda path, leaf: restored[leaf.key])
        try:
            self.obj.load_state_dict(state)
        except Exception as exc:
            raise RestartError(f"stateful {self.id!r}: load_state_dict() rejected the restored state from "
                               f"{rankfile.path}: {exc}") from exc


def _raw(arr, order):
    if not arr.nbytes:
        return np.empty(0, np.uint8)
    return arr.reshape(-1, order=order).view(np.uint8)


def _walk_placeholders(value, path, visit):
    if isinstance(value, _Leaf):
        return visit(path, value)
    children = _children(value)
    if children is None:
        return value
    return _rebuild(value, [(k, _walk_placeholders(v, f"{path}/{k}", visit)) for k, v in children[1]])


def _restore_leaf(live, rankfile, info):
    """The restored leaf: ``live`` refilled in place when it fits, else a new one."""
    if info.dtype_name:
        torch = torch_state.torch_module()
        if torch is None:
            import torch   # noqa: F401  (a torch checkpoint restored before torch was imported)
        if torch_state.fits(live, info):
            return torch_state.restore_into(live, rankfile, info)
        device = live.device if torch_state.is_tensor(live) else None
        return torch_state.tensor_from_file(rankfile, info, device)
    stored = rankfile.as_array(info)
    if isinstance(live, np.ndarray) and live.dtype == stored.dtype and live.shape == stored.shape \
            and live.flags.writeable:
        np.copyto(live, stored, casting="no")
        return live
    if is_cupy(live) and live.dtype == stored.dtype and live.shape == stored.shape:
        live.set(np.ascontiguousarray(stored) if info.order == "C" else np.asfortranarray(stored))
        return live
    return np.array(stored, order=info.order)
