"""Shared levels (persistent): one commit record per node per version, not one manifest per rank.

On a parallel file system every file and every metadata call of a checkpoint is paid by
one shared metadata server, so the persistent level commits a node's copies together::

    <root>/<name>/v<version>/r<rank>.vck ...             each local rank's files
    <root>/<name>/v<version>/n<first>-<last>.commit.json  the node's commit record

``<first>`` and ``<last>`` are the lowest and highest rank the record lists (rank numbers
only: no node or user name becomes a path); the record holds the same per-rank
:class:`~veloc.storage.manifest.Manifest` objects (files, sizes, digests, codecs) that a
per-rank manifest would. The node's engine (the flush module) writes every local rank's
files (:func:`veloc.storage.fileio.atomic_file` with ``staged=True``: under their final
names when new, no rename and no directory sync each), then :meth:`SharedLevelStore.commit_record`
syncs the directory once and commits the record (temp + fsync + rename + directory fsync).
A rank's copy exists at the level once a committed record lists it: a crash before the
record leaves the node's files uncommitted (debris, never read), and every file a record
names was synced before the record was. Per version that is R rank files + N records
(R ranks, N nodes) instead of 2 R files.

Readers go through the same :class:`~veloc.storage.levels.LevelStore` calls as before
(``LevelStore("persistent", root)`` is a :class:`SharedLevelStore`): ``read_manifest``
lists the version folder and reads only the record whose rank range covers the rank, so a
restart costs each rank one listing and one record read. A process keeps the listing and
the records it read while the folder is unchanged (same inode and modification time, and
that time at least ``SETTLED_S`` old when listed, so a change within the file system's
time granularity is never missed). Per-rank ``r<rank>.manifest.json`` files of trees
written before this layout are still read (and removed) as before.

Removing one rank (versioning, supersede, discard) rewrites the record without it, or
removes the record when it was the last; rewrites of a folder's records are serialised by
an ``flock`` on the folder where the file system has one.
"""
import contextlib
import fcntl
import json
import os
import re
import threading
import time

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import atomic_write_bytes, fsync_dir, make_dirs, remove_quietly
from veloc.storage.levels import _MANIFEST, _VDIR, LevelStore
from veloc.storage.manifest import Manifest

RECORD = re.compile(r"n(\d+)-(\d+)\.commit\.json")
RECORD_KIND = "veloc-node-commit"
RECORD_FORMAT = 1
SETTLED_S = 2.0
_CACHE_SIZE = 256
_cache = {}                 # str(version folder) -> _Listing
_cache_lock = threading.Lock()


def record_name(ranks):
    """The record file name for a node's ``ranks``: ``n<lowest>-<highest>.commit.json``."""
    ranks = [int(r) for r in ranks]
    return f"n{min(ranks)}-{max(ranks)}.commit.json"


def encode_record(manifests):
    """The bytes of a commit record listing ``manifests`` (one version, distinct ranks)."""
    manifests = sorted(manifests, key=lambda m: m.rank)
    first = manifests[0]
    return json.dumps({"kind": RECORD_KIND, "format": RECORD_FORMAT, "name": first.name,
                       "version": int(first.version), "ranks": [m.rank for m in manifests],
                       "created": time.time(), "manifests": [m.to_dict() for m in manifests]},
                      indent=1, sort_keys=True).encode()


def decode_record(data, where, name, version):
    """``{rank: Manifest}`` of a commit record's bytes; CorruptCheckpointError naming
    ``where`` when it is malformed or describes another checkpoint or version."""
    try:
        raw = json.loads(data)
        if raw.get("kind") != RECORD_KIND or raw.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a format {RECORD_FORMAT} node commit record")
        entries = raw["manifests"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("it lists no rank")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed commit record ({exc}); the ranks it commits "
                                     "are not usable from this level") from None
    out = {}
    for entry in entries:
        manifest = Manifest.from_dict(entry, where)
        if (manifest.name, int(manifest.version)) != (name, int(version)):
            raise CorruptCheckpointError(f"{where}: commit record describes {manifest.name} v{manifest.version}, "
                                         f"not {name} v{version}")
        out[int(manifest.rank)] = manifest
    return out


class _Listing:
    """One version folder as a process last saw it: its records (by name, with their rank
    range) and the ranks with a per-rank manifest; records are parsed on first use."""

    def __init__(self, vdir):
        self.stamp = _stamp(vdir)
        names = os.listdir(vdir)
        self.settled = self.stamp is not None and time.time() - self.stamp[1] / 1e9 >= SETTLED_S
        self.records = {}
        self.legacy = set()
        for entry in names:
            m = RECORD.fullmatch(entry)
            if m:
                self.records[entry] = (int(m.group(1)), int(m.group(2)))
                continue
            m = _MANIFEST.fullmatch(entry)
            if m:
                self.legacy.add(int(m.group(1)))
        self.parsed = {}     # record name -> {rank: Manifest} or CorruptCheckpointError

    def covering(self, rank):
        return sorted(n for n, (lo, hi) in self.records.items() if lo <= rank <= hi)


def _stamp(vdir):
    try:
        st = os.stat(vdir)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class SharedLevelStore(LevelStore):
    """A shared level's tree (persistent): per-node commit records; see the module docstring."""

    shared = True

    # -- reading ---------------------------------------------------------------------
    def _listing(self, vdir):
        key = str(vdir)
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None and cached.settled and _stamp(vdir) == cached.stamp:
            return cached
        try:
            listing = _Listing(vdir)
        except OSError:
            with _cache_lock:
                _cache.pop(key, None)
            return None
        with _cache_lock:
            if len(_cache) >= _CACHE_SIZE:
                _cache.pop(next(iter(_cache)))
            _cache[key] = listing
        return listing

    def _parsed(self, listing, vdir, record, name, version):
        """``{rank: Manifest}`` of ``record`` in ``vdir``; raises CorruptCheckpointError."""
        got = listing.parsed.get(record)
        if got is None:
            path = vdir / record
            try:
                got = decode_record(path.read_bytes(), str(path), name, version)
            except FileNotFoundError:
                got = {}       # removed since the listing: commits nothing
            except OSError as exc:
                got = CorruptCheckpointError(f"{path}: unreadable commit record ({exc.strerror})")
            except CorruptCheckpointError as exc:
                got = exc
            listing.parsed[record] = got
        if isinstance(got, CorruptCheckpointError):
            raise got
        return got

    def _holder(self, name, version, rank):
        """``(record name, manifest)`` of ``rank``'s newest committed record entry, or
        ``(None, None)``; raises CorruptCheckpointError when a record that may hold it is
        unreadable and no readable one does."""
        vdir = self.version_dir(name, version)
        listing = self._listing(vdir)
        if listing is None:
            return None, None
        best, error = (None, None), None
        for record in listing.covering(rank):
            try:
                manifest = self._parsed(listing, vdir, record, name, version).get(rank)
            except CorruptCheckpointError as exc:
                error = error or exc
                continue
            if manifest is not None and (best[1] is None or manifest.created > best[1].created):
                best = (record, manifest)
        if best[1] is None and error is not None and rank not in listing.legacy:
            raise error
        return best

    def version_ranks(self, name, version):
        """Sorted ranks with a committed copy of ``version`` here (records and per-rank
        manifests; a record that cannot be read counts for the ranks its name covers, so
        a restart tries them and falls back with the record's error)."""
        return sorted(self._ranks_in(self.version_dir(name, version), name, version))

    def _ranks_in(self, vdir, name, version):
        listing = self._listing(vdir)
        if listing is None:
            return set()
        ranks = set(listing.legacy)
        for record, (lo, hi) in listing.records.items():
            try:
                ranks.update(self._parsed(listing, vdir, record, name, version))
            except CorruptCheckpointError:
                ranks.update(range(lo, hi + 1))
        return ranks

    def read_manifest(self, name, version, rank):
        record, manifest = self._holder(name, version, rank)
        if manifest is not None:
            return manifest.copy_for(manifest.level)
        return super().read_manifest(name, version, rank)

    def manifest_path(self, name, version, rank):
        """The file committing ``rank``'s copy: its node's record, else the per-rank path."""
        try:
            record, _ = self._holder(name, version, rank)
        except CorruptCheckpointError:
            record = None
        if record is not None:
            return self.version_dir(name, version) / record
        return super().manifest_path(name, version, rank)

    # -- writing ---------------------------------------------------------------------
    def commit_manifest(self, manifest):
        """Commit one rank's copy on its own (a record of one rank)."""
        self.commit_record([manifest])

    def commit_record(self, manifests):
        """Commit the copies of ``manifests`` (one version; their files written with
        ``staged=True``) with one record: the folder is synced once, then the record is
        committed atomically. From now on these copies exist at this level."""
        manifests = list(manifests)
        if not manifests:
            return
        first = manifests[0]
        vdir = self.version_dir(first.name, first.version)
        make_dirs(vdir)
        if self.durable:
            fsync_dir(vdir)          # the names of the staged files, before the record names them
        atomic_write_bytes(vdir / record_name(m.rank for m in manifests), encode_record(manifests),
                           durable=self.durable)

    def uncommit(self, name, version, rank):
        """Atomically withdraw ``rank``'s copy: its record rewritten without it (or removed
        when it was the last rank), its per-rank manifest removed. Returns the manifest it
        had, or ``None``."""
        vdir = self.version_dir(name, version)
        found = None
        with _folder_lock(vdir):
            listing = self._listing(vdir)
            for record in listing.covering(rank) if listing is not None else ():
                try:
                    held = dict(self._parsed(listing, vdir, record, name, version))
                except CorruptCheckpointError:
                    continue     # commits nothing usable; collected with the version
                manifest = held.pop(rank, None)
                if manifest is None:
                    continue
                found = found or manifest
                if held:
                    atomic_write_bytes(vdir / record, encode_record(held.values()), durable=self.durable)
                else:
                    remove_quietly(vdir / record)
            with _cache_lock:
                _cache.pop(str(vdir), None)
        legacy = super().manifest_path(name, version, rank)
        if found is None:
            try:
                found = super().read_manifest(name, version, rank)
            except CorruptCheckpointError:
                found = None
        remove_quietly(legacy)
        return found

    def committed_in(self, vdir):
        """Ranks committed in version folder ``vdir`` of this tree (debris collection; an
        unreadable record protects every rank its name covers)."""
        m = _VDIR.fullmatch(vdir.name)
        if m is None:
            return set()
        return self._ranks_in(vdir, vdir.parent.name, int(m.group(1)))


@contextlib.contextmanager
def _folder_lock(vdir):
    """An exclusive ``flock`` on folder ``vdir`` while its records are rewritten; nothing
    where the folder is gone or the file system has no such locks."""
    try:
        fd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)
