"""The per-version ``global.h5`` of the HDF5 format: virtual datasets over the rank files.

Layout: see :mod:`veloc.storage.hdf5_format`. :func:`write_global` is called by the flush
module of whichever node first sees every rank's copy of a version committed (any node
may, several may: the file is committed atomically and says the same thing each time).
:class:`GlobalFile` is opened by application ranks restarting on another rank count (a
hyperslab of each global array per rank) and by readers of checkpoints.
"""
import json
import os
from pathlib import Path

import numpy as np

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import atomic_path
from veloc.storage.rankfile import RegionInfo

_SHARED_ATTRS = ("veloc_id", "veloc_kind", "veloc_dtype", "veloc_dtype_name", "veloc_order", "veloc_storage",
                 "veloc_global_shape", "veloc_replicated")


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _tables_from_manifests(datasets_by_rank):
    """The same tables from the dataset lists the flush recorded in each rank's manifest."""
    tables = {}
    for rank, datasets in datasets_by_rank.items():
        table = {}
        for name, attrs, shape, descr in datasets:
            dtype = RegionInfo(None, "array", descr, (), "C", 0, 0).numpy_dtype()
            table[json.loads(attrs["veloc_id"])] = (name, attrs, tuple(shape), dtype)
        tables[rank] = table
    return tables


def _rank_tables(h5py, rank_paths):
    """``{rank: {region id: (dataset name, attrs dict, dataset shape, dtype)}}``."""
    tables = {}
    for rank, path in rank_paths.items():
        with h5py.File(path, "r") as f:
            table = {}
            for key in f:
                dset = f[key]
                attrs = dict(dset.attrs)
                table[json.loads(_text(attrs["veloc_id"]))] = (key, attrs, dset.shape, dset.dtype)
            tables[rank] = table
    return tables


def _tiles(gshape, starts, stops):
    """Whether the boxes ``[starts, stops)`` cover ``gshape`` exactly, without overlap."""
    starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
    total = int(np.prod(gshape, dtype=np.int64))
    if int(np.prod(stops - starts, axis=1, dtype=np.int64).sum()) != total:
        return False
    nonempty = np.prod(stops - starts, axis=1) > 0
    starts, stops = starts[nonempty], stops[nonempty]
    overlap = np.all((starts[:, None, :] < stops[None, :, :]) & (starts[None, :, :] < stops[:, None, :]), axis=2)
    np.fill_diagonal(overlap, False)
    return not overlap.any()


def _classify(tables, nranks):
    """``(stitched, local)``: ``stitched`` = ``[(id, "replicated" or the global array's
    order "C"/"F")]``,
    ``local`` = ``[{"id", "reason"}]``."""
    stitched, local = [], []
    ids = list(tables[0]) if 0 in tables else []
    for rid in sorted({r for t in tables.values() for r in t}, key=json.dumps):
        if rid not in ids:
            ids.append(rid)
    for rid in ids:
        entries = [tables.get(r, {}).get(rid) for r in range(nranks)]
        if any(e is None for e in entries):
            local.append({"id": rid, "reason": "not every rank holds it"})
            continue
        attrs = [e[1] for e in entries]
        if all(int(a.get("veloc_replicated", 0)) for a in attrs):
            stitched.append((rid, "replicated"))
            continue
        if not all("veloc_global_shape" in a for a in attrs):
            local.append({"id": rid, "reason": "neither global (global_shape, offset) nor replicated"})
            continue
        first = attrs[0]
        # a slab with at most one dimension longer than 1 is laid out alike in C and F order
        orders = {_text(a["veloc_order"]) for a in attrs if sum(int(n) > 1 for n in a["veloc_shape"]) > 1}
        same = len(orders) <= 1 and all(np.array_equal(a["veloc_global_shape"], first["veloc_global_shape"])
                                        and _text(a["veloc_dtype"]) == _text(first["veloc_dtype"]) for a in attrs)
        if not same or _text(first["veloc_storage"]) != "typed":
            local.append({"id": rid, "reason": "its slabs disagree on global shape, dtype or order"
                          if not same else "its dtype has no HDF5 equivalent"})
            continue
        gshape = [int(x) for x in first["veloc_global_shape"]]
        starts = [[int(x) for x in a["veloc_global_offset"]] for a in attrs]
        stops = [[o + int(n) for o, n in zip(s, a["veloc_shape"])] for s, a in zip(starts, attrs)]
        if not _tiles(gshape, starts, stops):
            local.append({"id": rid, "reason": f"its slabs do not tile the global shape {tuple(gshape)}"})
            continue
        stitched.append((rid, orders.pop() if orders else "C"))
    return stitched, local


def write_global(rank_paths, path, name, version, nranks, durable=True, tables=None):
    """Write ``global.h5`` at ``path`` from every rank's committed ``r<rank>.h5``
    (``rank_paths``: ``{rank: path}``, all ``nranks`` of them), atomically. ``tables``:
    each rank's datasets as ``write_rank_h5`` returned them (``{rank: [...]}``), else
    read from the files. Returns the list of regions left out (``{"id", "reason"}``)."""
    from veloc.storage.hdf5_format import FORMAT, require_h5py
    h5py = require_h5py()
    path = Path(path)
    tables = _rank_tables(h5py, rank_paths) if tables is None else _tables_from_manifests(tables)
    stitched, local = _classify(tables, nranks)
    with atomic_path(path, durable) as tmp:
        with h5py.File(tmp, "w", track_times=False) as f:
            f.attrs.update({"veloc_format": FORMAT, "veloc_name": name, "veloc_version": int(version),
                            "veloc_nranks": int(nranks), "veloc_local_regions": json.dumps(local)})
            for rid, how in stitched:
                dname, attrs, dshape, dtype = tables[0][rid]
                ranks = [0] if how == "replicated" else range(nranks)
                reverse = how == "F"
                shape = dshape if how == "replicated" else tuple(int(x) for x in attrs["veloc_global_shape"])
                layout = h5py.VirtualLayout(shape=tuple(shape)[::-1] if reverse else shape,
                                            dtype=dtype)
                for r in ranks:
                    rname, rattrs, rshape, _ = tables[r][rid]
                    source = h5py.VirtualSource(os.path.relpath(rank_paths[r], path.parent), rname,
                                                shape=rshape, dtype=dtype)
                    if how == "replicated":
                        layout[...] = source
                        continue
                    offset = [int(x) for x in rattrs["veloc_global_offset"]]
                    stop = [o + int(n) for o, n in zip(offset, rattrs["veloc_shape"])]
                    box = list(zip(offset, stop))[::-1] if reverse else list(zip(offset, stop))
                    if all(b > a for a, b in box):
                        layout[tuple(slice(a, b) for a, b in box)] = source
                dset = f.create_virtual_dataset(dname, layout)
                dset.attrs.update({k: attrs[k] for k in _SHARED_ATTRS if k in attrs})
                if how != "replicated":
                    dset.attrs["veloc_order"] = how
    return local


class GlobalFile:
    """Read-only view of a version's ``global.h5``: ``nranks``, ``regions`` (``{id:
    description}`` with ``kind``, ``dtype``, ``dtype_name``, ``order``, ``how``
    (``global``/``replicated``), ``global_shape`` or ``shape``), ``local_regions``
    (``[{"id", "reason"}]``), and hyperslab reads through the virtual datasets."""

    def __init__(self, path):
        from veloc.storage.hdf5_format import require_h5py
        h5py = require_h5py()
        self.path = Path(path)
        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: cannot open as HDF5 ({exc})") from None
        try:
            attrs = self._file.attrs
            self.name, self.version = _text(attrs["veloc_name"]), int(attrs["veloc_version"])
            self.nranks = int(attrs["veloc_nranks"])
            self.local_regions = json.loads(_text(attrs["veloc_local_regions"]))
            self.regions, self._names = {}, {}
            for key in self._file:
                a = self._file[key].attrs
                rid = json.loads(_text(a["veloc_id"]))
                how = "global" if "veloc_global_shape" in a else "replicated"
                desc = {"kind": _text(a["veloc_kind"]), "dtype": _text(a["veloc_dtype"]),
                        "dtype_name": _text(a.get("veloc_dtype_name", "")), "order": _text(a["veloc_order"]),
                        "how": how}
                if how == "global":
                    desc["global_shape"] = [int(x) for x in a["veloc_global_shape"]]
                else:
                    desc["shape"] = list(self._file[key].shape)
                self.regions[rid], self._names[rid] = desc, key
        except (KeyError, ValueError, TypeError) as exc:
            self._file.close()
            raise CorruptCheckpointError(f"{path}: not a veloc global.h5 ({exc!r})") from None

    def dataset(self, region_id):
        """The h5py virtual dataset of a region (global or replicated)."""
        return self._file[self._names[region_id]]

    def read_slab(self, region_id, offset, out):
        """Fill the array ``out`` with the slab of global region ``region_id`` starting at
        ``offset`` (``out``'s shape), read through the virtual dataset, no temporary."""
        desc = self.regions[region_id]
        box = [slice(o, o + n) for o, n in zip(offset, out.shape)]
        target = out
        if desc["order"] == "F":
            box, target = box[::-1], out.T
        if out.size:
            self.dataset(region_id).read_direct(target, source_sel=tuple(box))

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
