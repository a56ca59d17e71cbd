"""Per-rank, per-version, per-level manifests: the commit record of a checkpoint copy.

A rank's copy of a version exists at a level only once its manifest is committed there
(temp + fsync + rename + directory fsync). The manifest lists the files with sizes and
content digests and the modules applied with their parameters, so restart can verify
and undo them. Written by the application rank (scratch copy) and by the engine (other
levels); read by whoever restarts or inspects.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field

from veloc.errors import CorruptCheckpointError
from veloc.storage.hashing import digest_file

FORMAT = 1


@dataclass
class FileEntry:
    """One file of a rank's copy. ``name`` is relative to the version directory."""
    name: str
    size: int
    kind: str = "regions"       # "regions" (a .vck rank file), "compressed" (.vcz) or "routed"
    original: str = None        # base name the application asked for (routed files)
    digest: str = None          # hex digest, filled in by the checksum module
    fingerprint: list = None    # [device, inode, size, mtime_ns, ctime_ns] of the file when hashed


@dataclass
class Manifest:
    """What one rank's copy of one version at one level holds."""
    name: str
    version: int
    rank: int
    nranks: int
    node: str
    level: str
    files: list = field(default_factory=list)
    checksum: str = None        # algorithm of FileEntry.digest, None until checksummed
    modules: list = field(default_factory=list)   # [{"module": name, "params": {...}}]
    created: float = field(default_factory=time.time)
    format: int = FORMAT

    def to_bytes(self):
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_bytes(cls, data, where="manifest"):
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({exc})") from None
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, raw, where="manifest"):
        """A manifest from its decoded JSON object (a manifest file, or one entry of a
        node's commit record on a shared level); raises CorruptCheckpointError."""
        try:
            raw = dict(raw)
            if raw.get("format") != FORMAT:
                raise ValueError(f"unsupported format {raw.get('format')!r}")
            files = [FileEntry(**f) for f in raw.pop("files")]
            manifest = cls(files=files, **raw)
            int(manifest.version), int(manifest.rank)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({exc})") from None
        return manifest

    def copy(self):
        """An independent copy describing the same files (fingerprints kept)."""
        return Manifest.from_dict(self.to_dict())

    def copy_for(self, level, node=None, fingerprints=None):
        """The same content described for another level (files and digests unchanged);
        ``fingerprints``: ``{file name: fingerprint}`` of the copies just written there."""
        data = asdict(self)
        fingerprints = fingerprints or {}
        data["files"] = [FileEntry(**{**f, "fingerprint": fingerprints.get(f["name"])})   # another file
                         for f in data["files"]]
        data["level"] = level
        data["node"] = node or self.node
        data["modules"] = list(self.modules)
        return Manifest(**data)

    def record_module(self, module, **params):
        self.modules = [m for m in self.modules if m["module"] != module]
        self.modules.append({"module": module, "params": params})

    def file(self, kind="regions", original=None):
        for f in self.files:
            if f.kind == kind and (original is None or f.original == original):
                return f
        return None


def file_fingerprint(stat_result):
    """What identifies one state of a file: any write through the file system changes its
    ctime (which no user can set back), a replacement changes its inode."""
    st = stat_result
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def unchanged_since_hashed(manifest, directory):
    """True when every file of ``manifest`` in ``directory`` is, by its fingerprint, the
    very file whose digest the checksum module computed (no write, truncation or
    replacement since). Used by ``restart_test``: such a copy needs no second hash before
    the read, which checks the digest as the bytes land in the arrays."""
    if not manifest.checksum:
        return False
    for entry in manifest.files:
        if entry.fingerprint is None or entry.digest is None:
            return False
        try:
            if file_fingerprint(os.stat(directory / entry.name)) != list(entry.fingerprint):
                return False
        except OSError:
            return False
    return True


def verify_files(manifest, directory, deep=True):
    """Check that the files of ``manifest`` in ``directory`` are intact; raise otherwise.

    Always checks presence and sizes; with ``deep`` also content digests (when the
    checksum module recorded them), else rank-file headers.
    """
    for entry in manifest.files:
        path = directory / entry.name
        try:
            size = path.stat().st_size
        except OSError:
            raise CorruptCheckpointError(f"{path}: missing (rank {manifest.rank}, version {manifest.version}, "
                                         f"level {manifest.level})") from None
        if size != entry.size:
            raise CorruptCheckpointError(f"{path}: size {size} != {entry.size} recorded in the manifest "
                                         f"(truncated or overwritten)")
        if deep and entry.digest and manifest.checksum:
            # the digest covers every byte, the header included: a match is the file as written
            actual = digest_file(path, manifest.checksum)
            if actual != entry.digest:
                raise CorruptCheckpointError(f"{path}: {manifest.checksum} checksum mismatch "
                                             f"(rank {manifest.rank}, version {manifest.version}, "
                                             f"level {manifest.level})")
        elif entry.kind in ("regions", "compressed"):
            from veloc.storage.formats import open_rank_file    # a .vck, .vcz or HDF5 rank file, checked on open
            with open_rank_file(path, entry.kind):
                pass
