"""Shared levels (persistent): one commit record per node per version, not one manifest per rank.

On a parallel file system every file and every metadata call of a checkpoint is paid by
one shared metadata server, so the persistent level commits a node's copies together::

    <root>/<name>/v<version>/r<rank>.vck ...             each local rank's files
    <root>/<name>/v<version>/n<first>-<last>.commit.json  the node's commit record

A record commits exactly the ranks ``<first>`` to ``<last>`` (rank numbers only: no node or
user name becomes a path), so which ranks a version holds is known from a listing of its
folder, without reading any record; a node whose ranks are not contiguous (a round-robin
placement) commits one record per run of consecutive ranks. The record holds the same
per-rank :class:`~veloc.storage.manifest.Manifest` objects (files, sizes, digests, codecs)
that a per-rank manifest would, and is refused when they are not exactly its name's ranks. The node's engine (the flush module) writes every local rank's
files (:func:`veloc.storage.fileio.atomic_file` with ``staged=True``: under their final
names when new, no rename and no directory sync each), then :meth:`SharedLevelStore.commit_record`
syncs the directory once and commits the record (temp + fsync + rename + directory fsync).
A rank's copy exists at the level once a committed record lists it: a crash before the
record leaves the node's files uncommitted (debris, never read), and every file a record
names was synced before the record was. Per version that is R rank files + N records
(R ranks, N nodes, block placement) instead of 2 R files.

Readers go through the same :class:`~veloc.storage.levels.LevelStore` calls as before
(``LevelStore("persistent", root)`` is a :class:`SharedLevelStore`): ``read_manifest``
lists the version folder and reads only the record whose rank range covers the rank, so a
restart costs each rank one listing and one record read. A process keeps the listing and
the records it read while the folder is unchanged (same inode and modification time, and
that time at least ``SETTLED_S`` old when listed, so a change within the file system's
time granularity is never missed). Per-rank ``r<rank>.manifest.json`` files of trees
written before this layout are still read (and removed) as before.

Removing ranks (versioning, supersede, discard) first commits the records of the ranks
that stay (at most two runs per record), then removes the old record: that unlink is the
atomic removal, and until then both say the same about the ranks that stay. Versioning
removes a version's local ranks together, so their record just goes. Removals in one
folder are serialised by an ``flock`` on it where the file system has one.
"""
import contextlib
import fcntl
import json
import os
import re
import threading
import time

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import atomic_write_bytes, make_dirs, remove_quietly
from veloc.storage.levels import _MANIFEST, LevelStore
from veloc.storage.manifest import Manifest

RECORD = re.compile(r"n(\d{1,9})-(\d{1,9})\.commit\.json")
MAX_RECORD_RANKS = 1 << 16   # ranks one record may commit (a node's); a name saying more is no record
RECORD_KIND = "veloc-node-commit"
RECORD_FORMAT = 1
SETTLED_S = 2.0
_CACHE_SIZE = 256
_cache = {}                 # str(version folder) -> _Listing
_cache_lock = threading.Lock()


def record_name(ranks):
    """The record file name for a run of consecutive ``ranks``: ``n<first>-<last>.commit.json``."""
    ranks = sorted(int(r) for r in ranks)
    if ranks != list(range(ranks[0], ranks[0] + len(ranks))):
        raise ValueError(f"ranks {ranks} are not consecutive: commit them with one record per run")
    return f"n{ranks[0]}-{ranks[-1]}.commit.json"


def consecutive_runs(manifests):
    """``manifests`` split into runs of consecutive ranks (one record each)."""
    runs = []
    for manifest in sorted(manifests, key=lambda m: int(m.rank)):
        if runs and int(runs[-1][-1].rank) + 1 == int(manifest.rank):
            runs[-1].append(manifest)
        else:
            runs.append([manifest])
    return runs


def encode_record(manifests):
    """The bytes of a commit record listing ``manifests`` (one version, consecutive ranks)."""
    manifests = sorted(manifests, key=lambda m: m.rank)
    record_name(m.rank for m in manifests)
    first = manifests[0]
    return json.dumps({"kind": RECORD_KIND, "format": RECORD_FORMAT, "name": first.name,
                       "version": int(first.version), "ranks": [m.rank for m in manifests],
                       "created": time.time(), "manifests": [m.to_dict() for m in manifests]},
                      indent=1, sort_keys=True).encode()


def decode_record(data, where, name, version, ranks=None):
    """``{rank: Manifest}`` of a commit record's bytes; CorruptCheckpointError naming
    ``where`` when it is malformed, describes another checkpoint or version, or does not
    list exactly ``ranks`` (``(first, last)`` from its name)."""
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
        try:
            float(manifest.created)
        except (TypeError, ValueError):
            raise CorruptCheckpointError(f"{where}: malformed commit record (rank {manifest.rank}'s "
                                         f"'created' is {manifest.created!r})") from None
        out[int(manifest.rank)] = manifest
    if ranks is not None and sorted(out) != list(range(ranks[0], ranks[1] + 1)):
        raise CorruptCheckpointError(f"{where}: commit record lists ranks {sorted(out)}, its name says "
                                     f"{ranks[0]}-{ranks[1]}")
    return out


class _Listing:
    """One version folder as a process last saw it: its records (by name, with their rank
    range) and the ranks with a per-rank manifest; records are parsed on first use."""

    def __init__(self, vdir):
        fd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)    # one path lookup for stamp and listing
        try:
            st = os.fstat(fd)
            names = os.listdir(fd)
        finally:
            os.close(fd)
        self.stamp = (st.st_ino, st.st_mtime_ns)
        self.settled = time.time() - st.st_mtime_ns / 1e9 >= SETTLED_S
        self.records, self.legacy = records_and_manifests(names)
        self.parsed = {}     # record name -> {rank: Manifest} or CorruptCheckpointError

    def covering(self, rank):
        return sorted(n for n, (lo, hi) in self.records.items() if lo <= rank <= hi)


def records_and_manifests(names):
    """``({record name: (first, last)}, {ranks with a per-rank manifest})`` of a version
    folder's entry ``names``."""
    records, legacy = {}, set()
    for entry in names:
        m = RECORD.fullmatch(entry)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo <= hi < lo + MAX_RECORD_RANKS:
                records[entry] = (lo, hi)
            continue
        m = _MANIFEST.fullmatch(entry)
        if m:
            legacy.add(int(m.group(1)))
    return records, legacy


def committed_ranks(names):
    """Ranks a version folder with entries ``names`` commits: its records' and per-rank
    manifests' (debris collection, from a listing it already has)."""
    records, ranks = records_and_manifests(names)
    for lo, hi in records.values():
        ranks.update(range(lo, hi + 1))
    return ranks


def _created(manifest):
    try:
        return float(manifest.created)
    except (TypeError, ValueError):
        return 0.0


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
                got = decode_record(path.read_bytes(), str(path), name, version, listing.records[record])
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

    def _holder(self, name, version, rank, listing=None):
        """``(record name, manifest)`` of ``rank``'s newest committed record entry, or
        ``(None, None)``; raises CorruptCheckpointError when a record that may hold it is
        unreadable and no readable one does. ``listing``: the folder's, if just taken."""
        vdir = self.version_dir(name, version)
        listing = listing or self._listing(vdir)
        if listing is None:
            return None, None
        best, error = (None, None), None
        for record in listing.covering(rank):
            try:
                manifest = self._parsed(listing, vdir, record, name, version).get(rank)
            except CorruptCheckpointError as exc:
                error = error or exc
                continue
            if manifest is not None and (best[1] is None or _created(manifest) > _created(best[1])):
                best = (record, manifest)
        if best[1] is None and error is not None and rank not in listing.legacy:
            raise error
        return best

    def version_ranks(self, name, version):
        """Sorted ranks with a committed copy of ``version`` here: the records' names and
        the per-rank manifests, from one listing (a record that turns out unreadable still
        counts, so a restart tries its ranks and falls back with its error)."""
        return sorted(self._ranks_in(self.version_dir(name, version)))

    def _ranks_in(self, vdir):
        listing = self._listing(vdir)
        if listing is None:
            return set()
        ranks = set(listing.legacy)
        for lo, hi in listing.records.values():
            ranks.update(range(lo, hi + 1))
        return ranks

    def version_summary(self, name, version):
        """``(sorted committed ranks, manifest of the lowest)`` of ``version`` from one
        listing and one record read, ``([], None)`` if none; raises CorruptCheckpointError."""
        vdir = self.version_dir(name, version)
        listing = self._listing(vdir)
        if listing is None:
            return [], None
        ranks = set(listing.legacy)
        for lo, hi in listing.records.values():
            ranks.update(range(lo, hi + 1))
        if not ranks:
            return [], None
        first = min(ranks)
        if first in listing.legacy:
            return sorted(ranks), super().read_manifest(name, version, first)
        return sorted(ranks), self._holder(name, version, first, listing)[1]

    def version_manifests(self, name, version):
        """``({rank: Manifest}, [CorruptCheckpointError])`` of every copy of ``version``
        committed here, from one listing of its folder."""
        vdir = self.version_dir(name, version)
        listing = self._listing(vdir)
        out, errors = {}, []
        if listing is None:
            return out, errors
        for rank in sorted(listing.legacy):
            try:
                manifest = super().read_manifest(name, version, rank)
            except CorruptCheckpointError as exc:
                errors.append(exc)
                continue
            if manifest is not None:
                out[rank] = manifest
        for record in sorted(listing.records):
            try:
                held = self._parsed(listing, vdir, record, name, version)
            except CorruptCheckpointError as exc:
                errors.append(exc)
                continue
            for rank, manifest in held.items():
                if rank not in out or _created(manifest) > _created(out[rank]):
                    out[rank] = manifest.copy()
        return out, errors

    def read_manifest(self, name, version, rank):
        record, manifest = self._holder(name, version, rank)
        if manifest is not None:
            return manifest.copy()
        return super().read_manifest(name, version, rank)

    def manifest_path(self, name, version, rank):
        """The file committing ``rank``'s copy: the record whose name covers it, else the
        per-rank path."""
        vdir = self.version_dir(name, version)
        listing = self._listing(vdir)
        covering = listing.covering(rank) if listing is not None else []
        if covering:
            return vdir / covering[-1]
        return super().manifest_path(name, version, rank)

    # -- writing ---------------------------------------------------------------------
    def commit_manifest(self, manifest):
        """Commit one rank's copy on its own (a record of one rank)."""
        self.commit_record([manifest])

    def commit_record(self, manifests):
        """Commit the copies of ``manifests`` (one version; their files written with
        ``staged=True``) with one record (one per run of consecutive ranks): the folder is
        synced once, then each record is committed atomically. From now on these copies
        exist at this level."""
        manifests = list(manifests)
        if not manifests:
            return
        first = manifests[0]
        vdir = self.version_dir(first.name, first.version)
        try:
            dir_fd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)   # written into already: exists
        except FileNotFoundError:
            make_dirs(vdir)
            dir_fd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.durable:
                os.fsync(dir_fd)     # the names of the staged files, before a record names them
            for run in consecutive_runs(manifests):
                atomic_write_bytes(vdir / record_name(m.rank for m in run), encode_record(run),
                                   durable=self.durable, sync_dir=False)
            if self.durable:
                os.fsync(dir_fd)     # the records' renames
        finally:
            os.close(dir_fd)

    def uncommit_ranks(self, name, version, ranks):
        """Atomically withdraw ``ranks``' copies, record by record: the records of the
        ranks that stay committed, then the old record removed (an unreadable one too: it
        commits nothing usable); per-rank manifests removed. Removing all of a node's
        ranks at once removes its record in one step. Returns ``{rank: manifest it had or
        None}``."""
        vdir = self.version_dir(name, version)
        ranks = {int(r) for r in ranks}
        found = dict.fromkeys(ranks)
        with _folder_lock(vdir):
            listing = self._listing(vdir)
            records = sorted({rec for r in ranks for rec in listing.covering(r)}) if listing is not None else []
            for record in records:
                try:
                    held = dict(self._parsed(listing, vdir, record, name, version))
                except CorruptCheckpointError:
                    held = {}
                for rank in ranks & set(held):
                    found[rank] = found[rank] or held.pop(rank)
                for run in consecutive_runs(held.values()):
                    atomic_write_bytes(vdir / record_name(m.rank for m in run), encode_record(run),
                                       durable=self.durable)
                remove_quietly(vdir / record)
            with _cache_lock:
                _cache.pop(str(vdir), None)
        for rank in ranks:
            if found[rank] is None:
                try:
                    found[rank] = LevelStore.read_manifest(self, name, version, rank)
                except CorruptCheckpointError:
                    pass
            if listing is None or rank in listing.legacy:
                remove_quietly(LevelStore.manifest_path(self, name, version, rank))
        return found


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
