"""The engine: builds the node's modules from the config and runs commands through them.

One ``Engine`` per node, hosted by the sync-mode leader rank or by the active backend.
CHECKPOINT runs enabled modules in ascending priority; RESTART brings each rank's files
back to scratch from the level chosen for it (levels visited fastest first, i.e. the
pipeline in reverse); availability and verification answer ``restart_test``. Every
engine of a job must call the same methods in the same order, because collective
modules communicate with the other nodes' engines.
"""
import time

from veloc.errors import CheckpointError, RestartError, VelocError
from veloc.storage.debris import collect_engine
from veloc.storage.hashing import MappedFiles
from veloc.storage.levels import LEVEL_ORDER, RECYCLE_KEEP
from veloc.engine.module import CHECKPOINT, EngineContext, LevelUnreachable, helper_cpu_seconds
from veloc.engine.modules.checksum import ChecksumModule
from veloc.engine.modules.compress import CompressModule
from veloc.engine.modules.erasure import ErasureModule
from veloc.engine.modules.flush import FlushModule
from veloc.engine.modules.partner import PartnerModule
from veloc.engine.modules.scratch import ScratchLevel
from veloc.engine.modules.versioning import VersioningModule

MODULE_CLASSES = [ScratchLevel, ChecksumModule, CompressModule, PartnerModule, ErasureModule, FlushModule, VersioningModule]


def register_module(cls):
    """Add a module class to every engine built afterwards (used by optional modules)."""
    if cls not in MODULE_CLASSES:
        MODULE_CLASSES.append(cls)
    return cls


def kept_mapping_runs(config):
    """For how many pipeline runs a mapping of a scratch file is kept for reuse: long
    enough to meet the file again once the rotation (``scratch_versions`` kept, the recycle
    pool, the one being written) brings it back, for two checkpoint names taking turns;
    0 when scratch files are never recycled (``scratch_versions = 0``)."""
    versions = int(getattr(config, "scratch_versions", 0) or 0)
    return 2 * (versions + RECYCLE_KEEP + 1) if versions > 0 else 0


class Engine:
    """The module pipeline of one node."""

    def __init__(self, config, node, peers=None, logger=None):
        self.ctx = EngineContext(config, node, peers, logger)
        self.modules = sorted((cls(self.ctx) for cls in MODULE_CLASSES), key=lambda m: m.priority)
        self.levels = sorted((m for m in self.modules if m.level and m.enabled),
                             key=lambda m: LEVEL_ORDER.index(m.level))
        self.timings = []   # (name, version, module, seconds) of recent checkpoints
        self.mapped = MappedFiles(keep_runs=kept_mapping_runs(config))

    @property
    def log(self):
        return self.ctx.log

    def describe(self):
        """Enabled modules in pipeline order, for logs and ``veloc status``."""
        return [(m.name, m.priority) for m in self.modules if m.enabled]

    def checkpoint(self, cmd):
        """Run CHECKPOINT for the node's ranks; raises CheckpointError naming node, module, version.

        After a local failure the remaining local modules are skipped, but the node still
        meets the others before every collective module, where all nodes learn of any
        failure and raise together instead of waiting for each other.
        """
        assert cmd.kind == CHECKPOINT
        cmd.mapped = self.mapped
        try:
            self._run_checkpoint(cmd)
        finally:
            self.mapped.end_run()
            cmd.mapped = None

    def close(self):
        """Release what the engine keeps between runs (its mappings of scratch files); the
        sync leader calls it at finalize, the backend when it stops."""
        self.mapped.close()

    def _run_checkpoint(self, cmd):
        error = None
        unreachable = []      # configured levels this version cannot reach (the others still run)
        for module in self.modules:
            if not module.enabled:
                continue
            if module.collective:
                failures = [e for e in self.ctx.peers.allgather(error) if e]
                if failures:
                    raise CheckpointError(error or f"node {self.ctx.node}: {cmd.name} v{cmd.version} "
                                          f"stopped before {module.name}: {failures[0]}")
            if error is not None:
                continue
            if unreachable and module.collects_old_versions:
                # the new version is less protected than configured: keep the older ones
                self.log.warning("%s v%d: %s skipped: the version did not reach every configured level, "
                                 "so older versions are kept", cmd.name, cmd.version, module.name)
                continue
            start, cpu_start = time.perf_counter(), time.thread_time() + helper_cpu_seconds()
            try:
                did = module.checkpoint(cmd)
            except LevelUnreachable as exc:
                unreachable.append(str(exc))
                self.log.error("%s", exc)
                continue
            except (VelocError, OSError) as exc:
                error = f"node {self.ctx.node}: module {module.name} failed on {cmd.name} v{cmd.version}: {exc}"
                self.log.error("%s", error)
                continue
            elapsed = time.perf_counter() - start
            cpu = time.thread_time() + helper_cpu_seconds() - cpu_start
            if did:
                self.timings = (self.timings + [(cmd.name, cmd.version, module.name, elapsed)])[-256:]
                self.log.info("%s v%d: %s done in %.3f s (%.3f s CPU)", cmd.name, cmd.version, module.name,
                              elapsed, cpu)
        if error is not None:
            raise CheckpointError(error)
        if unreachable:
            raise CheckpointError("; ".join(unreachable))

    def supersede(self, name, threshold, ranks):
        """A new run of ``name`` starts at ``threshold``: remove this node's copies of every
        version ``>= threshold`` at every level, so a copy left by an earlier run can
        neither be taken for the new run's newer state nor make versioning delete the new
        run's versions. Returns ``{level: [versions removed]}`` (logged at WARNING)."""
        removed = {}
        for module in self.levels:
            versions = sorted(module.supersede(name, threshold, ranks))
            if versions:
                removed[module.level] = versions
        if removed:
            self.log.warning("%s: a new run starts at v%d; removed the earlier run's versions >= v%d on node "
                             "%s: %s", name, threshold, threshold, self.ctx.node,
                             ", ".join(f"{lvl} {_span(v)}" for lvl, v in removed.items()))
        return removed

    def available(self, name, ranks, max_version=None):
        """``{rank: {version: [levels, fastest first]}}`` from manifests only (no data read)."""
        out = {rank: {} for rank in ranks}
        collect_engine(self.ctx, name, ranks, logger=self.log)    # crash debris, at restart
        for module in self.levels:
            for rank, versions in module.available(name, ranks).items():
                for v in versions:
                    if max_version is None or v <= max_version:
                        out[rank].setdefault(v, []).append(module.level)
        return out

    def verify(self, name, version, ranks, nranks=None):
        """``{rank: (level or None, reasons)}``: the fastest level holding an intact copy.

        ``nranks``: the size of the restarting job; copies written by a job of another
        size are not restorable (their regions would not match the ranks' arrays).
        """
        self.ctx.nranks = nranks
        result = {rank: (None, []) for rank in ranks}
        for module in self.levels:
            pending = [r for r in ranks if result[r][0] is None]
            for rank, reason in module.verify(name, version, pending).items():
                if reason is None:
                    result[rank] = (module.level, result[rank][1])
                else:
                    result[rank][1].append(reason)
        return result

    def restore(self, name, version, plan):
        """Bring each rank's copy to scratch from ``plan[rank]`` (a level name)."""
        for module in self.levels:
            ranks = [r for r, level in plan.items() if level == module.level]
            try:
                module.restore(name, version, ranks)
            except VelocError as exc:
                raise RestartError(f"node {self.ctx.node}: restoring {name} v{version} from "
                                   f"{module.level} failed: {exc}") from exc


def _span(versions):
    """``v3`` or ``v3..v9 (4 versions)`` for a log line."""
    if len(versions) == 1:
        return f"v{versions[0]}"
    return f"v{versions[0]}..v{versions[-1]} ({len(versions)} versions)"
