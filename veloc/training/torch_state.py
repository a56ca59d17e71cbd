"""torch tensors as raw regions: dtype by name, bytes out, bytes back in place.

Used by :mod:`veloc.training.stateful` on each application rank, only once a torch
tensor is met (so torch is already imported; this module never imports it first).
A tensor is stored as its raw bytes with ``dtype_name`` set to the torch dtype's name
(``bfloat16``, ``float8_e4m3fn``, ...) and ``dtype`` to the numpy type of the same
item size (the numpy equivalent where one exists, raw unsigned integers otherwise), so
types numpy lacks keep every bit.
"""
import sys
import warnings

import numpy as np

from veloc.storage.rankfile import dtype_descr
from veloc.errors import RestartError

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.dtype("V16")}


def torch_module():
    """The torch module if the application imported it, else ``None``."""
    return sys.modules.get("torch")


def is_tensor(obj) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.Tensor)


def dtype_name(tensor) -> str:
    return str(tensor.dtype).rsplit(".", 1)[-1]


def storage_dtype(tensor):
    """The numpy dtype the raw bytes are described with."""
    torch = torch_module()
    if tensor.dtype not in (torch.bfloat16,) and "float8" not in dtype_name(tensor):
        try:
            return torch.empty(0, dtype=tensor.dtype).numpy().dtype
        except TypeError:
            pass
    return np.dtype(_RAW[tensor.element_size()])


def describe(key, tensor):
    """``(descriptor, contiguous detached tensor)`` of one tensor leaf. A non-contiguous
    tensor is copied now (the snapshot must not see later changes)."""
    tensor = tensor.detach()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    desc = {"id": key, "kind": "array", "dtype": dtype_descr(storage_dtype(tensor)),
            "shape": list(tensor.shape), "order": "C", "nbytes": int(tensor.numel() * tensor.element_size()),
            "dtype_name": dtype_name(tensor)}
    return desc, tensor


def host_bytes(tensor):
    """A uint8 numpy view of a contiguous CPU tensor's bytes (no copy)."""
    torch = torch_module()
    if tensor.numel() == 0:
        return np.empty(0, np.uint8)
    return tensor.reshape(-1).view(torch.uint8).numpy()


def tensor_from_file(rankfile, info, device=None):
    """A new tensor holding region ``info`` (on ``device``, default CPU)."""
    torch = torch_module()
    try:
        dtype = getattr(torch, info.dtype_name)
    except AttributeError:
        raise RestartError(f"{rankfile.path}: region {info.id!r} holds torch dtype {info.dtype_name!r}, "
                           f"which this torch ({torch.__version__}) does not know") from None
    out = torch.empty(tuple(info.shape), dtype=dtype)
    if out.numel() * out.element_size() != info.nbytes:
        raise RestartError(f"{rankfile.path}: region {info.id!r} has {info.nbytes} bytes, not a "
                           f"{info.dtype_name} tensor of shape {tuple(info.shape)}")
    if info.nbytes:
        np.copyto(host_bytes(out), rankfile.bytes_view(info))
    return out if device is None or str(device) == "cpu" else out.to(device)


def fits(live, info) -> bool:
    """Whether region ``info`` can be restored into tensor ``live`` in place."""
    return (is_tensor(live) and dtype_name(live) == info.dtype_name
            and tuple(live.shape) == tuple(info.shape))


def restore_into(live, rankfile, info):
    """Copy region ``info`` into the existing tensor ``live`` (any device), in place."""
    torch = torch_module()
    with torch.no_grad():
        if live.device.type == "cpu" and live.is_contiguous() and info.nbytes:
            np.copyto(host_bytes(live), rankfile.bytes_view(info))
        elif info.nbytes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                live.copy_(tensor_from_file(rankfile, info))
    return live


def same_storage_key(tensor):
    """Identity of a tensor view: equal keys mean the same bytes (written once)."""
    return (tensor.device.type, tensor.device.index, tensor.data_ptr(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)
