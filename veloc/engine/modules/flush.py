"""Flush module (priority 50): level 4, persistent storage (POSIX files on a parallel FS).

Runs in the node's engine. On CHECKPOINT it copies each local rank's verified scratch
files to ``persistent`` and commits a manifest there (atomic: temp + fsync + rename +
directory fsync). The copy is written with O_DIRECT from the mapping the checksum module
made of the file moments before (``[flush] direct_io``): no page-cache copy, no
writeback, and no second hash of data whose digest was just computed; ranks are flushed
in parallel (``max_parallelism``). On RESTART it copies them back to scratch, verifying
digests on the way. Frequency: ``[flush] every = N`` versions and/or
``persistent_interval`` seconds (VELOC's key: 0 = every version, < 0 = never); a
time-based decision is taken by node 0 and shared, so every node flushes the same
versions.

With ``[compress]`` (priority 20) having written a compressed sidecar for a rank, the
flush copies that instead of the raw rank file (:func:`flush_compressed`; the
persistent manifest lists it as a ``compressed`` file), and a restore to scratch
rebuilds the raw rank file from it (:func:`restore_compressed`).
"""

from ...config_keys import Key, boolean, integer, module_keys
from ...errors import CheckpointError, CorruptCheckpointError
from ...faults import fault_point
from ..compressed_file import CompressedReader
from ..fileio import atomic_file, copy_file, make_dirs
from ..hashing import digest_file, hasher
from ..manifest import FileEntry
from ..module import Module
from .compress import compressed_record, sidecar_name
from .scratch import remove_versions_from, verify_copy


class FlushModule(Module):
    name = "flush"
    config_keys = module_keys(50, interval=Key(integer(), None), direct_io=Key(boolean, True))
    level = "persistent"

    def __init__(self, ctx):
        super().__init__(ctx)
        interval = self.section.get("interval")
        self.interval = ctx.config.persistent_interval if interval is None else interval
        self.direct_io = self.section["direct_io"]

    def default_enabled(self):
        return self.ctx.config.persistent is not None and self.ctx.config.persistent_interval >= 0

    def checkpoint(self, cmd):
        if not self.due(cmd):
            return False
        self.for_each_rank(cmd.ranks, lambda rank: self._flush_rank(cmd, rank))
        return True

    def _flush_rank(self, cmd, rank):
        src = self.ctx.scratch(rank)
        manifest = src.read_manifest(cmd.name, cmd.version, rank)
        if manifest is None:
            raise CheckpointError(f"flush of {cmd.name} v{cmd.version}: rank {rank} has no committed "
                                  f"scratch copy on node {self.ctx.node}")
        dst = self.ctx.persistent(rank)
        record = compressed_record(manifest)
        if record is not None and "persistent" in record.get("levels", ()):
            out = flush_compressed(manifest, record, src, dst, direct=self.direct_io)
            out.record_module(self.name, every=self.every, interval=self.interval)
            fault_point("flush")
            dst.commit_manifest(out)
            return
        # digests computed moments ago by this run's checksum module from these very
        # files are not recomputed (a whole hash pass of backend CPU per version); a
        # copy that went bad in between still fails its check at restart
        copy_verified(manifest, src, dst, "flush", direct=self.direct_io,
                      verify=rank not in cmd.fresh_digests, mapped_files=cmd.mapped)
        out = manifest.copy_for("persistent")
        out.record_module(self.name, every=self.every, interval=self.interval)
        fault_point("flush")
        dst.commit_manifest(out)

    def supersede(self, name, threshold, ranks):
        return remove_versions_from(self.ctx.persistent, name, threshold, ranks)

    def available(self, name, ranks):
        out = {}
        for rank in ranks:
            store = self.ctx.persistent(rank)
            out[rank] = set(store.rank_versions(name, rank)) if store else set()
        return out

    def verify(self, name, version, ranks):
        return {rank: verify_copy(self.ctx.persistent(rank), name, version, rank, self.ctx.nranks)
                for rank in ranks}

    def restore(self, name, version, ranks):
        for rank in ranks:
            src = self.ctx.persistent(rank)
            manifest = src.read_manifest(name, version, rank)
            if manifest is None:
                raise CorruptCheckpointError(f"no persistent copy of {name} v{version} for rank {rank}")
            dst = self.ctx.scratch(rank)
            if manifest.file("compressed") is not None:
                out = restore_compressed(manifest, src, dst, self.ctx.node)
            else:
                copy_verified(manifest, src, dst, "restore")
                out = manifest.copy_for("scratch", node=self.ctx.node)
            dst.commit_manifest(out)
        return True


def copy_verified(manifest, src, dst, what, direct=False, verify=True, mapped_files=None):
    """Copy every file of ``manifest`` from level ``src`` to level ``dst``, checking digests.

    The digest is computed on the bytes as they are copied, so a copy that would carry
    corrupted data is refused (the destination is never committed); ``verify=False``
    checks sizes only. ``direct``: write with O_DIRECT where the destination file system
    takes it (``[flush] direct_io``), from the mapping an earlier module of this pipeline
    run made of the file (``mapped_files``), if any.
    """
    sdir = src.version_dir(manifest.name, manifest.version)
    ddir = dst.version_dir(manifest.name, manifest.version)
    make_dirs(ddir)
    for entry in manifest.files:
        h = hasher(manifest.checksum) if (verify and manifest.checksum and entry.digest) else None
        try:
            source_map = mapped_files.peek(sdir / entry.name) if mapped_files is not None else None
            size = copy_file(sdir / entry.name, ddir / entry.name, durable=dst.durable,
                             on_chunk=h.update if h else None, direct=direct, source_map=source_map)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{what}: {sdir / entry.name} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{what}: cannot copy {sdir / entry.name} to {ddir}: {exc.strerror}") from exc
        if size != entry.size or (h and h.hexdigest() != entry.digest):
            raise CorruptCheckpointError(f"{what}: {sdir / entry.name} does not match its manifest "
                                         f"(size or {manifest.checksum} digest); not copied to {dst.level}")


def flush_compressed(manifest, record, src, dst, direct=False):
    """Copy a rank's compressed sidecar (written by the compress module, ``record``) and its
    routed files from scratch ``src`` to persistent ``dst``; return the persistent manifest,
    which lists the sidecar as a ``compressed`` file in place of the raw rank file. The
    sidecar's stored-bytes digest is checked on the bytes as they are copied."""
    if record.get("file") != sidecar_name(manifest.rank):
        raise CorruptCheckpointError(f"flush: rank {manifest.rank}'s scratch manifest names compressed file "
                                     f"{record.get('file')!r}, expected {sidecar_name(manifest.rank)!r}")
    if manifest.checksum and record.get("checksum") != manifest.checksum:
        raise CheckpointError(f"flush: {record['file']} of rank {manifest.rank} was digested with "
                              f"{record.get('checksum')}, the copy with {manifest.checksum}")
    routed = manifest.copy_for("persistent")
    routed.files = [e for e in routed.files if e.kind != "regions"]
    copy_verified(routed, src, dst, "flush", direct=direct)
    sidecar = FileEntry(record["file"], int(record["size"]), kind="compressed",
                        digest=record.get("digest") if manifest.checksum else None)
    one = manifest.copy_for("persistent")
    one.files = [sidecar]
    copy_verified(one, src, dst, "flush", direct=direct)
    out = manifest.copy_for("persistent")
    out.files = [sidecar] + routed.files
    return out


def restore_compressed(manifest, src, dst, node):
    """Rebuild a rank's raw rank file on scratch ``dst`` from its compressed persistent copy
    at ``src`` (stored-bytes digest checked first, then each block's checksum as it is
    decoded; a lossless copy's result must match the raw file's recorded digest), copy its
    routed files, and return the scratch manifest listing the raw file."""
    entry = manifest.file("compressed")
    sdir = src.version_dir(manifest.name, manifest.version)
    ddir = dst.version_dir(manifest.name, manifest.version)
    routed = manifest.copy_for("scratch")
    routed.files = [e for e in manifest.files if e.kind != "compressed"]
    copy_verified(routed, src, dst, "restore")
    try:
        reader = CompressedReader(sdir / entry.name)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"restore: {sdir / entry.name} is missing") from None
    with reader:
        if reader.size != entry.size or (manifest.checksum and entry.digest
                                         and reader.digest(manifest.checksum) != entry.digest):
            raise CorruptCheckpointError(f"restore: {sdir / entry.name} does not match its manifest (size or "
                                         f"{manifest.checksum} digest); not decoded")
        target = ddir / dst.regions_file_name(manifest.rank)
        make_dirs(ddir)
        with atomic_file(target, dst.durable) as fd:
            size = reader.restore_raw(fd)
        source = reader.meta.get("source") or {}
        algorithm = manifest.checksum or source.get("checksum")
        digest = digest_file(target, algorithm) if algorithm else None
        if (reader.lossless() and source.get("digest") and source.get("checksum") == algorithm
                and digest != source["digest"]):
            raise CorruptCheckpointError(f"restore: {sdir / entry.name} decodes to data whose {algorithm} "
                                         "digest differs from the original rank file's")
    out = manifest.copy_for("scratch", node=node)
    out.files = [FileEntry(target.name, size, kind="regions", digest=digest if manifest.checksum else None)] \
        + routed.files
    return out
