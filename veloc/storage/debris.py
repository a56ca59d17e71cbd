"""Collection of crash debris: what a killed write leaves on scratch, partner, erasure and
persistent trees.

A write that dies before its commit leaves *debris*: temporary files
(``.<name>.<writer tag>.<random>.tmp``, :func:`veloc.storage.fileio.temp_name`), rank files
whose manifest was never committed (or was removed before the files), erasure version
folders without a group record, surplus recycle-pool files and empty version folders.
None of it is ever read (a copy exists only once its manifest or group record is
committed), but it takes node memory (scratch is RAM) and disk space.

Who collects what, and why that never touches a copy a live process is writing:

- **Temporary files**, everywhere: only when their writer is gone. The writer tag names
  the writing process by machine boot, pid and start time. A tag of this machine's
  current boot is decided exactly: the writer is gone when no process with that pid
  and start time exists (a reused pid has another start time; a zombie is gone). A tag
  of another machine or boot, or an untagged name, cannot be checked from here: such a
  file is collected only once it has not been modified for ``FOREIGN_GRACE_S`` seconds
  (a live copy writes to its file all along; a wrong guess makes a stalled copy fail
  at its rename, never commits a torn file).
- **A rank's own scratch files, at init** (``Client.__init__``, every application rank,
  before its first write, holding its :class:`RankClaim`): its uncommitted rank files
  (``r<rank>.*`` with no ``r<rank>.manifest.json`` next to them; on persistent: that
  no node commit record ``n<first>-<last>.commit.json`` lists), its recycle-pool files
  beyond the pool's size and unclaimed pool files of rank numbers this job does not have
  (version folders stay: another process may just have created one to write into it).
  Only the rank itself writes ``r<rank>.*`` files of a version before their manifest is
  committed, and it has not started yet; the claim (an ``flock`` held from ``init`` to
  ``finalize``) proves no other live process is rank ``rank`` on this scratch (another
  job with the same scratch folder); the node's engine writes uncommitted rank files
  only while restoring for this rank, which asks for that later.
- **Engine trees, at restart and in versioning** (the node's engine: sync-mode leader or
  active backend, between commands, so none of its own copies is in flight): everything
  uncommitted in the node's partner and erasure trees (only this engine writes them);
  the local ranks' uncommitted persistent files of versions older than the newest
  version complete at persistent (the persistent tree is shared by every node's engine,
  and an engine handles versions in order, so every engine is past those; empty version
  folders there likewise). A process's first sweep of a persistent tree reads its newest
  ``RECENT_PERSISTENT`` version folders only (a crash leaves debris in the versions being
  flushed then, the newest; a parallel file system is slow to list), later sweeps every
  version from the previous sweep's mark on. In versioning, the local ranks' uncommitted
  scratch files of versions older than the one just checkpointed (ranks only write newer
  ones), and the version folders that leaves empty.

Every collection logs at INFO what it removed (files, bytes, folders); nothing here
raises for a file that vanished or cannot be removed.
"""
import fcntl
import logging
import os
import re
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from veloc.errors import CorruptCheckpointError, VelocError
from veloc.storage.fileio import FILE_MODE, boot_tag, make_dirs, process_start
from veloc.storage.levels import _MANIFEST, _VDIR, LevelStore
from veloc.storage.node_records import RECORD, committed_ranks
from veloc.redundancy.striping import GroupStore
from veloc.redundancy.transfer import node_scratch

log = logging.getLogger("veloc.debris")
FOREIGN_GRACE_S = 3600.0
RECENT_PERSISTENT = 16     # version folders of a name a new process sweeps on persistent
_TAGGED = re.compile(r"\.(?P<final>.+)\.(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)\.[0-9a-f]{8}\.tmp")
_LEGACY = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{8}\.tmp")
_RANK_FILE = re.compile(r"r(\d+)\.(?:vck|f\..+)")
_POOL_FILE = re.compile(r"r(\d+)\.[0-9a-f]+\.vck")
_MARKS = weakref.WeakKeyDictionary()   # engine context -> {(root, name): versions below swept}


@dataclass
class Tally:
    """What one collection removed."""
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    where: set = field(default_factory=set)

    def remove(self, path):
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
        except OSError:
            return
        self.files += 1
        self.bytes += size
        self.where.add(str(Path(path).parent))

    def rmdir(self, path):
        try:
            os.rmdir(path)
        except OSError:
            return
        self.dirs += 1

    def report(self, logger, who):
        if self.files or self.dirs:
            logger.info("debris: %s collected %d file(s), %d byte(s) (%.1f MiB), %d empty folder(s) in %s",
                        who, self.files, self.bytes, self.bytes / (1 << 20), self.dirs,
                        ", ".join(sorted(self.where)[:4]) + (" ..." if len(self.where) > 4 else ""))


# -- the liveness rule ----------------------------------------------------------------
def temp_target(name):
    """The final name a temporary file ``name`` stands for, or ``None`` if not a temp name."""
    m = _TAGGED.fullmatch(name) or _LEGACY.fullmatch(name)
    return m.group("final") if m else None


def writer_gone(name, mtime, now=None):
    """Whether the process that wrote temporary file ``name`` (modified at ``mtime``) is
    gone for sure; see the module docstring for the rule."""
    m = _TAGGED.fullmatch(name)
    if m and m.group("boot") == boot_tag():
        start = process_start(int(m.group("pid")))
        return start is None or (start != 0 and start != int(m.group("start")))
    now = time.time() if now is None else now
    return now - mtime >= FOREIGN_GRACE_S


def _entries(folder):
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def _dead_temp(entry, prefix=""):
    if not entry.name.startswith("." + prefix) or temp_target(entry.name) is None:
        return False
    try:
        return entry.is_file(follow_symlinks=False) and writer_gone(entry.name, entry.stat().st_mtime)
    except OSError:
        return False


def _version_dirs(root, name=None):
    """``[(version, path)]`` of ``root/<name>/v*`` (every name when ``name`` is None)."""
    names = [name] if name is not None else [e.name for e in _entries(root)
                                             if e.is_dir() and not e.name.startswith(".")]
    out = []
    for n in names:
        for e in _entries(Path(root) / n):
            m = _VDIR.fullmatch(e.name)
            if m and e.is_dir(follow_symlinks=False):
                out.append((int(m.group(1)), Path(e.path)))
    return out


def _sweep_rank_dir(vdir, ranks, tally, uncommitted=True):
    """In one version folder: dead temporary files of ``ranks`` (all ranks when ``None``)
    and, with ``uncommitted``, their rank files that no manifest or commit record commits.
    Returns how many entries are left (0: the folder may go)."""
    entries = _entries(vdir)
    before = tally.files
    committed = committed_ranks(e.name for e in entries)
    for e in entries:
        target = temp_target(e.name)
        if target is not None:
            owner = _RANK_FILE.fullmatch(target) or _MANIFEST.fullmatch(target)
            record = RECORD.fullmatch(target)
            mine = ranks is None or (owner and int(owner.group(1)) in ranks) or (
                record and any(int(record.group(1)) <= r <= int(record.group(2)) for r in ranks))
            if mine and _dead_temp(e):
                tally.remove(e.path)
            continue
        m = _RANK_FILE.fullmatch(e.name)
        if (uncommitted and m and (ranks is None or int(m.group(1)) in ranks)
                and int(m.group(1)) not in committed and e.is_file(follow_symlinks=False)):
            tally.remove(e.path)
    return len(entries) - (tally.files - before)


def _unclaimed(root, rank):
    claim = RankClaim(root, int(rank))
    if not claim.acquire():
        return False
    claim.release()
    return True


def _prune(vdir, tally):
    tally.rmdir(vdir)
    tally.rmdir(vdir.parent)      # the name folder, once its last version is gone


# -- at init, by an application rank -----------------------------------------------
class RankClaim:
    """An exclusive ``flock`` on ``<scratch root>/.owners/r<rank>.lock``, held by the live
    client of rank ``rank`` on that scratch from ``init`` to ``finalize`` (the kernel drops
    it however the process ends). Holding it, a rank knows no other live process writes
    ``r<rank>.*`` files there (another job with the same scratch folder and rank number)."""

    def __init__(self, root, rank):
        self.path = Path(root) / ".owners" / f"r{int(rank)}.lock"
        self.fd = None
        self.tally = Tally()

    def acquire(self):
        """Take the claim without waiting; False if a live process holds it."""
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except (OSError, VelocError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)    # for the message of the next claimant
        except OSError:
            pass
        return True

    def holder(self):
        """The pid written by the process holding the claim, or ``None``."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release


def claim_rank_scratch(store: LevelStore, rank: int, pool=None, nranks=None, logger=None) -> RankClaim:
    """Called by application rank ``rank`` in ``veloc.init`` before it writes anything:
    claims its files on scratch (:class:`RankClaim`, released by ``finalize``) and collects
    its own debris there (every checkpoint name) and in its recycle pool. Without the
    claim (another live process is rank ``rank`` on this scratch) only dead writers'
    temporary files go. Never raises: what cannot be collected now is left for later."""
    claim = RankClaim(store.root, rank)
    owned = claim.acquire()
    if not owned:
        (logger or log).info("debris: rank %d's files on %s are claimed by a live client (pid %s, not "
                             "finalized); collecting only temporary files of dead writers", rank, store.root,
                             claim.holder())
    claim.tally = collect_rank_scratch(store, rank, pool if owned else None, nranks, logger, owned)
    return claim


def collect_rank_scratch(store, rank, pool=None, nranks=None, logger=None, owned=True) -> Tally:
    """The collection of :func:`claim_rank_scratch`; ``owned``: the caller holds the claim."""
    return _guarded(_collect_rank_scratch, logger, store, rank, pool, nranks, logger, owned)


def _guarded(step, logger, *args):
    try:
        return step(*args)
    except OSError as exc:
        (logger or log).warning("debris: collection stopped early: %s", exc)
        return Tally()


def _collect_rank_scratch(store, rank, pool, nranks, logger, owned):
    tally = Tally()
    for _, vdir in _version_dirs(store.root):
        _sweep_rank_dir(vdir, {rank}, tally, uncommitted=owned)   # folders stay: others may fill them
    if pool is not None:
        mine = []
        for e in _entries(pool.dir):
            m = _POOL_FILE.fullmatch(e.name)
            if m and int(m.group(1)) == rank:
                mine.append(e.path)
            elif m and nranks is not None and int(m.group(1)) >= nranks and _unclaimed(store.root, m.group(1)):
                tally.remove(e.path)      # a rank this job does not have, and no live process is
            elif _dead_temp(e):
                tally.remove(e.path)
        for path in sorted(mine)[pool.keep:]:
            tally.remove(path)
    tally.report(logger or log, f"rank {rank} at init")
    return tally


# -- in the node's engine ------------------------------------------------------------
def collect_engine(ctx, name, ranks, before=None, logger=None) -> Tally:
    """Called by the node's engine between commands: at restart (``before=None``) and in
    versioning (``before`` = the version just checkpointed). Collects the debris of
    checkpoint ``name`` on the node's partner and erasure trees and the local ``ranks``'
    persistent and scratch trees (see the module docstring for what is safe when).
    Never raises."""
    return _guarded(_collect_engine, logger, ctx, name, ranks, before, logger)


def collect_temps(folder, prefix, logger=None):
    """Dead writers' temporary files in ``folder`` whose names start with ``.<prefix>``
    (e.g. a resumed flush's folder on persistent, collected by the node's engine)."""
    tally = Tally()
    for e in _entries(folder):
        if _dead_temp(e, prefix):
            tally.remove(e.path)
    return tally


def _collect_engine(ctx, name, ranks, before, logger):
    tally = Tally()
    marks = _MARKS.setdefault(ctx, {})
    trees = {}      # (level, root) -> [store, local ranks with that root]: each folder read once
    for rank in sorted(set(ranks)):
        for store in (ctx.scratch(rank), ctx.persistent(rank)):
            if store is not None:
                trees.setdefault((store.level, str(store.root)), [store, set()])[1].add(rank)
    for (level, root), (store, owned) in trees.items():
        vdirs = sorted(_version_dirs(store.root, name), reverse=True)
        below = before if level == "scratch" else newest_complete(store, name, vdirs)
        # versions under an earlier sweep's mark were swept by this process already: new
        # debris there only comes from a crash, and a new process sweeps again
        key = (root, name, frozenset(owned))
        floor = marks.get(key) if before is not None else None
        if level == "persistent" and floor is None:
            vdirs = vdirs[:RECENT_PERSISTENT]
        for version, vdir in vdirs:
            if floor is not None and version < floor:
                break
            old = below is not None and version < below
            left = _sweep_rank_dir(vdir, owned, tally, uncommitted=old)
            if old and not left:
                tally.rmdir(vdir)
        if below is not None:
            marks[key] = below
    base = node_scratch(ctx.config, ctx.node)
    for owner in _entries(base / ".partner"):
        for _, vdir in _version_dirs(owner.path, name):
            _sweep_rank_dir(vdir, None, tally)
            _prune(vdir, tally)
    for _, vdir, committed in GroupStore(base / ".erasure").version_dirs(name):
        if committed:
            for e in _entries(vdir):
                if _dead_temp(e):
                    tally.remove(e.path)
            continue
        for e in _entries(vdir):
            if temp_target(e.name) is None or _dead_temp(e):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    tally.remove(e.path)
        _prune(vdir, tally)
    tally.report(logger or log, f"node {ctx.node}'s engine ({name})")
    return tally


def newest_complete(store, name, vdirs=None):
    """The newest version of ``name`` every rank of its job committed at ``store``, or None
    (reads version folders newest first and stops at the first complete one; ``vdirs``:
    ``[(version, folder)]`` newest first, if just listed)."""
    if vdirs is None:
        vdirs = sorted(_version_dirs(store.root, name), reverse=True)
    for version, vdir in vdirs:
        try:
            ranks, manifest = store.version_summary(name, version)
        except CorruptCheckpointError:    # an unreadable manifest: not a complete version
            continue
        if manifest is not None and len(ranks) >= manifest.nranks:
            return version
    return None
