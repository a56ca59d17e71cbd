"""Persistent formats: how the flush module stores a version at the persistent level.

``[flush] format`` picks the writer: ``native`` (each rank's verified scratch ``.vck``
file copied as is) or ``hdf5`` (one plain HDF5 file per rank plus a per-version file of
virtual datasets, see :mod:`veloc.storage.hdf5_format`). Readers never look at the
config: a copy says by its files which format it is in, so a job configured for one
format restarts from versions written in the other.

Call sequence, writer side (the flush module, in each node's engine; not collective)::

    writer = make_writer(section)                  # once, when the engine is built
    for every version the flush module acts on:
        for each local rank (threads, up to max_parallelism):
            out = writer.write_rank(ctx, cmd, rank, manifest)
                                                   # files written (staged: synced, not
                                                   # yet committed); returns the manifest
        flush commits every ``out`` of the node    # COMMIT 1: one record per node and
                                                   # store root (veloc.storage.node_records);
                                                   # the node's copies exist
        writer.finish_version(ctx, cmd)            # once per node, after all its ranks:
                                                   # native: nothing; hdf5: the node that
                                                   # sees every rank's manifest commits
                                                   # global.h5 (COMMIT 2: the version is
                                                   # complete at this level)

Reader side (any process: the engine's restore and verify, an application rank reading
a persistent copy in place, the command-line tool)::

    version_complete(vdir, rank)   # may this rank's copy be used at all?
    open_rank_file(path)           # a verified-on-open reader: regions, region(id),
                                   # bytes_view, as_array, read_into, digest, close

To add a format: a writer class with ``write_rank`` and ``finish_version``, a reader
class like :class:`~veloc.storage.rankfile.RankFile` recognised by its file suffix in
:func:`open_rank_file`, its name in ``WRITERS`` and in the ``[flush] format`` choices
(``veloc/config.py``). See docs/ARCHITECTURE.md.
"""
import contextlib
import mmap
import os
from pathlib import Path

from veloc.errors import CheckpointError, CorruptCheckpointError
from veloc.storage.fileio import copy_file, make_dirs
from veloc.storage.hashing import hasher
from veloc.storage.manifest import FileEntry, file_fingerprint
from veloc.storage.rankfile import RankFile

FORMATS = ("native", "hdf5")


def open_rank_file(path, kind="regions", workers=1):
    """Open a rank's regions file of any format, validated on open: a compressed copy
    (manifest entry ``kind == "compressed"``, a ``.vcz``), an HDF5 rank file (by suffix) or
    a native ``.vck``. ``workers``: decode threads of a compressed copy."""
    if kind == "compressed":
        from veloc.storage.compressed_file import CompressedReader
        return CompressedReader(path, workers)
    if str(path).endswith(".h5"):
        from veloc.storage.hdf5_format import Hdf5RankFile
        return Hdf5RankFile(path)
    return RankFile(path)


def version_complete(vdir, rank):
    """Whether ``rank``'s copy in version folder ``vdir`` belongs to a version complete at
    its level: always for native copies; for HDF5 copies once ``global.h5`` exists."""
    from veloc.storage.hdf5_format import GLOBAL_FILE, rank_file_name
    vdir = Path(vdir)
    return not (vdir / rank_file_name(rank)).exists() or (vdir / GLOBAL_FILE).exists()


def copy_verified(manifest, src, dst, what, direct=False, verify=True, mapped_files=None, entries=None):
    """Copy every file of ``manifest`` (or only ``entries``) from level ``src`` to level
    ``dst``, checking digests.

    The digest is computed on the bytes as they are copied, so a copy that would carry
    corrupted data is refused (the destination is never committed); ``verify=False``
    checks sizes only. ``direct``: write with O_DIRECT where the destination file system
    takes it (``[flush] direct_io``), from the engine's mapping of the file
    (``mapped_files``: kept from an earlier run of a recycled file, or made by this run's
    checksum module), if any. On a shared level (persistent) the
    files are staged (``veloc.storage.fileio.atomic_file``): the caller's commit record
    makes them count.

    Returns ``{file name: fingerprint}`` of the copies whose digest is known (see
    :func:`veloc.storage.manifest.file_fingerprint`): a restart that finds such a copy
    unchanged reads and hashes it in one pass instead of hashing it first.
    """
    fingerprints = {}
    sdir = src.version_dir(manifest.name, manifest.version)
    ddir = dst.version_dir(manifest.name, manifest.version)
    staged = getattr(dst, "shared", False)
    if not staged:
        make_dirs(ddir)          # a staged file makes its folder when it is missing
    for entry in manifest.files if entries is None else entries:
        h = hasher(manifest.checksum) if (verify and manifest.checksum and entry.digest) else None
        try:
            source_map = mapped_files.source(sdir / entry.name) if mapped_files is not None and direct else None
            size = copy_file(sdir / entry.name, ddir / entry.name, durable=dst.durable,
                             on_chunk=h.update if h else None, direct=direct, source_map=source_map,
                             staged=staged)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{what}: {sdir / entry.name} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{what}: cannot copy {sdir / entry.name} to {ddir}: {exc.strerror}") from exc
        if size != entry.size or (h and h.hexdigest() != entry.digest):
            raise CorruptCheckpointError(f"{what}: {sdir / entry.name} does not match its manifest "
                                         f"(size or {manifest.checksum} digest); not copied to {dst.level}")
        if manifest.checksum and entry.digest:
            fingerprints[entry.name] = file_fingerprint(os.stat(ddir / entry.name))
    return fingerprints


class NativeWriter:
    """``format = native``: the scratch files, copied byte for byte."""
    name = "native"

    def __init__(self, direct_io=True):
        self.direct_io = direct_io

    def write_rank(self, ctx, cmd, rank, manifest):
        """Copy ``rank``'s committed scratch copy (``manifest``) to persistent; return the
        persistent manifest to commit. Digests computed moments ago by this run's checksum
        module from these very files are not recomputed; a copy that went bad in between
        still fails its check at restart. With a compressed sidecar (``[compress]``), that
        is copied in place of the raw rank file."""
        from veloc.storage.compressed_copy import compressed_record, flush_compressed
        record = compressed_record(manifest)
        if record is not None and "persistent" in record.get("levels", ()):
            return flush_compressed(manifest, record, ctx.scratch(rank), ctx.persistent(rank), direct=self.direct_io)
        fingerprints = copy_verified(manifest, ctx.scratch(rank), ctx.persistent(rank), "flush",
                                     direct=self.direct_io, verify=rank not in cmd.fresh_digests,
                                     mapped_files=cmd.mapped)
        return manifest.copy_for("persistent", fingerprints=fingerprints)

    def finish_version(self, ctx, cmd):
        return None


class Hdf5Writer(NativeWriter):
    """``format = hdf5``: ``r<rank>.h5`` per rank, ``global.h5`` per version."""
    name = "hdf5"

    def __init__(self, direct_io=True):
        from veloc.storage.hdf5_format import require_h5py
        require_h5py()
        super().__init__(direct_io)

    def write_rank(self, ctx, cmd, rank, manifest):
        from veloc.storage.hdf5_filters import plan_filters
        from veloc.storage.hdf5_format import rank_file_name, write_rank_h5
        src, dst = ctx.scratch(rank), ctx.persistent(rank)
        sdir = src.version_dir(cmd.name, cmd.version)
        ddir = dst.version_dir(cmd.name, cmd.version)
        make_dirs(ddir)
        out = manifest.copy_for("persistent")
        routed = [e for e in manifest.files if e.kind != "regions"]
        copy_verified(manifest, src, dst, "flush", direct=self.direct_io, verify=rank not in cmd.fresh_digests,
                      mapped_files=cmd.mapped, entries=routed)
        entry = manifest.file("regions")
        if entry is None:
            return out
        path = sdir / entry.name
        compress = _compress_section(ctx)
        try:
            with _source_map(path, cmd.mapped) as mapping, RankFile(path, mapped=mapping) as rankfile:
                if (rank not in cmd.fresh_digests and manifest.checksum and entry.digest
                        and rankfile.digest(manifest.checksum) != entry.digest):
                    raise CorruptCheckpointError(f"flush: {rankfile.path} does not match its manifest "
                                                 f"({manifest.checksum} digest); not written to persistent")
                filters = (plan_filters(rankfile, compress["codec"], compress["level"])
                           if compress is not None else None)
                size, digest, datasets = write_rank_h5(
                    rankfile, ddir / rank_file_name(rank), cmd.name, cmd.version, rank, cmd.nranks,
                    checksum=manifest.checksum if entry.digest else None, direct=self.direct_io,
                    durable=dst.durable, filters=filters, staged=getattr(dst, "shared", False),
                    level=compress["level"] if compress is not None else None,
                    block_size=compress["block_size"] if compress is not None else None)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"flush: {path} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"flush: cannot write {ddir / rank_file_name(rank)}: {exc}") from exc
        out.files = routed + [FileEntry(rank_file_name(rank), size, "regions", digest=digest)]
        out.record_module("hdf5", datasets=datasets)     # what global.h5 needs, without reopening
        return out

    def finish_version(self, ctx, cmd):
        """Commit ``global.h5`` if every rank's copy of the version is committed and no
        other node has done it yet; returns its path, or ``None``."""
        from veloc.storage.hdf5_format import GLOBAL_FILE, write_global
        store = ctx.persistent(0)
        vdir = store.version_dir(cmd.name, cmd.version)
        target = vdir / GLOBAL_FILE
        if target.exists():
            return None
        manifests, errors = store.version_manifests(cmd.name, cmd.version)
        if errors:
            ctx.log.warning("%s v%d: no %s written: %s", cmd.name, cmd.version, GLOBAL_FILE, errors[0])
            return None
        if any(r not in manifests for r in range(cmd.nranks)):
            return None               # not every rank's copy is committed (yet, or any more)
        ranks, tables = {}, {}
        for r in range(cmd.nranks):
            manifest = manifests[r]
            params = next((m["params"] for m in manifest.modules if m["module"] == "hdf5"), None)
            if params is not None and manifest.file("regions") is not None:
                ranks[r] = vdir / manifest.file("regions").name
                tables[r] = params["datasets"]
        try:
            local = write_global(ranks, target, cmd.name, cmd.version, cmd.nranks, durable=store.durable,
                                 tables=tables)
        except OSError as exc:
            raise CheckpointError(f"flush: cannot write {target}: {exc}") from exc
        for item in local:
            ctx.log.info("%s v%d: region %r is not in %s (%s); a restart on another rank count cannot "
                         "restore it", cmd.name, cmd.version, item["id"], target, item["reason"])
        return target


def _compress_section(ctx):
    """``[compress]`` when it is enabled and stores compressed persistent copies (with
    ``format = hdf5`` through HDF5's deflate filter), else ``None``."""
    try:
        section = ctx.config.section("compress")
    except (AttributeError, KeyError):
        return None
    if not section.get("enabled") or "persistent" not in section.get("levels", ("persistent",)):
        return None
    return section


@contextlib.contextmanager
def _source_map(path, mapped_files):
    """The mapping of ``path`` the engine keeps or this pipeline run's checksum module
    made, else a fresh one (not pre-faulted: the direct write pins the pages itself),
    closed afterwards."""
    existing = mapped_files.source(path) if mapped_files is not None else None
    if existing is not None:
        yield existing
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            yield None
            return
        with mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapping:
            yield mapping


WRITERS = {"native": NativeWriter, "hdf5": Hdf5Writer}


def make_writer(section):
    """The writer of ``[flush] format`` (raises ConfigError when its library is missing)."""
    return WRITERS[section.get("format") or "native"](direct_io=section.get("direct_io", True))
