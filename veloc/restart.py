"""Restart side of the client: agree on the newest consistent version, then restore it.

Mixed into :class:`veloc.client.Client`; every method runs on each application rank and
``restart_test``/``restart_begin`` are collective over the client's communicator.
Unlike VELOC, which takes the maximum version over ranks and then fails if one rank
lacks it, ``restart_test`` agrees on the newest version that *every* rank can restore
from *some* level after verifying it, falling back to older versions.
"""
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from veloc.storage.formats import open_rank_file
from veloc.storage.hashing import digest_file
from veloc.storage.levels import LEVEL_ORDER, LevelStore
from veloc.storage.manifest import unchanged_since_hashed, verify_files
from veloc.storage.rankfile import DISK_READ_PIECE, RankFile
from veloc.errors import CorruptCheckpointError, RestartError, VelocError
from veloc.names import check_name, check_version
from veloc.restart_reshape import ReshapeMixin

log = logging.getLogger("veloc.restart")
_INTERSECT = []


def _intersect_op():
    """Set intersection as an MPI reduction over pickled frozensets (lowercase
    ``allreduce``); made on first use, so importing veloc does not start MPI."""
    from mpi4py import MPI
    if not _INTERSECT:
        _INTERSECT.append(MPI.Op.Create(lambda a, b, *unused: a & b, commute=True))
    return _INTERSECT[0]
REGION_FILE_KINDS = ("regions", "compressed")   # a raw rank file, or its compressed form (read in place)


@dataclass(frozen=True)
class RestartInfo:
    """Where this rank's data came from: checkpoint ``name``, ``version``, ``level``."""
    name: str
    version: int
    level: str


class _Restoring:
    """The version a rank has open between ``restart_begin`` and ``restart_end``.
    ``expected``: ``(algorithm, digest)`` of a rank file not checked yet, verified by the
    read itself (one pass: every byte hashed as it lands in the protected arrays)."""

    def __init__(self, name, version, level, manifest, rankfile, expected=None):
        self.name, self.version, self.level = name, version, level
        self.manifest, self.rankfile, self.expected = manifest, rankfile, expected


class CorruptOnReadError(CorruptCheckpointError):
    """A copy whose digest did not match while it was read into the protected arrays
    (they hold unverified bytes until a restart from an intact copy refills them)."""


class RestartMixin(ReshapeMixin):
    """``restart_test``, ``restart`` and the restart phases.

    By default ``restart_test`` hashes a rank's own copy only when the file changed since
    its digest was computed (a write, truncation or replacement changes its recorded
    fingerprint); an untouched copy is read and hashed in one pass by ``restart``.

    ``verify_on_read`` (default False): when True, ``restart_test`` checks a rank's own
    scratch or persistent copy for everything but its digest (sizes, header, job size)
    and ``restart`` checks the digest while it reads the copy into the protected arrays:
    one pass over the data instead of two. A copy found corrupt then is replaced by the
    same version's next intact copy; where none is left, ``restart`` raises RestartError
    naming the newest version every rank can restore (the arrays then hold unverified
    data until it is restored)."""

    verify_on_read = False

    def restart_test(self, name: str, max_version: Optional[int] = None) -> Optional[int]:
        """Every rank, collective: the newest version ``<= max_version`` (no bound: ``None``)
        of ``name`` that every rank can restore from some level after verifying it, or
        ``None``. A corrupt or missing copy falls back to another level or an older version.
        A newer HDF5 version written on another rank count counts too when every protected
        region is global or replicated (``veloc.restart_reshape``).
        Raises RestartError for a bad name/version or a failing engine/backend."""
        return self._restart_test(name, max_version, deep=not self.verify_on_read)

    def _restart_test(self, name, max_version, deep):
        self._check_open()
        self.writer.hold()        # no scratch file is prepared while a restart reads
        name = check_name(name, error=RestartError)
        if max_version is not None:
            max_version = check_version(max_version, error=RestartError)
        mine = self.host.available(name, max_version)
        # a reduction, not an allgather: O(versions) bytes per rank whatever the job size
        common = self.comm.allreduce(frozenset(mine), op=_intersect_op())
        if not common and not self.host.all_true(not mine):     # some rank holds a version
            newest = self.comm.gather(max(mine) if mine else None, root=0)    # diagnostics only
            if self.comm.Get_rank() == 0:
                lacking = [r for r, v in enumerate(newest) if v is None]
                log.warning("%s: no version is held by every rank (ranks holding none: %s; newest per rank: %s)",
                            name, lacking[:16] or "none", newest[:16])
        self._plans = {}
        for version in sorted(common, reverse=True):
            own, manifest, hashed = self._verify_own(name, version, mine[version], deep=deep)
            level, reasons = self.host.verify(name, version, own)
            if self.host.all_true(level is not None):
                store = self._level_store(level)
                manifest = manifest if own == level else None
                self._plans[(name, version)] = (level, self._copy_stamp(store, name, version, manifest), manifest,
                                                hashed or own != level)
                return self._reshape_newest(name, max_version, version) or version
            if level is None:
                log.warning("rank %d: %s v%d not restorable here (%s); trying an older version",
                            self.rank, name, version, "; ".join(reasons))
        found = self._reshape_newest(name, max_version, None)
        if found is None:
            self.writer.release()
        return found

    def restart(self, name: str, version: int) -> None:
        """``restart_begin`` + ``recover_mem`` + ``restart_end``; every rank, collective.
        Afterwards ``last_restart`` says which level this rank's data came from. A copy
        found corrupt while it is read (one pass, when it was not checked before) is
        replaced by the version's next intact copy on every rank that read a bad one.
        Raises RestartError (nothing restorable, regions that do not match the checkpoint,
        no intact copy of ``version`` left: the message names the version to use)."""
        self._restart(name, version, retry=True)

    def _restart(self, name, version, retry):
        self.restart_begin(name, version)
        error = None
        try:
            self.recover_mem()
        except Exception as exc:
            error = exc if isinstance(exc, VelocError) else RestartError(
                f"rank {self.rank} on node {self.node}: restoring {name} v{version} failed: "
                f"{type(exc).__name__}: {exc}")
        failure = self.host.first_failure(None if error is None else str(error))
        self.restart_end(success=failure is None)
        if (failure is not None and retry
                and self.host.all_true(error is None or isinstance(error, CorruptOnReadError))):
            self._restart_again(name, version, failure)
            return
        if error is not None:
            raise error
        if failure is not None:
            raise RestartError(f"restart of {name!r} v{version} failed on rank {failure[0]}: {failure[1]}")

    def _restart_again(self, name, version, failure):
        """Collective, after a copy was found corrupt during the read on some rank
        (``failure``): every rank checks its copies in full again (``restart_test`` bounded
        by ``version``) and restores ``version`` from its next intact copy; raises
        RestartError naming the version that is left when ``version`` has none."""
        log.warning("rank %d: %s v%d: a copy was corrupt on read (rank %d: %s); checking every copy again",
                    self.rank, name, version, failure[0], failure[1])
        found = self._restart_test(name, version, deep=True)
        if found != version:
            self.writer.release()
            raise RestartError(f"restart of {name!r} v{version} failed: rank {failure[0]} read a corrupt copy "
                               f"({failure[1]}) and no other intact copy of v{version} exists; the newest "
                               f"version every rank can restore is now {found} (restart_test({name!r})); the "
                               "protected arrays hold unverified data until it is restored")
        self._restart(name, version, retry=False)

    def restart_begin(self, name: str, version: int) -> None:
        """Collective: open this rank's copy of ``version`` at its fastest intact level: read in
        place from scratch or (a rank file alone) from persistent; brought back to scratch
        from partner or erasure levels, and with routed files from persistent."""
        self._check_open()
        name = check_name(name, error=RestartError)
        version = check_version(version, error=RestartError)
        if self._pending is not None or self._restoring is not None:
            raise RestartError("restart_begin called while a checkpoint or restart is open")
        self.checkpoint_wait()
        level, stamp, planned, planned_checked = getattr(self, "_plans", {}).get((name, version),
                                                                                 (None, None, None, True))
        if level is None and (name, version) in getattr(self, "_reshape_plans", {}):
            reader = self._reshape_open(name, version, self._reshape_plans[(name, version)])
            self._restoring = _Restoring(name, version, "persistent", None, reader)
            return
        reasons = []
        verified_now, own, hashed = level is None, None, False
        if verified_now:
            # this rank checks its scratch copy but for the digest, which the read checks
            own, planned, hashed = self._verify_own(name, version, ("scratch",), deep=False)
            level, reasons = self.host.verify(name, version, own)
        failure = self.host.first_failure(None if level is not None else
                                          ("; ".join(reasons) or "no intact copy at any level"))
        if failure is not None:
            reader, why = self._reshape_fallback(name, version)   # written on another rank count?
            if reader is not None:
                self._restoring = _Restoring(name, version, "persistent", None, reader)
                return
            rank, detail = failure
            raise RestartError(f"cannot restart {name!r} v{version}: rank {rank} cannot restore it: {detail}"
                               + (f"; on this job's rank count: {why}" if why else "")
                               + f". Use restart_test({name!r}) to find a version every rank can restore")
        store = self._level_store(level)
        in_place = level == "persistent" and self._regions_only(store, name, version, planned)
        # A rank reading its copy where it is (scratch, or a persistent copy in place) asks
        # for nothing: bringing a persistent copy back to scratch first would allocate
        # fresh tmpfs pages, the slowest step of a restart (the next checkpoint refills
        # scratch anyway). The engine is asked only when some rank needs a copy brought
        # back; then every rank takes part (collective in sync mode, partner and erasure
        # restores are collective between the nodes).
        bring = None if in_place else level
        if not self.host.all_true(bring in (None, "scratch")):
            self.host.restore(name, version, bring)     # every node's engine takes part
        if in_place:
            log.info("rank %d: reading %s v%d in place from %s", self.rank, name, version, store.root)
        else:
            store = self.scratch
        # Check the file's digest while reading it unless its digests were just checked:
        # by the engine's verify above, by restart_test with the copy unchanged since, or
        # by the restore from persistent, which verifies every byte it copies. (Partner
        # and erasure restores arrive over MPI and are checked on read, end to end.)
        if level == "scratch" or in_place:
            unchanged = stamp is not None and stamp == self._copy_stamp(store, name, version, planned)
            checked = (verified_now and (own is None or hashed)) or (unchanged and planned_checked)
            planned = planned if unchanged or own is not None else None
        else:
            checked, planned = level == "persistent", None
        manifest = rankfile = error = None
        expected = None
        try:
            manifest, rankfile, expected = self._open_restored(store, name, version, not checked, planned)
        except VelocError as exc:
            error = RestartError(f"rank {self.rank}: cannot open {name} v{version}: {exc}")
        failure = self.host.first_failure(None if error is None else str(error))
        if failure is not None:
            if rankfile is not None:
                rankfile.close()
            raise error or RestartError(f"restart of {name!r} v{version} failed on rank {failure[0]}: {failure[1]}")
        self._restoring = _Restoring(name, version, level, manifest, rankfile, expected)

    def _verify_own(self, name, version, levels, deep=True):
        """This rank's fastest level holding an intact copy of ``version`` among ``levels``
        that the rank reads itself (scratch, then persistent), checked here and now, so
        that every rank hashes its own copy at the same time; ``None`` when the fastest
        listed level is one only the node's engine can check (partner, erasure) or no
        copy here is intact (the engine then checks every level and says why).
        Returns ``(level, its manifest, whether its digests were checked)``, the manifest
        read once. ``deep=False``: all but the rank file's digest (sizes, header, job size),
        which the read then checks. ``deep=True`` hashes a rank file only when it changed
        since the checksum module hashed it (its recorded fingerprint: device, inode,
        size, mtime, ctime): an untouched file's digest is checked by the read, in the
        same pass, and a mismatch there falls back to the version's next intact copy."""
        for level in LEVEL_ORDER:
            if level not in levels:
                continue
            store = self._level_store(level)
            if store is None:
                return None, None, False
            try:
                manifest = store.read_manifest(name, version, self.rank)
                if manifest is None:
                    reason = f"no copy of {name} v{version} rank {self.rank} at {level} ({store.root})"
                elif manifest.nranks != self.size:
                    reason = (f"{name} v{version} at {level} was written by a job of {manifest.nranks} ranks, "
                              f"this job has {self.size}")
                else:
                    # routed files are handed over by path, never read by restart: hashed here
                    vdir = store.version_dir(name, version)
                    whole = (deep and not unchanged_since_hashed(manifest, vdir)) \
                        or any(f.kind != "regions" for f in manifest.files)
                    verify_files(manifest, vdir, deep=whole)
                    return level, manifest, whole
            except CorruptCheckpointError as exc:
                reason = str(exc)
            log.info("rank %d: %s v%d at %s: %s", self.rank, name, version, level, reason)
        return None, None, False

    def _level_store(self, level):
        """This rank's store at ``level`` where the rank itself can read it (scratch and
        persistent), else ``None`` (partner and erasure copies live on other nodes)."""
        if level == "scratch":
            return self.scratch
        if level == "persistent":
            root = self.config.persistent_dir(self.node, self.rank)
            return None if root is None else LevelStore("persistent", root)
        return None

    def _regions_only(self, store, name, version, manifest=None):
        """Whether this rank's copy at ``store`` is a rank file alone (no routed files,
        which are handed to the application by path and so must come back to scratch);
        ``manifest``: the copy's manifest if already read."""
        try:
            if manifest is None or manifest.level != store.level:
                manifest = store.read_manifest(name, version, self.rank) if store is not None else None
        except CorruptCheckpointError:
            return False
        return manifest is not None and all(f.kind in REGION_FILE_KINDS for f in manifest.files)

    def _copy_stamp(self, store, name, version, manifest=None):
        """Identity of this rank's copy at ``store`` (manifest and files: inode, size,
        mtime), or ``None``: equal stamps mean nothing was rewritten in between.
        ``manifest``: the copy's manifest if already read (a rewritten manifest is a new
        file, so its stamp differs)."""
        try:
            if manifest is None:
                manifest = store.read_manifest(name, version, self.rank) if store is not None else None
        except CorruptCheckpointError:
            return None
        if manifest is None:
            return None
        vdir = store.version_dir(name, version)
        paths = [store.manifest_path(name, version, self.rank)] + [vdir / e.name for e in manifest.files]
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
        except OSError:
            return None

    def _open_restored(self, store, name, version, check_digest=True, manifest=None):
        """This rank's manifest, rank file reader and ``(algorithm, digest)`` still to check
        of ``version`` at ``store`` (scratch, after a restore, or persistent, read in place).
        ``check_digest`` False: checked moments ago. Else a native rank file is checked by
        the read itself (one pass); any other reader is hashed here first.
        ``manifest``: the copy's manifest if already read and unchanged since."""
        if manifest is None or manifest.level != store.level:
            manifest = store.read_manifest(name, version, self.rank)
        if manifest is None:
            raise CorruptCheckpointError(f"{name} v{version} vanished from {store.level}")
        entry = manifest.file("regions") or manifest.file("compressed")
        if entry is None:
            return manifest, None, None
        path = store.version_dir(name, version) / entry.name
        if not (check_digest and entry.digest and manifest.checksum):
            return manifest, open_rank_file(path, entry.kind), None
        reader = open_rank_file(path, entry.kind)
        if isinstance(reader, RankFile):
            if store.level != "scratch":
                reader.read_piece = DISK_READ_PIECE      # large reads from a disk
            return manifest, reader, (manifest.checksum, entry.digest)
        try:
            if reader.digest(manifest.checksum) != entry.digest:
                raise CorruptCheckpointError(f"{path}: {manifest.checksum} mismatch on read")
        except BaseException:
            reader.close()
            raise
        return manifest, reader, None

    def recover_size(self, region_id: Union[int, str]) -> int:
        """Size in bytes of region ``region_id`` in the version being restored; local, between
        ``restart_begin`` and ``restart_end``. Raises RestartError if it is not there."""
        info = self._region_info(region_id)
        return info.nbytes

    def recover_mem(self, ids: Optional[Iterable[Union[int, str]]] = None) -> None:
        """Restore protected regions (all, or ``ids``) in place; local. A pickled object is
        refilled in place when it is a dict, list, set, bytearray, array or has a ``__dict__``,
        else it goes into ``recovered[id]``. Everything is checked (dtypes, shapes, types)
        before anything is touched; raises RestartError otherwise."""
        state = self._require_restoring("recover_mem")
        wanted = list(self.regions) if ids is None else list(ids)
        unknown = [i for i in wanted if i not in self.regions]
        if unknown:
            raise RestartError(f"cannot recover {unknown!r}: protect them first (protected: {list(self.regions)})")
        for region_id in wanted:     # validate everything before touching anything
            self.regions[region_id].check_restorable(self._region_info(region_id), state.rankfile.path)
        if state.expected is not None:
            targets = {i: self._read_target(self.regions[i], self._region_info(i)) for i in wanted}
            if all(t is not None for t in targets.values()):
                self._read_verified(state, targets)
                return
            self._check_digest(state)       # a pickled object is unpickled from checked bytes only
        pairs = []
        for region_id in wanted:
            info, region = self._region_info(region_id), self.regions[region_id]
            pairs.append((region, info, region.load(state.rankfile, info)))
        for region, info, loaded in pairs:
            region.restore(state.rankfile, info, self.recovered, loaded)

    @staticmethod
    def _read_target(region, info):
        """Where ``region`` takes the bytes of ``info`` in a one-pass read, or ``None`` (a
        pickled object, or a region kind that reads the rank file itself)."""
        read_target = getattr(region, "read_target", None)
        return None if read_target is None else read_target(info)

    def _read_verified(self, state, targets):
        """One pass: every byte of the rank file hashed as it lands in ``targets`` (region
        id -> array); raises CorruptOnReadError on a mismatch (the targets then hold
        unverified bytes, and ``restart`` refills them from an intact copy)."""
        algorithm, digest = state.expected
        try:
            state.rankfile.read_verified(targets, algorithm, digest)
        except CorruptCheckpointError as exc:
            raise CorruptOnReadError(f"rank {self.rank}: {state.name} v{state.version} at {state.level}: "
                                     f"{exc}") from None
        state.expected = None
        for region_id, target in targets.items():
            self.regions[region_id].finish_target(target)

    def _check_digest(self, state):
        """Hash the whole rank file before anything is read from it (nothing touched yet)."""
        algorithm, digest = state.expected
        if digest_file(state.rankfile.path, algorithm) != digest:
            raise CorruptOnReadError(f"rank {self.rank}: {state.name} v{state.version} at {state.level}: "
                                     f"{state.rankfile.path}: {algorithm} checksum mismatch on read")
        state.expected = None

    def restart_end(self, success: bool = True) -> None:
        """Close the restored version; record ``last_restart`` when ``success``; local."""
        state = self._require_restoring("restart_end")
        self._restoring = None
        self.writer.release()
        if state.rankfile is not None:
            state.rankfile.close()
        if success:
            self.last_restart = RestartInfo(state.name, state.version, state.level)

    # -- helpers --------------------------------------------------------------------
    def _require_restoring(self, what):
        self._check_open()
        if self._restoring is None:
            raise RestartError(f"{what} called without restart_begin")
        return self._restoring

    def _region_info(self, region_id):
        state = self._require_restoring("recover_size")
        info = state.rankfile.region(region_id) if state.rankfile is not None else None
        if info is None:
            raise RestartError(f"region {region_id!r} is not in {state.name} v{state.version} "
                               f"of rank {self.rank}")
        return info

    def _restored_file(self, base):
        state = self._restoring
        entry = state.manifest.file("routed", original=base)
        if entry is None:
            raise RestartError(f"no routed file {base!r} in {state.name} v{state.version} of rank {self.rank}")
        return str(self.scratch.version_dir(state.name, state.version) / entry.name)
