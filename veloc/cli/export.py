"""``veloc export CFG NAME VERSION OUT.h5``: one version, from any level, as one HDF5 file.

Run by a user on any machine that sees the checkpoint (no MPI). The version is opened
with :func:`veloc.open` (the same level choice and digest checks) and written with
h5py, so h5py, ``h5dump``, HDFView or ParaView read it without veloc:

- a global array (``protect(..., global_shape=, offset=)``) is one dataset ``/<id>`` of
  its global shape, written slab by slab (never held whole in memory);
- a replicated region (``replicated=True``) is one dataset ``/<id>``, from one copy;
- any other array region is ``/rank<r>/<id>`` for each rank holding it;
- a pickled region is skipped unless ``--allow-pickle``, which stores its raw pickle
  bytes (``uint8``, never unpickled here) as ``/rank<r>/<id>``.

Dataset names are the region ids (an int id that a string id spells too becomes
``int.<id>``); attributes record the checkpoint name, version, rank count, level, and
each region's id, kind, dtype and element type name; ``storage`` is ``typed``, or
``bytes`` for a dtype HDF5 cannot express (``datetime64``, ``U``: stored as ``uint8`` with
one more dimension of the item size) and for pickle bytes. The file is committed atomically
(written under a temporary name with mode 0600, fsynced, renamed, directory fsynced):
``OUT`` is either absent or complete. Needs h5py (``pip install 'veloc[hdf5]'``).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from veloc.cli.levels import UsageError
from veloc.storage.fileio import atomic_path
from veloc.storage.levels import LEVEL_ORDER
from veloc.names import check_name
from veloc.progress import EVERY, human_bytes
from veloc.reader import open as open_view
from veloc.reader_view import region_names

FORMAT = "veloc-export/1"


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise UsageError("veloc export needs h5py: pip install 'veloc[hdf5]'") from None
    return h5py


def _version(text):
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"version must be a non-negative integer, got {text!r}")
    return int(text)


def seconds_arg(text):
    """argparse type: a number of seconds > 0 (also used by ``veloc drain``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def export_args(p):
    p.epilog = ("The version is read as veloc.open reads it (the fastest intact copy of each rank, digests "
                "checked). In OUT: a global array is the dataset /<id> of its global shape, a replicated region "
                "/<id> once, any other region /rank<r>/<id>. Needs h5py: pip install 'veloc[hdf5]'.")
    p.add_argument("cfg", metavar="CFG", help="the application's veloc INI configuration file")
    p.add_argument("name", metavar="NAME", help="checkpoint name")
    p.add_argument("version", metavar="VERSION", type=_version, help="checkpoint version")
    p.add_argument("out", metavar="OUT.h5", help="HDF5 file to create (mode 0600, committed atomically)")
    p.add_argument("--level", choices=[lvl for lvl in LEVEL_ORDER if lvl != "erasure"],
                   help="read only this level (default: the fastest intact copy of each rank)")
    p.add_argument("--node", action="append", metavar="N",
                   help="node whose scratch to read; repeat for several (default: every node's scratch folder "
                        "on this machine, and this node's)")
    p.add_argument("--no-verify", action="store_true", help="check sizes and headers only, not content digests")
    p.add_argument("--allow-pickle", action="store_true",
                   help="store pickled regions as their raw pickle bytes (uint8; never unpickled here)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--progress", type=seconds_arg, default=EVERY, metavar="S",
                   help=f"print bytes written and the rate every S seconds (default {EVERY:g})")


class _Progress:
    """One line on stderr every ``every`` seconds while an export runs."""

    def __init__(self, total, every, stream=None):
        self.total, self.every, self.done = total, every, 0
        self.start = time.monotonic()
        self.next_at = self.start + every
        self.stream = stream or sys.stderr

    def add(self, nbytes):
        self.done += nbytes
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + self.every
            rate = self.done / max(now - self.start, 1e-9)
            print(f"veloc export: {human_bytes(self.done)} of {human_bytes(self.total)} "
                  f"({100 * self.done / max(self.total, 1):.0f} %), {human_bytes(rate)}/s",
                  file=self.stream, flush=True)


def _attrs(dataset, spec, kind, view, rank=None):
    dataset.attrs["region_id"] = spec.id
    dataset.attrs["region_id_type"] = type(spec.id).__name__
    dataset.attrs["kind"] = kind
    if spec.dtype is not None:
        dataset.attrs["dtype"] = spec.dtype.str if not spec.dtype.fields else json.dumps(spec.dtype.descr)
    if spec.dtype_name:
        dataset.attrs["dtype_name"] = spec.dtype_name
    dataset.attrs["nranks"] = view.nranks
    if rank is not None:
        dataset.attrs["rank"] = rank


def _total(view, allow_pickle):
    total = 0
    for spec in view.regions.values():
        if spec.kind != "array" and not allow_pickle:
            continue
        for rank in spec.ranks if not spec.replicated else spec.ranks[:1]:
            total += view.read(spec.id, rank).nbytes if spec.kind == "array" else 0
    return total


def _as_bytes(h5py, dtype):
    """Whether ``dtype`` must be stored as raw bytes: one HDF5 cannot express
    (``datetime64``, ``U``) becomes ``uint8`` with one more dimension of its item size."""
    try:
        h5py.h5t.py_create(dtype, logical=True)
    except TypeError:
        return True
    return False


def _as_stored(array, raw):
    if not raw:
        return array
    return np.ascontiguousarray(array).view(np.uint8).reshape(array.shape + (array.dtype.itemsize,))


def _create(h5file, name, spec, shape, raw):
    dtype = np.dtype(np.uint8) if raw else spec.dtype
    dataset = h5file.create_dataset(name, shape=tuple(shape) + ((spec.dtype.itemsize,) if raw else ()), dtype=dtype)
    dataset.attrs["storage"] = "bytes" if raw else "typed"
    return dataset


def write_export(h5file, view, allow_pickle=False, progress=None):
    """Write every region of ``view`` into the open h5py file; returns the ids skipped."""
    h5py = _import_h5py()
    h5file.attrs.update({"format": FORMAT, "name": view.name, "version": view.version,
                         "nranks": view.nranks, "level": view.level,
                         "rank_levels": json.dumps({str(r): lvl for r, lvl in view.rank_levels.items()})})
    names = region_names(list(view.regions.values()))
    skipped = []
    shared = {names[s.id] for s in view.regions.values() if s.kind == "array" and (s.is_global or s.replicated)}
    clash = sorted(n for n in shared if n.startswith("rank") and n[4:].isdigit())
    if clash:
        raise UsageError(f"region(s) {', '.join(clash)} would clash with the per-rank groups /rank<r> of the export")
    for spec in view.regions.values():
        name = names[spec.id]
        raw = spec.kind == "array" and _as_bytes(h5py, spec.dtype)
        if spec.kind == "array" and spec.is_global:
            dataset = _create(h5file, name, spec, spec.global_shape, raw)
            _attrs(dataset, spec, "global", view)
            for _rank, index, slab in view.slabs(spec.id):
                dataset[index] = _as_stored(slab, raw)
                progress and progress.add(slab.nbytes)
        elif spec.kind == "array" and spec.replicated:
            data = view.read_global(spec.id)
            _create(h5file, name, spec, data.shape, raw)[...] = _as_stored(data, raw)
            _attrs(h5file[name], spec, "replicated", view)
            progress and progress.add(data.nbytes)
        elif spec.kind == "array" or allow_pickle:
            for rank in spec.ranks:
                group = h5file.require_group(f"rank{rank}")
                if spec.kind == "array":
                    data = view.read(spec.id, rank)
                    _create(group, name, spec, data.shape, raw)[...] = _as_stored(data, raw)
                else:
                    data = np.frombuffer(view.read_bytes(spec.id, rank), np.uint8)
                    group.create_dataset(name, data=data).attrs["storage"] = "bytes"
                _attrs(group[name], spec, "per-rank" if spec.kind == "array" else "pickle", view, rank)
                progress and progress.add(data.nbytes)
        else:
            skipped.append(spec.id)
    return skipped


def export_version(view, out, allow_pickle=False, progress=None, force=False):
    """Commit ``view`` as the HDF5 file ``out`` atomically (mode 0600); returns the ids of
    pickled regions skipped."""
    h5py = _import_h5py()
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory")
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as h5file:
            skipped = write_export(h5file, view, allow_pickle, progress)
    return skipped


def run_export(args):
    """The ``veloc export`` command: exit 0 on success."""
    _import_h5py()
    name = check_name(args.name, error=UsageError)
    with open_view(args.cfg, name, args.version, args.level, verify=not args.no_verify,
                   nodes=args.node) as view:
        progress = _Progress(_total(view, args.allow_pickle), args.progress)
        skipped = export_version(view, args.out, args.allow_pickle, progress, args.force)
        print(f"exported {view.name} v{view.version} ({view.nranks} ranks, level {view.level}, "
              f"{len(view.regions) - len(skipped)} region(s), {human_bytes(progress.done)}) to {args.out}")
        for region_id in skipped:
            print(f"skipped pickled region {region_id!r} (use --allow-pickle to store its raw pickle bytes)")
    return 0
