"""The HDF5 persistent format: one plain HDF5 file per rank per version, plus a per-version
file of virtual datasets that stitches global arrays.

Files (below the persistent root, next to the node commit records ``n<first>-<last>.commit.json``,
``veloc.storage.node_records``)::

    <name>/v<version>/r<rank>.h5      one rank's regions (written by the flush module)
    <name>/v<version>/global.h5       virtual datasets over every rank's file; the
                                      version is complete at this level only once it exists

``r<rank>.h5`` (plain HDF5, no parallel HDF5, opens in h5py and h5dump without veloc):

* root attributes: ``veloc_format`` = 1, ``veloc_name``, ``veloc_version``,
  ``veloc_rank``, ``veloc_nranks``;
* one dataset per region, in the root group, named by the region id
  (``str(id)``; a string id spelled like an int id of the same rank gets ``str:<id>``).
  An array region is a dataset of its own shape and dtype (an ``order = "F"`` array is
  stored as its transpose, shape reversed, so the bytes are the array's memory); a dtype
  HDF5 cannot express is stored as raw ``uint8`` bytes (``veloc_storage = "bytes"``). A
  pickled region (``pickle=True``) is a 1-D ``uint8`` dataset with ``veloc_kind =
  "pickle"``; nothing is unpickled unless the restarting job protects it with pickle.
* dataset attributes: ``veloc_id`` (JSON: ``3`` or ``"grid"``), ``veloc_kind``
  (``array``/``pickle``), ``veloc_dtype`` (the exact numpy descr, as in the rank file
  header), ``veloc_dtype_name``, ``veloc_shape``, ``veloc_order`` (``C``/``F``),
  ``veloc_storage`` (``typed``/``bytes``), ``veloc_version``, ``veloc_rank``, and for a
  slab of a global array ``veloc_global_shape`` and ``veloc_global_offset``, for a
  replicated region ``veloc_replicated`` = 1.
* a dataset is **contiguous**, except with ``[compress]`` enabled: then each region the
  probe finds compressible is a **chunked** dataset through HDF5's built-in deflate
  filter (with shuffle), which every HDF5 tool reads without plugins
  (``veloc/storage/hdf5_filters.py``); incompressible regions stay contiguous and raw.

``global.h5``: root attributes ``veloc_format``, ``veloc_name``, ``veloc_version``,
``veloc_nranks``, ``veloc_local_regions`` (JSON list of ``{"id", "reason"}``: regions
that are neither global nor replicated, or whose slabs do not tile their global array);
one virtual dataset per global region (named like the rank datasets, shape
``veloc_global_shape``, reversed for ``F`` order) mapping each rank's slab from
``r<rank>.h5`` (relative file names, so a version folder can be moved whole), and one
per replicated region mapping rank 0's copy. Its attributes are those of the rank
datasets minus the rank-specific ones.

The raw bytes of each contiguous dataset are written by veloc itself (``O_DIRECT`` where the
file system takes it) at the offset HDF5 allocated for the dataset, after h5py has
written the file's metadata (h5py writes the chunked ones); the file's digest (manifest) covers
every byte, compressed chunks included. Readers:
:class:`Hdf5RankFile` (one rank's file, the same calls as
:class:`veloc.storage.rankfile.RankFile`) and :class:`GlobalFile` (hyperslab reads
through the virtual datasets). Used by the flush module (engine), by restart (every
application rank) and by readers of checkpoints.
"""
import dataclasses
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from veloc.errors import ConfigError, CorruptCheckpointError
from veloc.storage.fileio import O_DIRECT, atomic_path, pwrite_all
from veloc.storage.hashing import digest_buffer, hasher, map_readonly
from veloc.storage.hdf5_filters import DEFAULT_CHUNK, dataset_filter_kwargs
from veloc.storage.hdf5_global import GlobalFile, write_global    # the version file, re-exported here
from veloc.storage.rankfile import RegionInfo, RegionReader, dtype_descr

__all__ = ["GLOBAL_FILE", "GlobalFile", "Hdf5RankFile", "SUFFIX", "dataset_names", "rank_file_name",
           "require_h5py", "write_global", "write_rank_h5"]

SUFFIX = ".h5"
GLOBAL_FILE = "global.h5"
FORMAT = 1
ALIGN = 4096
ALIGN_THRESHOLD = 64 << 10     # datasets at least this large start on a 4 KiB boundary
DIRECT_CHUNK = 32 << 20


def require_h5py():
    """The ``h5py`` module, or a ConfigError saying how to install it."""
    try:
        import h5py
    except ImportError as exc:
        raise ConfigError("[flush] format = hdf5 needs h5py, which is not installed here "
                          f"({exc}): pip install 'veloc[hdf5]'") from None
    try:
        import hdf5plugin  # noqa: F401  (registers the Zstd/Blosc2/LZ4 filters of [compress] codecs)
    except ImportError:
        pass           # deflated and raw datasets need no plugin
    return h5py


def rank_file_name(rank):
    return f"r{int(rank)}{SUFFIX}"


def dataset_names(infos):
    """``{region id: dataset name}`` for one rank's regions (see the module docstring)."""
    int_names = {str(i.id) for i in infos if isinstance(i.id, int)}
    return {i.id: (f"str:{i.id}" if isinstance(i.id, str) and i.id in int_names else str(i.id))
            for i in infos}


def _storage(h5py, info):
    """``(hdf5 dataset shape, numpy dtype, "typed"|"bytes")`` for a region."""
    if info.kind != "array":
        return (info.nbytes,), np.dtype(np.uint8), "bytes"
    dtype = info.numpy_dtype()
    shape = tuple(info.shape)[::-1] if info.order == "F" else tuple(info.shape)
    try:
        h5py.h5t.py_create(dtype, logical=True)
    except (TypeError, ValueError):
        return (info.nbytes,), np.dtype(np.uint8), "bytes"
    return shape, dtype, "typed"


def _region_attrs(info, storage):
    attrs = {"veloc_id": json.dumps(info.id), "veloc_kind": info.kind, "veloc_dtype": info.dtype,
             "veloc_dtype_name": info.dtype_name, "veloc_shape": np.asarray(info.shape, np.int64),
             "veloc_order": info.order, "veloc_storage": storage}
    if info.global_shape:
        attrs["veloc_global_shape"] = np.asarray(info.global_shape, np.int64)
        attrs["veloc_global_offset"] = np.asarray(info.global_offset, np.int64)
    if info.replicated:
        attrs["veloc_replicated"] = 1
    return attrs


# --------------------------------------------------------------------------- writing

def write_rank_h5(rankfile, path, name, version, rank, nranks, checksum=None, direct=True, durable=True,
                  filters=None, level=None, block_size=None, staged=False):
    """Write the regions of an open, verified :class:`RankFile` as ``path`` (an
    ``r<rank>.h5``), committed atomically (temp name, fsync, rename, directory fsync;
    ``staged``: no directory fsync, the node's commit record syncs the folder once).
    ``filters`` (``{region id: "gzip"|"zstd"|...}``, see
    :func:`veloc.storage.hdf5_filters.plan_filters`) names the regions stored as chunked
    datasets through that HDF5 filter at ``level``, chunks of about ``block_size`` bytes;
    the others stay contiguous.

    Returns ``(size, digest, datasets)``: the file's size, its ``checksum`` digest
    (``None`` without an algorithm), computed from the bytes as they are laid out in the
    file, and ``[(dataset name, attributes, shape, dtype descr)]`` (JSON-ready; kept in
    the manifest so ``global.h5`` is built without opening every rank's file). Called by
    the flush module in the node's engine, one call per local rank.
    """
    h5py = require_h5py()
    with atomic_path(path, durable, staged=staged) as tmp:
        placed, datasets = _write_metadata(h5py, rankfile, tmp, name, version, rank, nranks,
                                           filters or {}, level, block_size)
        size = os.stat(tmp).st_size
        digest = _write_data(tmp, placed, size, checksum, direct, durable)
    return size, digest, datasets


def _write_metadata(h5py, rankfile, tmp, name, version, rank, nranks, filters, level, block_size):
    """Create the HDF5 structure with every contiguous dataset allocated (never filled)
    and every filtered one written through h5py; return ``[(file offset, source bytes)]``
    of the data still to write, and the datasets."""
    placed, datasets = [], []
    names = dataset_names(rankfile.regions)
    with h5py.File(tmp, "w", alignment_threshold=ALIGN_THRESHOLD, alignment_interval=ALIGN,
                   track_times=False) as f:
        f.attrs.update({"veloc_format": FORMAT, "veloc_name": name, "veloc_version": int(version),
                        "veloc_rank": int(rank), "veloc_nranks": int(nranks)})
        for info in rankfile.regions:
            shape, dtype, storage = _storage(h5py, info)
            filtered = info.id in filters and bool(shape) and info.nbytes > 0
            if filtered:
                kwargs = dataset_filter_kwargs(shape, dtype, storage, filters[info.id], level,
                                               block_size or DEFAULT_CHUNK)
                dset = f.create_dataset(names[info.id], shape=shape, dtype=dtype, **kwargs)
            else:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dset = f.create_dataset(names[info.id], shape=shape, dtype=dtype, dcpl=dcpl)
            attrs = _region_attrs(info, storage)
            dset.attrs.update(attrs)
            datasets.append((names[info.id], {k: v.tolist() if isinstance(v, np.ndarray) else v
                                              for k, v in attrs.items()}, list(shape), dtype_descr(dtype)))
            dset.attrs.update({"veloc_version": int(version), "veloc_rank": int(rank)})
            if not info.nbytes:
                continue
            if filtered:           # h5py runs the filter; the bytes land in the file's chunks
                dset.write_direct(np.ascontiguousarray(rankfile.bytes_view(info).view(dtype).reshape(shape)))
                continue
            offset = dset.id.get_offset()
            if offset is None:     # HDF5 allocates some (scalar) datasets only on write
                dset.write_direct(np.ascontiguousarray(rankfile.bytes_view(info).view(dtype).reshape(shape)))
            else:
                placed.append((int(offset), rankfile.bytes_view(info)))
    return sorted(placed, key=lambda p: p[0]), datasets


def _write_data(tmp, placed, size, checksum, direct, durable):
    """Write each region's bytes at its dataset's offset and digest the file in order."""
    fd = os.open(tmp, os.O_RDWR)
    dfd = None
    if direct and O_DIRECT:
        try:
            dfd = os.open(tmp, os.O_WRONLY | O_DIRECT)
        except OSError:
            dfd = None
    h = hasher(checksum) if checksum else None
    # the writes (which release the GIL) run in a helper thread while this one hashes
    pool = ThreadPoolExecutor(1) if h is not None and placed else None
    try:
        def write_all():
            nonlocal dfd
            for offset, view in placed:
                dfd = _write_at(fd, dfd, view, offset)
        writing = pool.submit(write_all) if pool is not None else None
        if writing is None:
            write_all()
        pos = 0
        for offset, view in placed if h is not None else ():
            if offset > pos:       # metadata, written by h5py before
                h.update(os.pread(fd, offset - pos, pos))
            h.update(view)
            pos = offset + len(view)
        if h is not None and size > pos:
            h.update(os.pread(fd, size - pos, pos))
        if writing is not None:
            writing.result()
        if durable:
            os.fsync(fd)
    finally:
        if pool is not None:
            pool.shutdown()
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    return h.hexdigest() if h is not None else None


def _write_at(fd, dfd, view, offset):
    """Write ``view`` at ``offset``: the block-aligned bulk through ``dfd`` (O_DIRECT) when
    both ends are aligned, the rest buffered. Returns ``dfd``, ``None`` once refused."""
    n = len(view)
    done = 0
    aligned = n - n % ALIGN
    if dfd is not None and offset % ALIGN == 0 and aligned and np.asarray(view).ctypes.data % ALIGN == 0:
        mem = memoryview(view)
        try:
            while done < aligned:
                done += os.pwrite(dfd, mem[done:min(done + DIRECT_CHUNK, aligned)], offset + done)
        except OSError:
            os.close(dfd)
            dfd = None
        finally:
            mem.release()
    if done < n:
        pwrite_all(fd, memoryview(view)[done:], offset + done)
    return dfd


# --------------------------------------------------------------------------- reading

def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_from_attrs(path, dset, attrs, offset):
    try:
        region_id = json.loads(_text(attrs["veloc_id"]))
        shape = tuple(int(x) for x in attrs["veloc_shape"])
        gshape = tuple(int(x) for x in attrs.get("veloc_global_shape", ()))
        goffset = tuple(int(x) for x in attrs.get("veloc_global_offset", ()))
        return RegionInfo(region_id, _text(attrs["veloc_kind"]), _text(attrs["veloc_dtype"]), shape,
                          _text(attrs["veloc_order"]), offset, int(dset.id.get_storage_size()),
                          _text(attrs.get("veloc_dtype_name", "")), gshape, goffset,
                          bool(attrs.get("veloc_replicated", 0)))
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path}: dataset {dset.name} lacks veloc attributes ({exc!r})") from None


class Hdf5RankFile(RegionReader):
    """Read-only view of one ``r<rank>.h5``, validated on open; the same calls as
    :class:`~veloc.storage.rankfile.RankFile` (``regions``, ``region``, ``bytes_view``,
    ``as_array``, ``read_into``, ``digest``, ``close``). Region bytes are read from a
    read-only mapping of the file at each contiguous dataset's offset, so a restore is
    one copy straight into the protected array; a chunked (deflated) dataset is decoded
    by h5py straight into the caller's array (:meth:`_read_filtered`). Any process may
    open one."""

    def __init__(self, path):
        h5py = require_h5py()
        self.path = Path(path)
        self._filtered, self._h5 = {}, None      # {region id: dataset name} of chunked datasets
        self._h5_lock = threading.Lock()         # restores may run in threads: one h5py handle
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: cannot open ({exc.strerror})") from None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            try:
                with h5py.File(path, "r") as f:
                    self.meta = {k[6:]: (_text(v) if isinstance(v, (bytes, str)) else int(v))
                                 for k, v in f.attrs.items() if k.startswith("veloc_")}
                    self.regions = [self._region(path, f[key]) for key in f]
            except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
                raise CorruptCheckpointError(f"{path}: not a readable veloc HDF5 rank file ({exc!r})") from None
            self._map = map_readonly(self._file.fileno(), self.size) if self.size else None
        except BaseException:
            self._file.close()
            raise

    def _region(self, path, dset):
        offset = dset.id.get_offset()
        info = _info_from_attrs(path, dset, dset.attrs, int(offset or 0))
        if dset.chunks is not None:           # a deflated dataset ([compress]): read through h5py
            return self._filtered_region(path, dset, info)
        if info.kind == "array":
            expected = int(np.prod(info.shape, dtype=np.int64)) * info.numpy_dtype().itemsize
            if expected != info.nbytes:
                raise CorruptCheckpointError(f"{path}: dataset {dset.name} holds {info.nbytes} bytes, "
                                             f"{expected} expected for {info.dtype} {info.shape}")
        if info.nbytes and (offset is None or info.offset + info.nbytes > self.size):
            raise CorruptCheckpointError(f"{path}: dataset {dset.name} is not a contiguous dataset inside "
                                         f"the file ({self.size} bytes): truncated or not written by veloc")
        return info

    def _filtered_region(self, path, dset, info):
        """The region of a chunked (filtered) dataset: its raw size checked against the
        dataset's shape and type; its bytes are decoded by :meth:`_read_filtered`."""
        raw = int(np.prod(dset.shape, dtype=np.int64)) * dset.dtype.itemsize
        if info.kind == "array":
            expected = int(np.prod(info.shape, dtype=np.int64)) * info.numpy_dtype().itemsize
        else:
            expected = raw
        if raw != expected:
            raise CorruptCheckpointError(f"{path}: dataset {dset.name} holds {raw} bytes once decoded, "
                                         f"{expected} expected for {info.dtype} {info.shape}")
        self._filtered[info.id] = dset.name
        return dataclasses.replace(info, offset=0, nbytes=expected)

    def is_filtered(self, info):
        """True when region ``info`` is stored chunked through an HDF5 filter."""
        return info.id in self._filtered

    def _read_filtered(self, info, out=None):
        """Decode filtered region ``info`` through h5py straight into ``out`` (the region's
        dtype and shape; ``None``: a new array), returned. A temporary is used only when
        ``out`` is not contiguous. Raises CorruptCheckpointError when HDF5 cannot decode it."""
        array = info.kind == "array"
        if out is None:
            out = (np.empty(info.shape, info.numpy_dtype(), order=info.order) if array
                   else np.empty(info.nbytes, np.uint8))
        if not info.nbytes:
            return out
        target = out.T if array and info.order == "F" else out       # the dataset's own layout
        h5py = require_h5py()
        try:
            with self._h5_lock:
                if self._h5 is None:
                    self._h5 = h5py.File(self.path, "r")
            dset = self._h5[self._filtered[info.id]]
            if target.flags.c_contiguous and target.dtype == dset.dtype and target.shape == dset.shape:
                dset.read_direct(target)
            elif target.flags.c_contiguous and dset.dtype == np.uint8:      # stored as raw bytes
                dset.read_direct(target.reshape(-1).view(np.uint8))
            else:
                tmp = np.empty(dset.shape, dset.dtype)
                dset.read_direct(tmp)
                np.copyto(target, tmp.reshape(-1).view(target.dtype).reshape(target.shape), casting="no")
        except (OSError, KeyError, ValueError, TypeError) as exc:
            hint = (" (its HDF5 filter is not available here: pip install 'veloc[hdf5]' for hdf5plugin)"
                    if "filter" in str(exc) else "")
            raise CorruptCheckpointError(f"{self.path}: cannot decode dataset {self._filtered[info.id]} "
                                         f"(region {info.id!r}): {exc}{hint}") from None
        return out

    def digest(self, algorithm):
        return digest_buffer(self._map if self._map is not None else b"", algorithm)

    def bytes_view(self, info):
        if info.id in self._filtered:
            return self._read_filtered(info, np.empty(info.nbytes, np.uint8)) if info.kind != "array" \
                else self._read_filtered(info).reshape(-1, order="A").view(np.uint8)
        if not info.nbytes:
            return np.empty(0, np.uint8)
        return np.frombuffer(self._map, np.uint8, info.nbytes, info.offset)

    def as_array(self, info):
        if info.id in self._filtered:
            return self._read_filtered(info)
        return self.bytes_view(info).view(info.numpy_dtype()).reshape(info.shape, order=info.order)

    def read_into(self, info, out):
        """Copy array region ``info`` into ``out`` (same dtype and shape), no temporary."""
        if info.id in self._filtered:
            self._read_filtered(info, out)
            return
        np.copyto(out, self.as_array(info), casting="no")

    def close(self):
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None
        super().close()

