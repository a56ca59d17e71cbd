"""The application-side client: protect regions, checkpoint, restart.

One ``Client`` per application rank, built by ``veloc.init`` (collective over the
communicator) or ``veloc.init_single`` (one process on its own). Each rank writes its
own scratch copy and commits its manifest; the node's engine does the rest (in the
application's leader rank in sync mode, in the backend in async mode).
"""
import logging
import os
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from veloc.config import load_config, node_id
from veloc.storage.debris import claim_rank_scratch
from veloc.storage.fileio import FILE_MODE, fsync_dir, make_dirs
from veloc.storage.levels import RecyclePool
from veloc.storage.local_write import LocalWriter, predicted_size
from veloc.engine.modules.checksum import ChecksumModule
from veloc.storage.hashing import hasher
from veloc.storage.manifest import FileEntry, Manifest, file_fingerprint
from veloc.storage.rankfile import build_header
from veloc.errors import BackendError, CheckpointError, ConfigError, VelocError
from veloc.faults import fault_point
from veloc.names import check_file_name, check_name, check_version
from veloc.regions import Region
from veloc.restart import RestartMixin
from veloc.training.policy import PolicyMixin
from veloc.training.snapshot import SnapshotMixin

log = logging.getLogger("veloc.client")


class _Pending:
    """State of a checkpoint between ``checkpoint_begin`` and ``checkpoint_end``."""

    def __init__(self, name, version, vdir):
        self.name, self.version, self.vdir = name, version, vdir
        self.files = []          # FileEntry list
        self.routed = {}         # original base name -> path
        self.mem_written = False
        self.failure = None      # why this rank cannot commit the version (CheckpointError)


class _Declined(str):
    """``checkpoint_end(success=False)`` on this rank: not an error of its own."""

    def __new__(cls):
        return super().__new__(cls, "checkpoint_end(success=False) was called")


RegionId = Union[int, str]


class Client(SnapshotMixin, RestartMixin, PolicyMixin):
    """Checkpoint/restart client of one application rank.

    Built by :func:`veloc.init` (collective over ``comm``) or :func:`veloc.init_single`
    (one process on its own); use it as a context manager (leaving the block is
    ``finalize(drain=True)``). Attributes: ``config``, ``rank``, ``size``, ``node``,
    ``regions`` (protected regions by id), ``recovered`` (pickled objects restored by the
    last restart, by id) and ``last_restart`` (:class:`veloc.RestartInfo` or ``None``).
    """

    def __init__(self, cfg, comm, rank: Optional[int] = None, single: bool = False) -> None:
        self.config = load_config(cfg)
        self.comm = self._init_snapshot(comm)    # veloc's private duplicate of comm
        self.rank = comm.Get_rank() if rank is None else int(rank)
        self.size = comm.Get_size()
        self.node = node_id()
        self.single = single
        self.regions = {}
        self.recovered = {}
        self.last_restart = None
        self._pending = None
        self._restoring = None
        self._closed = False
        self._lineage = {}         # name -> where this run's versions of it start (see _start_lineage)
        self.scratch = self._agree_on_setup(self._prepare_scratch)
        self.pool = RecyclePool(self.config.scratch_dir(self.node, self.rank))
        self._claim = claim_rank_scratch(self.scratch, self.rank, self.pool, None if single else self.size, log)
        self.writer = LocalWriter(self.scratch, self.rank, self.pool, self.config.scratch_versions)
        # the rank file's digest is computed while it is written ([checksum] at_write)
        self.write_checksum = ChecksumModule.write_algorithm(self.config)
        self.host = self._make_host()

    # -- setup ----------------------------------------------------------------------
    def _prepare_scratch(self):
        from veloc.storage.levels import LevelStore
        root = self.config.scratch_dir(self.node, self.rank)
        try:
            make_dirs(root)
        except CheckpointError as exc:
            raise ConfigError(f"scratch directory {root} (config key 'scratch') cannot be created: "
                              f"{exc.__cause__.strerror}") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"scratch directory {root} (config key 'scratch') is not writable")
        return LevelStore("scratch", root)

    def _agree_on_setup(self, step):
        """Run a setup step on every rank; if it fails anywhere, raise everywhere (no hang)."""
        result, error = None, None
        try:
            result = step()
        except VelocError as exc:
            error = exc
        failures = [(i, e) for i, e in enumerate(self.comm.allgather(str(error) if error else None)) if e]
        if error is not None:
            raise error
        if failures:
            rank, message = failures[0]
            raise ConfigError(f"veloc.init failed on rank {rank}: {message}")
        return result

    def _make_host(self):
        if self.config.mode == "async":
            from veloc.hosts.async_host import AsyncHost
            return AsyncHost(self.config, self.comm, self.rank, self.node, log)
        from veloc.hosts.sync_host import SyncHost
        return SyncHost(self.config, self.comm, self.rank, self.node, log)

    # -- regions --------------------------------------------------------------------
    def protect(self, region_id: RegionId, obj: Any, pickle: bool = False, *,
                global_shape: Optional[Sequence[int]] = None, offset: Optional[Sequence[int]] = None,
                replicated: bool = False, lossy: Optional[Tuple[str, float]] = None) -> None:
        """Register ``obj`` under ``region_id`` (an int, or a name ``[A-Za-z0-9_.]+``); any rank,
        local (not collective). Re-protecting an id replaces it.

        ``obj``: a contiguous, writable numpy or cupy array (written from its buffer, restored
        in place), or with ``pickle=True`` any picklable object: a dict, list, set, bytearray,
        numpy array or object with ``__dict__`` is restored in place (``recovered[id]`` is the
        same object), anything else (int, str, tuple, ...) only into ``recovered[id]``.
        ``global_shape`` and ``offset``: the array is this rank's slab of a global array of
        that shape, starting at ``offset`` in every dimension; ``replicated=True``: every
        rank holds the same value (a step counter). Either lets a job of another size
        restart from a version whose copies keep the layout (the HDF5 format) and lets
        ``veloc.open(...).read_global`` stitch the whole array.
        ``lossy=("zfp", bound)``: a float32/float64 array whose compressed persistent copy may
        differ from it by at most ``bound`` per element (``[compress]`` enabled; scratch,
        partner and erasure copies stay exact).
        Raises CheckpointError for an object that cannot be protected or a layout that does
        not fit, ConfigError/CheckpointError for a bad id."""
        region = Region(region_id, obj, use_pickle=pickle, global_shape=global_shape, offset=offset,
                        replicated=replicated, lossy=lossy)
        self.regions[region.id] = region
        self.writer.expect(lambda: predicted_size(list(self.regions.values())))

    def unprotect(self, region_id: RegionId) -> None:
        """Stop protecting ``region_id``; local. Raises CheckpointError if it is not protected."""
        if region_id not in self.regions:
            raise CheckpointError(f"cannot unprotect region {region_id!r}: it is not protected")
        del self.regions[region_id]

    # -- checkpoint -----------------------------------------------------------------
    def checkpoint(self, name: str, version: int) -> None:
        """``checkpoint_begin`` + ``checkpoint_mem`` + ``checkpoint_end``; every rank, collective.

        Sync mode returns when every level is done; async mode once this rank's scratch copy
        is committed (see ``checkpoint_begin`` for how far it waits for earlier background
        work). A failure on any rank is raised on every rank as a :class:`CheckpointError`
        naming the rank, node, path and cause; the version is then discarded everywhere and
        earlier versions are untouched. BackendError in async mode if the backend fails."""
        self._check_open()
        try:
            self.checkpoint_begin(name, version)
            self.checkpoint_mem()
        except Exception as exc:
            error = self._as_checkpoint_error(exc)
            if self._pending is not None:
                self._pending.failure = error
                self.checkpoint_end(success=False)
            else:   # begin failed here: still take part in the agreement, then discard
                self._agree_and_discard(name, version, error=error)
            raise error from (exc if error is not exc else None)
        self.checkpoint_end(success=True)

    def _as_checkpoint_error(self, exc):
        """``exc`` as a VelocError that names this rank and node (an OS error also its path
        and cause); veloc's own errors are returned unchanged."""
        if isinstance(exc, VelocError):
            return exc
        if isinstance(exc, OSError):
            where = f" {exc.filename}" if exc.filename else ""
            return CheckpointError(f"rank {self.rank} on node {self.node}: OS error at{where}: "
                                   f"{exc.strerror or exc}; earlier versions are untouched")
        return CheckpointError(f"rank {self.rank} on node {self.node}: {type(exc).__name__}: {exc}")

    def checkpoint_begin(self, name: str, version: int) -> None:
        """Open version ``version`` (int >= 0) of checkpoint ``name`` (``[A-Za-z0-9_.]+``) on this
        rank; local (collective at a run's first checkpoint of ``name``: see ``_start_lineage``).
        Async mode first waits for older background work as far as this write needs it.
        Raises CheckpointError (bad name/version, a checkpoint still open)."""
        self._check_open()
        name, version = check_name(name), check_version(version)
        self._settle_snapshots()
        if self._pending is not None:
            raise CheckpointError(f"checkpoint_begin({name!r}, {version}) while checkpoint "
                                  f"{self._pending.name!r} v{self._pending.version} is still open: "
                                  "call checkpoint_end first")
        if name not in self._lineage:
            self._start_lineage(name, version)
        self._wait_for_buffers()
        vdir = self.scratch.version_dir(name, version)
        make_dirs(vdir)
        # Re-checkpointing a version (e.g. after restarting from an older one): uncommit
        # the old copy first, readable or not, without pruning the shared directory.
        self.scratch.remove(name, version, self.rank, prune=False)
        self._pending = _Pending(name, version, vdir)

    def _start_lineage(self, name, version):
        """Collective, at this run's first checkpoint of ``name``: copies left by earlier
        runs that would look newer than this run's versions are removed from every level.

        A run that restarted ``name`` from version ``r`` continues it: the versions above
        ``r`` (the crashed run's, which not every rank could restore) are superseded. A
        run that did not restart ``name`` starts it anew at ``version``: every copy at
        ``version`` or above is superseded. Older copies stay restorable until this run's
        versions are complete at their level and versioning collects them. Without this,
        versioning would keep the old run's higher-numbered copies and delete the versions
        this run has just written, and a restart would go back to the old run.
        """
        restored = self.last_restart.version if (self.last_restart and self.last_restart.name == name) else None
        threshold = version if restored is None else min(restored + 1, version)
        self._lineage[name] = threshold     # attempted: every rank takes this step once per name
        removed = self.host.supersede(name, threshold)
        if removed and self.comm.Get_rank() == 0:
            what = "restarted from v%d" % restored if restored is not None else "did not restart it"
            log.warning("%s: this run %s; versions >= v%d left by an earlier run are superseded and "
                        "were removed: %s", name, what, threshold,
                        ", ".join(f"{level} v{min(v)}..v{max(v)}" for level, v in removed.items()))

    def checkpoint_mem(self, ids: Optional[Iterable[RegionId]] = None) -> None:
        """Write the protected regions (all, or ``ids``) to this rank's scratch file; local,
        once per checkpoint. Raises CheckpointError (no checkpoint open, unknown ids, a full
        or unwritable scratch: earlier versions stay untouched)."""
        pending = self._require_pending("checkpoint_mem")
        if pending.mem_written:
            raise CheckpointError("checkpoint_mem called twice in one checkpoint")
        selected = self._select_regions(ids)
        self._write_regions(pending, [snap for region in selected for snap in region.snapshots()])

    def _write_regions(self, pending, snaps):
        """Write ``(descriptor, buffer)`` pairs to this rank's scratch file of ``pending``."""
        header, infos, total = build_header(pending.name, pending.version, self.rank, [d for d, _ in snaps])
        final = pending.vdir / self.scratch.regions_file_name(self.rank)
        digest = hasher(self.write_checksum) if self.write_checksum else None
        try:
            if not self.writer.write(pending.name, final, header, infos, [v for _, v in snaps], total, digest):
                digest = None                       # a fresh file: the engine hashes it
            fingerprint = file_fingerprint(os.stat(final)) if digest is not None else None
        except OSError as exc:
            raise CheckpointError(f"rank {self.rank}: cannot write {final} ({total} bytes): {exc.strerror}; "
                                  "earlier versions are untouched") from exc
        pending.files.append(FileEntry(final.name, total, "regions", digest=digest and digest.hexdigest(),
                                       fingerprint=fingerprint))
        pending.mem_written = True

    def route_file(self, original: Union[str, os.PathLike]) -> str:
        """File-based mode: the scratch path to write ``original`` to between ``checkpoint_begin``
        and ``checkpoint_end``, or to read it from between ``restart_begin`` and ``restart_end``;
        local. Only the base name of ``original`` is used. Raises CheckpointError/RestartError
        outside those phases or for a base name that is not ``[A-Za-z0-9_.-]+``."""
        base = check_file_name(os.path.basename(os.fspath(original)))
        if self._restoring is not None:
            return self._restored_file(base)
        pending = self._require_pending("route_file")
        path = pending.vdir / self.scratch.routed_file_name(self.rank, base)
        pending.routed[base] = path
        return str(path)

    def checkpoint_end(self, success: bool = True) -> None:
        """Commit this rank's scratch copy and run the pipeline; every rank, collective.

        With ``success=False`` (on any rank) the version is discarded everywhere. If any rank
        failed to commit its copy, every rank raises a :class:`CheckpointError` naming that
        rank and its cause; a failed module raises CheckpointError on every rank too.
        """
        pending = self._require_pending("checkpoint_end")
        self._pending = None
        error = pending.failure
        if success and error is None:
            try:
                self._commit_scratch(pending)
            except Exception as exc:        # ENOSPC, EIO...: never skip the agreement
                error = self._as_checkpoint_error(exc)
        elif error is None:
            error = _Declined()
        failure = self._agree_and_discard(pending.name, pending.version, error=error)
        if failure is None:
            self.host.checkpoint(pending.name, pending.version)
            return
        if error is not None and not isinstance(error, _Declined):
            raise error
        rank, cause = failure
        if success:
            raise CheckpointError(f"{pending.name} v{pending.version} was discarded on every rank: rank {rank} "
                                  f"failed: {cause}")

    def _agree_and_discard(self, name, version, error=None):
        """Collective: ``None`` if no rank passed an error, else ``(rank, cause)`` of the
        first failing rank, after this version was discarded everywhere."""
        try:
            name, version = check_name(name), check_version(version)
        except VelocError:
            name = version = None     # nothing was written under an invalid name
        if name is not None and name not in self._lineage:
            # this rank failed before its first checkpoint of ``name`` reached the lineage
            # step, which the other ranks take collectively: take it too, in the same order
            try:
                self._start_lineage(name, version)
            except VelocError as exc:
                error = error or exc
        failure = self.host.first_failure(str(error) if error is not None else None)
        if failure is None:
            return None
        self.host.discard(name, version)
        return failure

    def _commit_scratch(self, pending):
        for base, path in pending.routed.items():
            try:
                size = path.stat().st_size
                os.chmod(path, FILE_MODE)
            except FileNotFoundError:
                raise CheckpointError(f"rank {self.rank}: route_file({base!r}) returned {path} but nothing "
                                      "was written there before checkpoint_end") from None
            pending.files.append(FileEntry(path.name, size, "routed", original=base))
        if not pending.files:
            raise CheckpointError(f"rank {self.rank}: {pending.name} v{pending.version} has nothing to commit: "
                                  "call checkpoint_mem or write a routed file first")
        fsync_dir(pending.vdir)
        manifest = Manifest(pending.name, pending.version, self.rank, self.size, self.node, "scratch",
                            files=pending.files,
                            checksum=self.write_checksum if any(f.digest for f in pending.files) else None)
        fault_point("manifest_commit")
        self.scratch.commit_manifest(manifest)

    def _wait_for_buffers(self):
        """Async mode: wait for earlier background work only as far as this write needs.

        Versions older than the previous one must be done (this bounds scratch use and
        reports their failures). The previous version's work is awaited only when no
        recycled scratch file is ready: its garbage collection is what refills the pool.
        """
        self.host.drain(keep=1)
        if not self.pool.has(self.rank):
            self.host.drain()

    def checkpoint_wait(self) -> None:
        """Block until the background work of earlier checkpoints is done (async mode; in
        sync mode there is none). Every rank, collective in async mode: a background
        failure seen on any rank (its node's backend failed, died or hung) is raised on
        every rank, the others naming that rank, so no rank goes on into a collective that
        the failing one has left. Long waits report progress every few seconds (versions
        and bytes pending, rate). Raises BackendError naming node, module and version."""
        self._check_open()
        self._settle_snapshots()
        if not self.host.background:
            return
        error = None
        try:
            self.host.drain()
        except Exception as exc:
            error = exc
        failure = self.host.first_failure(None if error is None else str(error))
        if error is not None:
            raise error
        if failure is not None:
            raise BackendError(f"checkpoint_wait: rank {failure[0]} reports: {failure[1]}")

    def checkpoint_finished(self) -> bool:
        """Whether the background work of this rank's earlier checkpoints is done; local,
        never blocks, never raises for a background failure (``checkpoint_wait`` does)."""
        if not self.snapshot_finished():
            return False
        return self.host.finished()

    # -- lifecycle ------------------------------------------------------------------
    def finalize(self, drain: bool = True) -> None:
        """Every rank, collective: with ``drain``, wait until every level has its copy (async:
        progress is reported on long waits), then release the client. Calling it again does
        nothing.

        A background failure on any rank (a level not reached, a failed flush) is raised on
        every rank, naming the rank that saw it."""
        if self._closed:
            return
        error = None
        try:
            self._settle_snapshots(raise_errors=drain)
            if drain:
                self.host.drain()
        except Exception as exc:
            error = exc
        try:
            failure = self.host.first_failure(None if error is None else str(error))
        finally:
            self._closed = True
            self._close_policy()
            self.writer.close()
            self.host.close()
            self._close_snapshot()
            self._claim.release()
        if error is not None:
            raise error
        if failure is not None:
            raise BackendError(f"finalize: rank {failure[0]} reports: {failure[1]}")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Leaving the block normally is ``finalize(drain=True)``; on an exception this rank
        only releases what it holds, with no collective (the other ranks may be anywhere)."""
        if exc_type is None:
            self.finalize(drain=True)
        else:
            self._abandon()
        return False

    def _abandon(self) -> None:
        """Release this rank's resources without any collective call; background work
        already handed to a backend goes on there."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        self.host.close(collective=False)
        self._claim.release()

    # -- helpers --------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise CheckpointError("this veloc client was finalized; call veloc.init again")

    def _require_pending(self, what):
        self._check_open()
        if self._pending is None:
            raise CheckpointError(f"{what} called without checkpoint_begin")
        return self._pending

    def _select_regions(self, ids):
        if ids is None:
            return list(self.regions.values())
        missing = [i for i in ids if i not in self.regions]
        if missing:
            raise CheckpointError(f"regions {missing!r} are not protected; protected: {sorted(map(str, self.regions))}")
        return [self.regions[i] for i in ids]
