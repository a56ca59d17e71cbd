"""The application-side client: protect regions, checkpoint, restart.

One ``Client`` per application rank, built by ``veloc.init`` (collective over the
communicator) or ``veloc.init_single`` (one process on its own). Each rank writes its
own scratch copy and commits its manifest; the node's engine does the rest (in the
application's leader rank in sync mode, in the backend in async mode).
"""
import logging
import os

from .config import load_config, node_id
from .engine.fileio import FILE_MODE, fsync_dir, make_dirs, remove_quietly, temp_name
from .engine.levels import RecyclePool
from .engine.manifest import FileEntry, Manifest
from .engine.rankfile import build_header, write_rank_file
from .engine.write_mappings import WriteMappings
from .errors import CheckpointError, ConfigError, VelocError
from .names import check_file_name, check_name, check_version
from .regions import Region
from .restart import RestartMixin
from .training.policy import PolicyMixin
from .training.snapshot import SnapshotMixin

log = logging.getLogger("veloc.client")


class _Pending:
    """State of a checkpoint between ``checkpoint_begin`` and ``checkpoint_end``."""

    def __init__(self, name, version, vdir):
        self.name, self.version, self.vdir = name, version, vdir
        self.files = []          # FileEntry list
        self.routed = {}         # original base name -> path
        self.mem_written = False


class Client(SnapshotMixin, RestartMixin, PolicyMixin):
    """Checkpoint/restart client of one application rank."""

    def __init__(self, cfg, comm, rank=None, single=False):
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
        self.scratch = self._agree_on_setup(self._prepare_scratch)
        self.pool = RecyclePool(self.config.scratch_dir(self.node, self.rank))
        self.mappings = WriteMappings(keep=(self.config.scratch_versions or 1) + self.pool.keep)
        self.host = self._make_host()

    # -- setup ----------------------------------------------------------------------
    def _prepare_scratch(self):
        from .engine.levels import LevelStore
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
            from .async_host import AsyncHost
            return AsyncHost(self.config, self.comm, self.rank, self.node, log)
        from .sync_host import SyncHost
        return SyncHost(self.config, self.comm, self.rank, self.node, log)

    # -- regions --------------------------------------------------------------------
    def protect(self, region_id, obj, pickle=False):
        """Register ``obj`` under ``region_id`` (int or name); re-protecting replaces it."""
        region = Region(region_id, obj, use_pickle=pickle)
        self.regions[region.id] = region

    def unprotect(self, region_id):
        if region_id not in self.regions:
            raise CheckpointError(f"cannot unprotect region {region_id!r}: it is not protected")
        del self.regions[region_id]

    # -- checkpoint -----------------------------------------------------------------
    def checkpoint(self, name, version):
        """Begin, write all regions, end. Collective in sync mode; see ``checkpoint_begin``
        for how far it waits for earlier background work in async mode."""
        self._check_open()
        try:
            self.checkpoint_begin(name, version)
            self.checkpoint_mem()
        except VelocError:
            if self._pending is not None:
                self.checkpoint_end(success=False)
            else:   # begin failed here: still take part in the agreement, then discard
                self._agree_and_discard(name, version)
            raise
        self.checkpoint_end(success=True)

    def checkpoint_begin(self, name, version):
        self._check_open()
        name, version = check_name(name), check_version(version)
        self._settle_snapshots()
        if self._pending is not None:
            raise CheckpointError(f"checkpoint_begin({name!r}, {version}) while checkpoint "
                                  f"{self._pending.name!r} v{self._pending.version} is still open: "
                                  "call checkpoint_end first")
        self._wait_for_buffers()
        vdir = self.scratch.version_dir(name, version)
        make_dirs(vdir)
        # Re-checkpointing a version (e.g. after restarting from an older one): uncommit
        # the old copy first, readable or not, without pruning the shared directory.
        self.scratch.remove(name, version, self.rank, prune=False)
        self._pending = _Pending(name, version, vdir)

    def checkpoint_mem(self, ids=None):
        """Write the protected regions (all, or ``ids``) to this rank's scratch file."""
        pending = self._require_pending("checkpoint_mem")
        if pending.mem_written:
            raise CheckpointError("checkpoint_mem called twice in one checkpoint")
        selected = self._select_regions(ids)
        self._write_regions(pending, [snap for region in selected for snap in region.snapshots()])

    def _write_regions(self, pending, snaps):
        """Write ``(descriptor, buffer)`` pairs to this rank's scratch file of ``pending``."""
        header, infos, total = build_header(pending.name, pending.version, self.rank, [d for d, _ in snaps])
        final = pending.vdir / self.scratch.regions_file_name(self.rank)
        tmp = temp_name(final)
        recycled = self.pool.take(self.rank, tmp)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                mapped = None
                if recycled is not None and recycled >= total > 0:
                    if os.fstat(fd).st_blocks * 512 < total:
                        # Holes would be allocated by page faults in the copy, where a full
                        # tmpfs means SIGBUS; allocate them here, where it means ENOSPC.
                        os.posix_fallocate(fd, 0, total)
                    mapped = self.mappings.get(fd, total)
                elif recycled is not None:
                    self.mappings.forget(fd)
                write_rank_file(fd, header, infos, [v for _, v in snaps], total, mapped)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            remove_quietly(tmp)
            raise CheckpointError(f"rank {self.rank}: cannot write {final} ({total} bytes): {exc.strerror}; "
                                  "earlier versions are untouched") from exc
        pending.files.append(FileEntry(final.name, total, "regions"))
        pending.mem_written = True

    def route_file(self, original):
        """File-based mode: the scratch path to write ``original`` to (or read it from on restart)."""
        base = check_file_name(os.path.basename(os.fspath(original)))
        if self._restoring is not None:
            return self._restored_file(base)
        pending = self._require_pending("route_file")
        path = pending.vdir / self.scratch.routed_file_name(self.rank, base)
        pending.routed[base] = path
        return str(path)

    def checkpoint_end(self, success=True):
        """Commit this rank's scratch copy and run the pipeline (collective in sync mode).

        With ``success=False`` the version is discarded everywhere.
        """
        pending = self._require_pending("checkpoint_end")
        self._pending = None
        error = None
        if success:
            try:
                self._commit_scratch(pending)
            except VelocError as exc:
                error, success = exc, False
        if not self._agree_and_discard(pending.name, pending.version, success):
            if error is not None:
                raise error
            if success:
                raise CheckpointError(f"{pending.name} v{pending.version} was discarded: another rank ended "
                                      "it with success=False or failed to write its copy")
            return
        self.host.checkpoint(pending.name, pending.version)

    def _agree_and_discard(self, name, version, success=False):
        """Collective: ``True`` if every rank succeeded; otherwise discard the version everywhere."""
        if self.host.all_true(success):
            return True
        try:
            name, version = check_name(name), check_version(version)
        except VelocError:
            name = version = None     # nothing was written under an invalid name
        self.host.discard(name, version)
        return False

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
                            files=pending.files)
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

    def checkpoint_wait(self):
        """Block until background work of earlier checkpoints is done; raise its first error."""
        self._check_open()
        self._settle_snapshots()
        self.host.drain()

    def checkpoint_finished(self):
        """Whether background work of earlier checkpoints is done (never blocks)."""
        if not self.snapshot_finished():
            return False
        finished = getattr(self.host, "finished", None)
        return True if finished is None else finished()

    # -- lifecycle ------------------------------------------------------------------
    def finalize(self, drain=True):
        """Collective: with ``drain``, wait until every level has its copy; then release."""
        if self._closed:
            return
        try:
            self._settle_snapshots(raise_errors=drain)
            if drain:
                self.host.drain()
        finally:
            self._closed = True
            self._close_policy()
            self.mappings.close()
            self.host.close()
            self._close_snapshot()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finalize(drain=exc_type is None)
        return False

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
