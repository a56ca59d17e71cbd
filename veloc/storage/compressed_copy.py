"""Compressed copies on the persistent level: the sidecar the compress module writes next to
a rank's scratch file (``r<rank>.vcz``, :mod:`veloc.storage.compressed_file`), how the
native persistent format copies it in place of the raw rank file, and how a restore to
scratch rebuilds the raw file from it. Runs in the node's engine (flush and restore).
"""
from veloc.errors import CheckpointError, CorruptCheckpointError
from veloc.storage.compressed_file import CompressedReader
from veloc.storage.fileio import atomic_file, make_dirs
from veloc.storage.formats import copy_verified
from veloc.storage.hashing import digest_file
from veloc.storage.manifest import FileEntry

SIDECAR_SUFFIX = ".vcz"


def sidecar_name(rank):
    """The compressed sidecar's name in a version folder."""
    return f"r{int(rank)}{SIDECAR_SUFFIX}"


def compressed_record(manifest):
    """The compress module's record of a scratch manifest, if it wrote a sidecar:
    ``{"file", "size", "digest", "checksum", "raw_size", "codecs", "lossy_error_bounds",
    "levels", ...}``, else ``None``. It travels into the persistent manifest's module list."""
    for entry in manifest.modules:
        if entry.get("module") == "compress":
            params = entry.get("params") or {}
            return params if params.get("file") else None
    return None


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
