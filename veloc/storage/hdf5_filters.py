"""HDF5 filters for ``[compress]`` with ``[flush] format = hdf5``: which regions of a rank
file are stored as chunked, compressed datasets, and with which filter.

``codec = auto`` (the default) uses HDF5's built-in **deflate (gzip) with the byte
shuffle filter** in front: every HDF5 build has both, so ``h5py``, ``h5dump``, HDFView and
ParaView read the data with no plugin and no veloc. Each region is probed as the native
compressed format probes it (:func:`~veloc.storage.compressed_file.plan_codecs`); a
region no candidate shrinks by 10 % stays a contiguous, raw dataset (written at its
offset, read through a mapping). Deflate is the portable choice, not the fast one
(``scripts/bench/bench_formats.py --only-compressed``: on the heat state it writes
several times slower than the native ``.vcz``), so a codec named explicitly selects the
matching filter of ``hdf5plugin`` (in the ``hdf5`` extra), faster to write and read but
readable only where that plugin is installed (``import hdf5plugin`` before h5py reads,
or its plugin folder in ``HDF5_PLUGIN_PATH`` for h5dump/HDFView):

* ``codec = zstd``: the Zstd filter (32015), ``level`` = its clevel (default 1), shuffle
  in front;
* ``codec = blosc2``: the Blosc2 filter (32026), LZ4 inside with Blosc2's own byte
  shuffle, as the native ``blosc2`` codec, ``level`` = its clevel 0..9 (default 1);
* ``codec = lz4``: the LZ4 filter (32004), shuffle in front (``level`` unused);
* ``codec = none``: nothing is compressed;
* ``auto``: ``level`` is the deflate level, clamped to 1..9 (default 1: the fast end;
  higher levels cost much more time for a few percent).

With a named codec every non-empty, non-scalar region is compressed. Shuffle is applied
to typed datasets whose element is wider than one byte. A region protected with
``lossy=("zfp", bound)`` is stored **exactly** (compressed losslessly like the others):
the bound is an error the user accepts, not one veloc must introduce, and an exact copy
stays readable without the zfp plugin. Chunks are slabs along the dataset's slowest axes,
about ``block_size`` bytes each. Called by the HDF5 writer of the flush module (node
engine) and, for the plugin check, by the compress module when the engine is built.
"""
import math

from veloc.storage.compressed_file import plan_codecs

from veloc.errors import ConfigError

__all__ = ["DEFAULT_CHUNK", "FILTER", "PLUGIN_FILTERS", "chunk_shape", "dataset_filter_kwargs", "deflate_level",
           "plan_filters", "require_hdf5plugin"]

FILTER = "gzip"                 # HDF5 filter 1 (deflate), built into every HDF5
PLUGIN_FILTERS = ("zstd", "blosc2", "lz4")     # [compress] codecs mapped onto hdf5plugin's filters
DEFAULT_CHUNK = 4 << 20


def require_hdf5plugin(codec):
    """The ``hdf5plugin`` module (importing it registers its filters with HDF5), or a
    ConfigError saying how to install it."""
    try:
        import hdf5plugin
    except ImportError as exc:
        raise ConfigError(f"config key 'compress.codec' = {codec} with [flush] format = hdf5 needs the "
                          f"hdf5plugin package ({exc}): pip install 'veloc[hdf5]', or set codec = auto "
                          "(HDF5's built-in deflate)") from None
    return hdf5plugin


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
    """``{region id: filter}`` (``"gzip"``, or with a named codec that codec) for the
    regions of the open ``rankfile`` to store compressed; the others (not listed) stay
    contiguous and raw. ``codec``/``level`` are the ``[compress]`` keys (see the module
    docstring)."""
    if codec == "none":
        return {}
    if codec in PLUGIN_FILTERS:
        require_hdf5plugin(codec)
        return {info.id: codec for info in rankfile.regions if info.nbytes}
    plan = plan_codecs(rankfile, codec, level)
    return {info.id: FILTER for info in rankfile.regions
            if info.nbytes and plan.get(info.id, "none") != "none"}


def dataset_filter_kwargs(shape, dtype, storage, filter_name, level, block_size=DEFAULT_CHUNK):
    """``h5py.File.create_dataset`` keywords of a dataset compressed with ``filter_name``."""
    shuffle = storage == "typed" and dtype.itemsize > 1
    kwargs = {"chunks": chunk_shape(shape, dtype.itemsize, block_size)}
    if filter_name == FILTER:
        return {**kwargs, "compression": FILTER, "compression_opts": deflate_level(level), "shuffle": shuffle}
    hdf5plugin = require_hdf5plugin(filter_name)
    if filter_name == "zstd":
        plugin = hdf5plugin.Zstd(clevel=1 if level is None else min(22, max(1, int(level))))
    elif filter_name == "blosc2":
        plugin, shuffle = hdf5plugin.Blosc2(cname="lz4", clevel=1 if level is None else min(9, max(0, int(level))),
                                            filters=hdf5plugin.Blosc2.SHUFFLE), False
    elif filter_name == "lz4":
        plugin = hdf5plugin.LZ4()
    else:
        raise ConfigError(f"config key 'compress.codec' = {filter_name}: no HDF5 filter for it; accepted: "
                          f"auto (deflate), {', '.join(PLUGIN_FILTERS)}, none")
    return {**kwargs, **dict(plugin), "shuffle": shuffle}
