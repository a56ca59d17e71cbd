"""HDF5 filters for ``[compress]`` with ``[flush] format = hdf5``: which regions of a rank
file are stored as chunked, compressed datasets, and with which filter.

The filter is HDF5's built-in **deflate (gzip) with the byte shuffle filter** in front:
every HDF5 build has both, so ``h5py``, ``h5dump``, HDFView and ParaView read the data
with no plugin and no veloc (``hdf5plugin``'s Zstd/Blosc would be faster to write but
unreadable wherever the plugin is not installed; see ``scripts/bench/bench_formats.py``
and the README for the measured trade-off). ``[compress]`` keys map onto it:

* ``codec = auto``: each region is probed as the native compressed format probes it
  (:func:`~veloc.storage.compressed_file.plan_codecs`); a region no candidate shrinks by
  10 % stays a contiguous, raw dataset (written at its offset, read through a mapping);
* ``codec = zstd|lz4|blosc2``: every non-empty region is deflated;
* ``codec = none``: nothing is compressed;
* ``level``: the deflate level, clamped to 1..9 (default 1: the fast end; higher levels
  cost much more time for a few percent).

Shuffle is applied to typed datasets whose element is wider than one byte. A region
protected with ``lossy=("zfp", bound)`` is stored **exactly** (deflated, lossless): the
lossy bound is an upper limit the user accepts, and an exact copy honours it while
staying readable everywhere (zfp's HDF5 filter is a plugin). Chunks are slabs along the
dataset's slowest axes, about ``block_size`` bytes each. Called by the HDF5 writer of the
flush module (node engine).
"""
import math

from veloc.storage.compressed_file import plan_codecs

__all__ = ["DEFAULT_CHUNK", "FILTER", "chunk_shape", "deflate_level", "plan_filters"]

FILTER = "gzip"                 # HDF5 filter 1 (deflate), built into every HDF5
DEFAULT_CHUNK = 4 << 20


def deflate_level(level):
    """The deflate level for a ``[compress] level`` (``None``: 1), clamped to 1..9."""
    return 1 if level is None else min(9, max(1, int(level)))


def chunk_shape(shape, itemsize, target=DEFAULT_CHUNK):
    """A chunk shape for a dataset of ``shape``: whole trailing axes, the slowest axes cut
    so that one chunk holds about ``target`` bytes (at least one element per axis)."""
    chunk = [max(1, int(n)) for n in shape]
    for axis in range(len(chunk)):
        inner = itemsize * math.prod(chunk[axis + 1:])
        if inner * chunk[axis] <= target:
            break
        chunk[axis] = max(1, target // inner)
    return tuple(chunk)


def plan_filters(rankfile, codec="auto", level=None):
    """``{region id: "gzip"}`` for the regions of the open ``rankfile`` to store deflated;
    the others (not listed) stay contiguous and raw. ``codec``/``level`` are the
    ``[compress]`` keys (see the module docstring)."""
    if codec == "none":
        return {}
    plan = plan_codecs(rankfile, codec, level if codec == "auto" else None)
    return {info.id: FILTER for info in rankfile.regions
            if info.nbytes and plan.get(info.id, "none") != "none"}


def dataset_filter_kwargs(shape, dtype, storage, level, block_size=DEFAULT_CHUNK):
    """``h5py.File.create_dataset`` keywords of a deflated dataset."""
    return {"chunks": chunk_shape(shape, dtype.itemsize, block_size) if shape else None,
            "compression": FILTER, "compression_opts": deflate_level(level),
            "shuffle": storage == "typed" and dtype.itemsize > 1}
