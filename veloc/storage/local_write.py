"""The local write of one application rank: its rank file on scratch, at the copy limit.

Used by one application rank (``Client.checkpoint_mem``) in sync and async mode. Three
ways to put a checkpoint's bytes into a tmpfs file, fastest first (measured on this
machine's kind, 256 MiB, see scripts/bench):

- a ``memcpy`` into a writable mapping of an allocated file that this process keeps
  mapped (:class:`~veloc.storage.write_mappings.WriteMappings`): the speed of
  ``np.copyto``;
- ``pwrite`` into an allocated file (about a third of that);
- ``pwrite`` into a fresh file, which allocates its pages on the way (the speed of
  ``np.save``; faulting a fresh *mapping* page by page would be half as fast again).

Scratch files rotate: garbage collection puts the files of old versions into the
:class:`~veloc.storage.levels.RecyclePool` and the next write takes one, so in the steady
state every write is the first kind. Until the rotation is full (the first
``scratch_versions`` + 1 checkpoints of a job; every checkpoint with
``scratch_versions = 0``, which never recycles), a background thread of this rank
*prepares* the file of the next checkpoint right after a write: it allocates it
(``posix_fallocate``: a full tmpfs is ENOSPC there, never SIGBUS in a later copy),
maps and pre-faults it and leaves it in the pool, so the next write is a ``memcpy``
too. A write that finds the preparation still running waits for it (cheaper than
starting a fresh file), one that finds nothing prepared writes a fresh file.

Every write is committed like any scratch file: temporary name, ``fsync``, rename; a
failure removes the temporary file and leaves earlier versions untouched.
"""
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from veloc.faults import fault_point
from veloc.storage.fileio import FILE_MODE, make_dirs, remove_quietly, temp_name
from veloc.storage.levels import LevelStore, RecyclePool
from veloc.storage.rankfile import build_header, write_rank_file
from veloc.storage.write_mappings import WriteMappings

log = logging.getLogger("veloc.local_write")
QUIET_S = 0.2      # after the last protect(), before the first checkpoint's file is prepared


def predicted_size(regions) -> Optional[int]:
    """The size of the rank file that ``regions`` (protected numpy arrays) would write,
    or ``None`` when it cannot be known before the write (pickled or device regions)."""
    descriptors = []
    for region in regions:
        if region.kind != "array":
            return None
        descriptors.extend(d for d, _ in region.snapshots())
    return build_header("", 0, 0, descriptors)[2] if descriptors else None


class LocalWriter:
    """Writes rank ``rank``'s rank files into ``scratch``; one per application rank.

    ``rotation``: the config's ``scratch_versions`` (0 = keep every version). ``prepare``:
    whether to prepare scratch files in the background (off: every write takes what the
    pool holds, or writes a fresh file).
    """

    def __init__(self, scratch: LevelStore, rank: int, pool: RecyclePool, rotation: int,
                 prepare: bool = True) -> None:
        self.scratch, self.rank, self.pool = scratch, int(rank), pool
        self.rotation = max(0, int(rotation))
        self.prepare_enabled = prepare
        self.mappings = WriteMappings(keep=(self.rotation or 1) + pool.keep)
        self._lock = threading.Lock()      # the mappings: the writer and the preparing thread
        self._thread = None
        self._closed = False
        self._written = False               # a first write happened: nothing to predict any more
        self._expected = None               # (callable giving the size, time of the last call)
        self._cancel = threading.Event()    # a write starts: stop waiting to prepare
        self._held = False                  # a restart reads: prepare after it (hold/release)
        self.prepared = 0                   # files prepared by this writer (a diagnostic)

    # -- the write ----------------------------------------------------------------------
    def write(self, name: str, final: Path, header: bytes, infos: Sequence, views: Sequence,
              total: int, digest=None) -> bool:
        """Write header and region ``views`` (laid out by ``build_header``: ``infos``,
        ``total``) to ``final`` through a temporary file, fsync it and rename it; then
        prepare the next checkpoint's file if the rotation needs one. ``digest``: a
        streaming hasher fed every byte of the file as it is copied into a kept mapping
        (the steady state); a fresh file's write, bound by allocating its pages, is not
        slowed by hashing: the engine hashes it. Returns whether ``digest`` saw the file.
        Raises OSError (ENOSPC, EIO, ...) after removing the temporary file."""
        self._written = True
        self._cancel.set()            # a preparation not begun yet is not worth waiting for
        if self._thread is not None and not self.pool.has(self.rank):
            self._thread.join()       # the file being prepared is the one this write wants
        self._cancel.clear()
        tmp = temp_name(final)
        recycled = self.pool.take(self.rank, tmp)
        unmapped = None         # a descriptor of the written file, to be mapped in the background
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                with self._lock:
                    mapped = None
                    if recycled is not None and recycled >= total > 0:
                        if os.fstat(fd).st_blocks * 512 < total:
                            # Holes would be allocated by page faults in the copy, where a full
                            # tmpfs means SIGBUS; allocate them here, where it means ENOSPC.
                            os.posix_fallocate(fd, 0, total)
                        mapped = self.mappings.get(fd, total)
                    elif recycled is not None:
                        self.mappings.forget(fd)
                    hashed = mapped is not None and digest is not None
                    write_rank_file(fd, header, infos, views, total, mapped, digest if hashed else None)
                    mapped = None
                fault_point("local_write")
                os.fsync(fd)
                if recycled is None and total > 0 and self.prepare_enabled and self.rotation > 0:
                    unmapped = os.dup(fd)     # a fresh file: recycled later, mapped by then
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            remove_quietly(tmp)
            if unmapped is not None:
                os.close(unmapped)
            raise
        wanted = total if self._wants_file(name) else None
        if unmapped is not None or wanted is not None:
            self._start_background(unmapped, total, wanted)
        return hashed

    # -- preparation --------------------------------------------------------------------
    def expect(self, size_of) -> None:
        """The protected regions changed (``protect``): before the first write, prepare its
        file in the background once no further change came for ``QUIET_S`` seconds;
        ``size_of()`` (called from that thread) gives the size, ``None`` if unknown."""
        if self._written or self._closed or not self.prepare_enabled:
            return
        self._expected = (size_of, time.monotonic())
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._prepare_first, daemon=True,
                                            name=f"veloc-prepare-r{self.rank}")
            self._thread.start()

    def hold(self) -> None:
        """A restart begins (``restart_test``): the first checkpoint's file is not prepared
        while the restart reads, which it would slow down."""
        self._held = True

    def release(self) -> None:
        """The restart is over (``restart_end``, or ``restart_test`` found nothing): prepare
        after another quiet time, if a first write is still to come."""
        self._held = False
        if self._expected is not None:
            self.expect(self._expected[0])

    def _prepare_first(self):
        while True:
            size_of, since = self._expected
            left = QUIET_S if self._held else since + QUIET_S - time.monotonic()
            if left <= 0:
                break
            if self._cancel.wait(left):
                return
        try:
            size = size_of()
        except Exception as exc:       # e.g. the regions changed while being read: skip
            log.debug("rank %d: first checkpoint's size not predicted: %s", self.rank, exc)
            return
        if size and not self._written and not self._closed and not self.pool.has(self.rank):
            self._prepare(size)

    def _wants_file(self, name):
        """Whether the next write of ``name`` would find no file in the pool and nothing
        will refill it first: the rotation (``rotation`` versions kept, one being written)
        is not full yet, or nothing is ever recycled (``rotation`` 0)."""
        if not self.prepare_enabled or self._closed or self.pool.has(self.rank):
            return False
        # the version just written is not committed yet: it is the ``+ 1``
        return self.rotation == 0 or len(self.scratch.rank_versions(name, self.rank)) + 1 < self.rotation + 1

    def _start_background(self, unmapped, size, wanted):
        """After a write: map the fresh file just written (descriptor ``unmapped``, closed
        here), then prepare a file of ``wanted`` bytes, in one background thread."""
        self.wait()      # at most one preparation at a time (normally long finished)
        self._thread = threading.Thread(target=self._background, args=(unmapped, size, wanted),
                                        daemon=True, name=f"veloc-prepare-r{self.rank}")
        self._thread.start()

    def _background(self, unmapped, size, wanted):
        if unmapped is not None:
            try:
                self._map_written(unmapped, size)
            finally:
                os.close(unmapped)
        if wanted is not None:
            self._prepare(wanted)

    def _map_written(self, fd, size):
        """Keep a pre-faulted mapping of a fresh rank file, so that its rewrite, once it is
        recycled, is a ``memcpy`` without a page-table population on the critical path.
        The file is fully written (allocated): mapping it can never fault in new pages."""
        try:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except (OSError, ValueError) as exc:
            log.debug("rank %d: no mapping kept of a fresh rank file: %s", self.rank, exc)
            return
        with self._lock:
            if self._closed:
                mapped.close()
            else:
                self.mappings.adopt(fd, mapped)

    def _prepare(self, size):
        """Background thread: one allocated, mapped, pre-faulted file of ``size`` bytes
        into the pool. Any failure (ENOSPC...) only means the next write starts fresh."""
        try:
            make_dirs(self.pool.dir)
            tmp = temp_name(self.pool.dir / f"r{self.rank}.vck")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except Exception as exc:
            log.debug("rank %d: no scratch file prepared: %s", self.rank, exc)
            return
        try:
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            with self._lock:
                if self._closed:
                    mapped.close()
                    raise OSError("the client is closing")
                self.mappings.adopt(fd, mapped)
            if not self.pool.put(tmp, self.rank):
                with self._lock:
                    self.mappings.forget(fd)
            else:
                self.prepared += 1
        except Exception as exc:
            remove_quietly(tmp)
            log.debug("rank %d: no scratch file prepared (%d bytes): %s", self.rank, size, exc)
        finally:
            os.close(fd)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for a background preparation to finish (tests, close)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop preparing and release every kept mapping; the rank calls it at finalize or
        when leaving on an exception."""
        self._closed = True
        self._cancel.set()
        self.wait()
        with self._lock:
            self.mappings.close()
