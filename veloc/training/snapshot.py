"""Two-phase checkpoints for training loops: ``snapshot`` now, persist in the background.

Mixed into :class:`veloc.client.Client`; every public call runs on each application
rank's main thread, and ``snapshot`` is collective like ``checkpoint`` (every rank, same
order, same name and version).

* ``snapshot(name, version)`` copies every protected region into a staging buffer
  (allocated once, reused) on a copy thread and returns at once; device state is copied
  on a side stream. When the copy is complete, the persist thread writes the staged copy
  to scratch and runs the usual ``checkpoint_begin``/``checkpoint_end`` path (the
  pipeline in sync mode, the backend in async mode).
* ``wait_snapshot()`` / ``with guard():`` block until the staged copies are complete,
  so the state may then be modified; they never wait for persists. Call it before
  anything modifies protected state: the optimizer step, and also a training-mode
  forward pass when the model keeps running statistics (BatchNorm buffers).
* At most ``[snapshot] max_in_flight`` snapshots are outstanding; a new one waits for the
  oldest persist instead of allocating another buffer.

All veloc communication of the client runs on a private duplicate of the application's
communicator (made collectively at init), so persist collectives never interleave with
the application's own calls; foreground veloc calls first wait for the persists, so on
the private communicator every rank sees the same sequence. Background persisting needs
``MPI_THREAD_MULTIPLE``; at a lower thread level the staged copies are persisted on the
main thread at the next ``snapshot``/``checkpoint_wait``/``checkpoint``/``finalize``.

Errors of a snapshot (its copy or its persist) are raised as :class:`VelocError` at the
first point where every rank deterministically waits for that persist: the ``snapshot``
that needs its buffer again, ``checkpoint_wait``, ``checkpoint``, ``restart_test`` or
``finalize`` — on every rank, since a failed persist is discarded collectively.
"""
import contextlib
import logging
import queue
import threading
import time
from collections import deque

from veloc.errors import CheckpointError, VelocError
from veloc.names import check_name, check_version
from veloc.training.gpu import DeviceMemoryWatch
from veloc.training.staging import StagingBuffer, region_sources
from veloc.training.stateful import StatefulRegion

log = logging.getLogger("veloc.snapshot")


def background_persist_allowed() -> bool:
    """Whether MPI was initialised with ``MPI_THREAD_MULTIPLE`` (persist threads may call MPI)."""
    from mpi4py import MPI
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


class _Job:
    """One snapshot from ``snapshot()`` until it is retired on the main thread."""

    def __init__(self, name, version, buffer):
        self.name, self.version, self.buffer = name, version, buffer
        self.copy = None
        self.error = None
        self.copy_s = self.persist_s = 0.0
        self.staged = threading.Event()
        self.persisted = threading.Event()


class SnapshotMixin:
    """``snapshot``, ``wait_snapshot``, ``guard`` and the copy and persist threads."""

    def _init_snapshot(self, comm):
        """Collective over ``comm``: set up snapshots; returns the client's private communicator."""
        self.app_comm = comm
        private = comm.Dup()
        self._snap_settings = self.config.section("snapshot")
        self._background = background_persist_allowed()
        if not self._background:
            log.warning("MPI thread level is not MPI_THREAD_MULTIPLE: snapshots are persisted on the main "
                        "thread at the next snapshot, checkpoint_wait or finalize")
        self._buffers = []
        self._free = []
        self._jobs = deque()
        self._lock = threading.Condition()
        self._copy_queue = queue.Queue()
        self._persist_queue = queue.Queue()
        self._threads = []
        self._persisting = None     # thread ident of the persist running now
        self.snapshot_stats = {"snapshots": 0, "persists": 0, "allocations": 0, "last_stall_s": 0.0,
                               "last_copy_s": 0.0, "last_persist_s": 0.0, "background": self._background,
                               "device_modes": {}}
        return private

    # -- public ---------------------------------------------------------------------
    def snapshot(self, name: str, version: int) -> None:
        """Stage every protected region and return; the copy and the persist run in the
        background. Blocks only while all staging buffers are held by earlier snapshots."""
        self._check_open()
        name, version = check_name(name), check_version(version)
        if self._pending is not None and not self._jobs:   # with jobs, it is a persist's own
            raise CheckpointError(f"snapshot({name!r}, {version}) while checkpoint {self._pending.name!r} "
                                  f"v{self._pending.version} is open: call checkpoint_end first")
        start = time.perf_counter()
        self._persist_in_foreground()
        buffer = self._take_buffer()
        waited = time.perf_counter() - start
        job = _Job(name, version, buffer)
        try:
            sources = [src for region in list(self.regions.values()) for src in region_sources(region)]
            job.copy = buffer.stage(sources)
        except VelocError as exc:
            job.error = exc
        except Exception as exc:      # a failing state_dict() or device copy: discard everywhere later
            job.error = CheckpointError(f"rank {self.rank}: snapshot {name} v{version} failed while "
                                        f"staging: {exc!r}")
        self._jobs.append(job)
        self._start_threads()
        self._copy_queue.put(job)
        stats = self.snapshot_stats
        stats["snapshots"] += 1
        stats["allocations"] = sum(b.allocations for b in self._buffers)
        stats["device_modes"] = {f"{lib}:{device}": mode for (lib, device), mode in buffer.device_modes.items()}
        stats["last_stall_s"] = time.perf_counter() - start
        hooks = self._policy_hooks()
        if hooks is not None:
            if waited > 0:
                hooks.record_stall(waited, for_buffer=True)   # waiting for an earlier persist
            hooks.record_snapshot(stats["last_stall_s"] - waited)

    def wait_snapshot(self) -> None:
        """Block until every started snapshot is staged (not persisted): the protected
        state may be modified after this returns."""
        self._check_open()
        start = time.perf_counter()
        for job in list(self._jobs):
            job.staged.wait()
        waited = time.perf_counter() - start
        self.snapshot_stats["last_stall_s"] += waited
        hooks = self._policy_hooks()
        if hooks is not None and self._jobs:
            hooks.record_stall(waited)

    @contextlib.contextmanager
    def guard(self):
        """``with ckpt.guard(): optimizer.step()``: the body runs once the snapshot is staged."""
        self.wait_snapshot()
        yield self

    def snapshot_finished(self) -> bool:
        """Whether no snapshot is being copied or persisted (never blocks, never raises)."""
        return all(job.persisted.is_set() for job in list(self._jobs))

    def protect_stateful(self, name, obj) -> None:
        """Protect any object with ``state_dict()``/``load_state_dict()`` under ``name``:
        its tensor and array leaves are raw regions, the rest one pickled region; restart
        refills the leaves in place and calls ``load_state_dict``."""
        region = StatefulRegion(name, obj)
        self.regions[region.id] = region

    def restart_test(self, name, max_version=None):
        self._settle_snapshots()
        return super().restart_test(name, max_version)

    # -- buffers and retirement (main thread) ---------------------------------------
    def _take_buffer(self):
        if not self._buffers:
            count = self._snap_settings["max_in_flight"]
            watch = DeviceMemoryWatch()       # one high-water mark per device, shared
            self._buffers = [StagingBuffer(self._snap_settings, watch) for _ in range(count)]
            self._free = list(self._buffers)
        # Retire by count, never by timing, so every rank raises at the same call.
        while len(self._jobs) >= len(self._buffers):
            self._retire(self._jobs[0])
        with self._lock:
            return self._free.pop()

    def _retire(self, job):
        """Wait for ``job``'s persist, drop it and raise its error (main thread)."""
        job.persisted.wait()
        self._jobs.remove(job)
        if job.error is not None:
            raise job.error

    def _settle_snapshots(self, raise_errors=True):
        """Foreground veloc calls: persist what is staged (at a low MPI thread level), wait
        for every persist, retire all and raise the first error. No-op on the persist thread."""
        if self._persisting == threading.get_ident() or not self._jobs:
            return
        self._persist_in_foreground()
        first = None
        while self._jobs:
            try:
                self._retire(self._jobs[0])
            except VelocError as exc:
                first = first or exc
        if first is not None and raise_errors:
            raise first

    def _persist_in_foreground(self):
        if self._background:
            return
        for job in list(self._jobs):
            if not job.persisted.is_set():
                job.staged.wait()
                self._persist(job)

    # -- threads --------------------------------------------------------------------
    def _start_threads(self):
        if self._threads:
            return
        loops = [("copy", self._copy_loop)] + ([("persist", self._persist_loop)] if self._background else [])
        for what, loop in loops:
            thread = threading.Thread(target=loop, name=f"veloc-{what}-r{self.rank}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _copy_loop(self):
        while True:
            job = self._copy_queue.get()
            if job is None:
                return
            start = time.perf_counter()
            if job.error is None:
                try:
                    job.copy.copy_host()
                except Exception as exc:
                    job.error = CheckpointError(f"rank {self.rank}: snapshot {job.name} v{job.version}: "
                                                f"the staging copy failed: {exc!r}")
            job.copy_s = self.snapshot_stats["last_copy_s"] = time.perf_counter() - start
            job.staged.set()
            if self._background:
                self._persist_queue.put(job)

    def _persist_loop(self):
        while True:
            job = self._persist_queue.get()
            if job is None:
                return
            self._persist(job)

    def _persist(self, job):
        """Write the staged copy and run ``checkpoint_end`` (persist thread, or the main
        thread at a low MPI thread level). Every rank runs the same collectives, also when
        its own copy failed: the version is then discarded everywhere."""
        start = time.perf_counter()
        self._persisting = threading.get_ident()
        try:
            self._persist_phases(job)
        finally:
            self._persisting = None
        job.copy = None
        job.persist_s = self.snapshot_stats["last_persist_s"] = time.perf_counter() - start
        self.snapshot_stats["persists"] += 1
        with self._lock:
            self._free.append(job.buffer)
        job.persisted.set()
        hooks = self._policy_hooks()
        if hooks is not None:
            hooks.record_persist(job.persist_s)
        if job.error is not None:
            log.warning("rank %d: snapshot %s v%d was not persisted: %s", self.rank, job.name, job.version,
                        job.error)

    def _persist_phases(self, job):
        name, version, error = job.name, job.version, job.error
        if error is None:
            try:
                self.checkpoint_begin(name, version)
                self._write_regions(self._pending, job.copy.snaps())
            except VelocError as exc:
                error = exc
            except Exception as exc:
                error = CheckpointError(f"rank {self.rank}: persisting {name} v{version} failed: {exc!r}")
        try:
            if error is None:
                self.checkpoint_end(success=True)
            elif self._pending is not None:
                self._pending.failure = error
                self.checkpoint_end(success=False)
            else:
                self._agree_and_discard(name, version, error=error)
        except VelocError as exc:
            error = error or exc
        except Exception as exc:
            error = error or CheckpointError(f"rank {self.rank}: ending {name} v{version} failed: {exc!r}")
        job.error = error

    def _policy_hooks(self):
        hooks = getattr(self, "policy_hooks", None)
        return hooks() if hooks is not None else None

    def _close_snapshot(self):
        """Stop the threads and free the private communicator (``finalize``, after settling)."""
        for _ in self._threads:
            self._copy_queue.put(None)
            self._persist_queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self.comm is not self.app_comm:
            self.comm.Free()
