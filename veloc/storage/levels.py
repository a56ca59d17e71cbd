"""Directory layout of one storage level, and the scratch recycle pool.

A level root holds ``<name>/v<version>/r<rank>.vck`` (memory regions),
``r<rank>.f.<base>`` (routed files) and, on node-local levels, ``r<rank>.manifest.json``
(the commit record of one rank's copy). Shared levels (persistent) commit a node's ranks
together with one ``n<first>-<last>.commit.json`` record instead:
``LevelStore("persistent", root)`` builds a
:class:`~veloc.storage.node_records.SharedLevelStore`, which answers the same calls.
Names are validated before they get here (``veloc.names``), so no user string is ever
interpreted as a path. Used by application ranks (scratch), the engine's modules (all
levels) and the ``veloc`` tool.
"""
import logging
import os
import re
import secrets
from pathlib import Path

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import atomic_write_bytes, make_dirs, remove_quietly
from veloc.storage.manifest import Manifest

log = logging.getLogger("veloc.levels")
_VDIR = re.compile(r"v(\d+)")
_MANIFEST = re.compile(r"r(\d+)\.manifest\.json")
LEVEL_ORDER = ("scratch", "partner", "erasure", "persistent")
SHARED_LEVELS = ("persistent",)


class LevelStore:
    """The checkpoint tree of one level under ``root`` (a shared level's tree is a
    :class:`~veloc.storage.node_records.SharedLevelStore`)."""

    shared = False

    def __new__(cls, level=None, root=None, durable=True):
        if cls is LevelStore and level in SHARED_LEVELS:
            from veloc.storage.node_records import SharedLevelStore
            cls = SharedLevelStore
        return super().__new__(cls)

    def __init__(self, level, root, durable=True):
        self.level = level
        self.root = Path(root)
        self.durable = durable

    def __repr__(self):
        return f"LevelStore({self.level}, {self.root})"

    def version_dir(self, name, version):
        return self.root / name / f"v{int(version)}"

    def regions_file_name(self, rank):
        return f"r{int(rank)}.vck"

    def routed_file_name(self, rank, base):
        return f"r{int(rank)}.f.{base}"

    def manifest_path(self, name, version, rank):
        return self.version_dir(name, version) / f"r{int(rank)}.manifest.json"

    def names(self):
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

    def _version_numbers(self, name):
        """Versions of ``name`` with a folder here (committed or not)."""
        try:
            entries = os.listdir(self.root / name)
        except OSError:
            return []
        return [int(m.group(1)) for m in map(_VDIR.fullmatch, entries) if m]

    def version_ranks(self, name, version):
        """Sorted ranks with a committed copy of ``version`` of ``name`` here."""
        return sorted(int(x.group(1)) for x in map(_MANIFEST.fullmatch, _listdir(self.version_dir(name, version)))
                      if x)

    def version_summary(self, name, version):
        """``(sorted committed ranks, manifest of the lowest)`` of ``version``, ``([], None)``
        if none; raises CorruptCheckpointError when that manifest is unreadable."""
        ranks = self.version_ranks(name, version)
        return ranks, (self.read_manifest(name, version, ranks[0]) if ranks else None)

    def versions(self, name):
        """``{version: sorted ranks with a committed manifest}`` for checkpoint ``name``."""
        out = {}
        for version in self._version_numbers(name):
            ranks = self.version_ranks(name, version)
            if ranks:
                out[version] = ranks
        return out

    def rank_versions(self, name, rank):
        """Versions of ``name`` for which ``rank`` has a committed manifest here."""
        return sorted(v for v, ranks in self.versions(name).items() if rank in ranks)

    def read_manifest(self, name, version, rank):
        """The committed manifest, ``None`` if absent; raises CorruptCheckpointError if unreadable."""
        path = self.manifest_path(name, version, rank)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: unreadable manifest ({exc.strerror})") from None
        manifest = Manifest.from_bytes(data, str(path))
        if (manifest.name, manifest.version, manifest.rank) != (name, version, rank):
            raise CorruptCheckpointError(f"{path}: manifest describes {manifest.name} v{manifest.version} "
                                         f"rank {manifest.rank}, not {name} v{version} rank {rank}")
        return manifest

    def commit_manifest(self, manifest):
        """Atomically publish ``manifest``: from now on this copy exists at this level."""
        vdir = self.version_dir(manifest.name, manifest.version)
        make_dirs(vdir)
        atomic_write_bytes(self.manifest_path(manifest.name, manifest.version, manifest.rank),
                           manifest.to_bytes(), durable=self.durable)

    def remove(self, name, version, rank, pool=None, prune=True):
        """Delete one rank's copy: the manifest first (uncommit), then its files.

        With a :class:`RecyclePool`, rank files go to the pool for reuse instead. With
        ``prune``, an emptied version directory is removed too; an application rank
        passes ``prune=False``, since another local rank may be writing into it.
        """
        self.remove_ranks(name, version, [rank], pool, prune)

    def remove_ranks(self, name, version, ranks, pool=None, prune=True):
        """:meth:`remove` for several ranks of one version at once (one node's: on a shared
        level their record goes in one step)."""
        vdir = self.version_dir(name, version)
        manifests = self.uncommit_ranks(name, version, ranks)
        owner = {f"r{int(rank)}.": rank for rank in ranks}
        for entry in _listdir(vdir):
            rank = owner.get(entry[:entry.index(".") + 1] if "." in entry else None)
            if rank is None:
                continue
            path = vdir / entry
            if pool is not None and manifests.get(rank) is not None and entry == self.regions_file_name(rank):
                pool.put(path, rank)
            else:
                remove_quietly(path)
        if prune:
            if not self.version_ranks(name, version):
                remove_quietly(vdir / "global.h5")    # HDF5 format: stitches ranks that are gone
            try:
                vdir.rmdir()
            except OSError:
                pass

    def uncommit(self, name, version, rank):
        """Withdraw ``rank``'s copy of ``version`` (its manifest removed); return the
        manifest it had, ``None`` if none or unreadable."""
        return self.uncommit_ranks(name, version, [rank])[rank]

    def uncommit_ranks(self, name, version, ranks):
        """:meth:`uncommit` for several ranks: ``{rank: manifest it had or None}``."""
        out = {}
        for rank in ranks:
            try:
                out[rank] = self.read_manifest(name, version, rank)
            except CorruptCheckpointError:
                out[rank] = None
            remove_quietly(self.manifest_path(name, version, rank))
        return out


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


RECYCLE_KEEP = 2      # files a rank's recycle pool holds at most


class RecyclePool:
    """Already-allocated scratch files kept for reuse by the next checkpoint of a rank.

    Writing over allocated tmpfs pages is 2-3x faster than allocating fresh ones (see
    docs/ARCHITECTURE.md). Garbage collection (engine) and the rank's own preparation of
    files (``veloc.storage.local_write``) put; application ranks take.
    """

    def __init__(self, scratch_root, keep_per_rank=RECYCLE_KEEP):
        self.dir = Path(scratch_root) / ".recycle"
        self.keep = keep_per_rank

    def _mine(self, rank):
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.startswith(f"r{int(rank)}."))
        except OSError:
            return []

    def put(self, path, rank):
        """Move ``path`` into the pool; ``False`` (and the file removed) when the pool of
        ``rank`` is full or the move fails."""
        make_dirs(self.dir)
        if len(self._mine(rank)) >= self.keep:
            remove_quietly(path)
            return False
        try:
            os.replace(path, self.dir / f"r{int(rank)}.{secrets.token_hex(6)}.vck")
        except OSError:
            remove_quietly(path)
            return False
        return True

    def has(self, rank):
        """Whether a pooled file of ``rank`` is waiting for reuse."""
        return bool(self._mine(rank))

    def take(self, rank, target):
        """Move a pooled file of ``rank`` to ``target``; return its size, or ``None`` if none."""
        for candidate in self._mine(rank):
            try:
                os.replace(candidate, target)
            except OSError:
                continue  # taken by someone else meanwhile
            try:
                return target.stat().st_size
            except OSError:
                return None
        return None
