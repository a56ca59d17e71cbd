"""Rank files behind the ``veloc show``/``extract`` commands (see ``veloc.cli.commands``).

Run by a user on any node, outside the application and its engine. It reads rank files
(``.vck``) and compressed rank files (``.vcz``, decoded on the fly; ``show`` adds each
region's codec, stored size and ratio); it never modifies a checkpoint and never
unpickles anything. The levels
(``ls``/``verify``) are in ``veloc.cli.levels``.
"""
import os
import re
import stat
from pathlib import Path

import numpy as np

from veloc.cli.levels import UsageError
from veloc.storage.compressed_file import MAGIC as COMPRESSED_MAGIC
from veloc.storage.compressed_file import open_reader
from veloc.storage.fileio import atomic_file
from veloc.errors import CorruptCheckpointError


# -- rank files ------------------------------------------------------------------------
def open_rankfile(path):
    """A region file reader (a raw ``RankFile`` or, by its magic, a ``CompressedReader``);
    refuses anything but a regular file (a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: {'is a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}; "
                         "give a rank file (r<rank>.vck or r<rank>.vcz)")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(COMPRESSED_MAGIC))
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    return open_reader(path, "compressed" if magic == COMPRESSED_MAGIC else "regions")


def region_dtype(path, info):
    try:
        dtype = info.numpy_dtype()
    except Exception:
        raise CorruptCheckpointError(f"{path}: region {info.id!r} has an unreadable dtype {info.dtype!r}") from None
    if dtype.hasobject:
        raise CorruptCheckpointError(f"{path}: region {info.id!r} declares a Python-object dtype; refused")
    return dtype


def human_dtype(dtype):
    """``float64``, ``{x: float32, n: int64}``, ``float64[3]``, ``S16``, ``int32 (big-endian)``."""
    if dtype.fields is not None:
        return "{" + ", ".join(f"{n}: {human_dtype(dtype.fields[n][0])}" for n in dtype.names) + "}"
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return f"{human_dtype(base)}[{','.join(map(str, shape))}]"
    text = dtype.str[1:] if dtype.kind in "SUV" else dtype.name
    if not dtype.isnative:
        text += " (big-endian)" if dtype.byteorder == ">" else " (little-endian)"
    return text


def describe_rankfile(path):
    """The header of a rank file as a JSON-ready dict (a bad dtype is shown, not refused)."""
    with open_rankfile(path) as rf:
        regions = []
        for r in rf.regions:
            try:
                human = "pickle" if r.kind == "pickle" else human_dtype(r.numpy_dtype())
            except Exception:
                human = f"unreadable {r.dtype!r}"
            regions.append({"id": r.id, "kind": r.kind, "dtype": human, "descr": r.dtype,
                            "shape": list(r.shape), "order": r.order, "nbytes": r.nbytes, "offset": r.offset})
            if hasattr(rf, "codec"):
                codec, bound = rf.codec(r)
                regions[-1].update(codec=codec, error_bound=bound, stored=rf.stored_bytes(r))
        meta = rf.meta
        out = {"file": str(path), "size": rf.size, "format": meta.get("format"), "name": meta.get("name"),
               "version": meta.get("version"), "rank": meta.get("rank"), "regions": regions}
        if hasattr(rf, "codec"):
            out.update(compressed=True, raw_size=int(meta["source"]["size"]), block_size=meta.get("block_size"))
        return out


def parse_region_id(text):
    """An int if ``text`` is all ASCII digits, else the string itself."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else text


def _write_private(out, write):
    """Create ``out`` with mode 0600 atomically (:func:`veloc.storage.fileio.atomic_file`)."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; give the output file name")
    try:
        with atomic_file(out, durable=False) as fd, os.fdopen(os.dup(fd), "wb") as f:
            write(f)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}") from None


def extract_region(path, region_id, out, allow_pickle=False):
    """Write region ``region_id`` of rank file ``path`` to ``out``; return its header dict.

    An int ``region_id`` with no such region falls back to the name made of its digits.

    Arrays go to ``.npy`` (``np.save`` of the stored view: dtype, shape and order kept);
    pickled objects only with ``allow_pickle``, as their raw bytes, never unpickled.
    """
    with open_rankfile(path) as rf:
        info = rf.region(region_id)
        if info is None and isinstance(region_id, int):     # a name made of digits, e.g. "12"
            info = rf.region(str(region_id))
        if info is None:
            ids = ", ".join(repr(r.id) for r in rf.regions) or "none"
            raise UsageError(f"{path}: no region {region_id!r}; regions in this file: {ids}")
        if info.kind == "pickle":
            if not allow_pickle:
                raise UsageError(f"{path}: region {region_id!r} is a pickled Python object; pass "
                                 "--allow-pickle to write its raw pickle bytes (the tool never unpickles)")
            view = rf.load_bytes(info)
            try:
                _write_private(out, lambda f: f.write(view))
            finally:
                del view
            return {"id": info.id, "kind": "pickle", "nbytes": info.nbytes}
        if info.kind != "array":
            raise CorruptCheckpointError(f"{path}: region {region_id!r} has unknown kind {info.kind!r}")
        dtype = region_dtype(path, info)
        if int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize != info.nbytes:
            raise CorruptCheckpointError(f"{path}: region {region_id!r} holds {info.nbytes} bytes, not "
                                         f"{dtype} {tuple(info.shape)}: the header is corrupt")
        arr = rf.as_array(info)
        try:
            _write_private(out, lambda f: np.save(f, arr, allow_pickle=False))
        finally:
            del arr
        return {"id": info.id, "kind": "array", "dtype": human_dtype(dtype), "shape": list(info.shape),
                "order": info.order, "nbytes": info.nbytes}
