"""The backend's default executor: runs batches of rank commands through the engine.

Built once per ``veloc-backend`` process (``factory(config, node, logger)``) and called
by the work queue's worker threads; every batch carries ``order = "engine"``, so the
engine is only ever used by one thread at a time, in arrival order.

In a backend world (:mod:`veloc_backend.world`: the backends of a job launched as one
MPI job) every batch first waits for its turn: ``full`` means every node runs this same
batch next, collective modules (partner, erasure) included; ``local`` means this node
runs it without them (the version was not submitted on every node in time, its job
does not span the world, or the world is broken), which is logged. A backend outside
any world (started by a rank, or ``veloc drain``) serves its node alone.

Item kinds (:class:`veloc.work_item.WorkItem`, sent by ``veloc.hosts.async_host`` on each
application rank; one batch holds the items of every local rank for the same call):

- ``CHECKPOINT`` — run the pipeline for version ``version`` of ``name``.
- ``AVAILABLE`` — ``{rank: {version: [levels]}}`` (restart_test).
- ``VERIFY`` — ``{rank: [fastest intact level or None, reasons]}``; a rank whose item
  names the level where it ``verified`` its own copy is not checked again.
- ``RESTORE`` — bring each rank's copy back to scratch from its ``level``.
- ``SUPERSEDE`` — a new run of ``name`` starts at ``threshold``: remove the node's
  copies of versions ``>= threshold`` at every level (``{level: [versions]}``).
"""
import contextlib

from veloc.storage.debris import collect_temps
from veloc.engine.module import CHECKPOINT, Command, Peers
from veloc.engine.pipeline import Engine
from veloc.errors import CheckpointError, CorruptCheckpointError
from veloc.work_item import AVAILABLE, SUPERSEDE, VERIFY

from . import world as world_mod


def backend_peers():
    """The engine's peers: the backend world's (when this backend is a member), else
    ``Peers(None)``: a backend started by a rank serves its node alone."""
    world = world_mod.current()
    return world.engine_peers() if world is not None else Peers(None)


class EngineExecutor:
    """``run(batch) -> dict`` over one :class:`~veloc.engine.pipeline.Engine`."""

    def __init__(self, config, node, logger):
        self.node, self.log = node, logger
        self.world = world_mod.current()
        self.peers = backend_peers()
        self.engine = Engine(config, node, self.peers, logger)
        self.collective = [m.name for m in self.engine.modules if m.enabled and m.collective]
        self._told = set()
        logger.info("engine modules: %s", ", ".join(f"{n}({p})" for n, p in self.engine.describe()))

    def close(self):
        """The backend stops (its work queue stopped): release the engine's kept mappings."""
        self.engine.close()

    def run(self, batch):
        first = batch.items[0]
        kind, name = first.kind, first.name
        if any(it.kind != kind or it.name != name for it in batch.items):
            raise ValueError(f"batch {batch.group} mixes kinds or names")
        if self.world is None:
            return self._execute(batch, kind, name)
        mode, reason = self._turn(batch, first)
        if mode == "local":
            self._tell(batch, kind, name, reason)
        with self.world.running(full=mode == "full"):
            if mode == "local":
                with self._alone():
                    return self._execute(batch, kind, name)
            try:
                return self._execute(batch, kind, name)
            except Exception as exc:
                broken = self.peers.broken or self.world.broken
                if broken is None:
                    raise
                self.world.declare_broken(self.peers.broken or str(exc))
                return self._after_break(batch, kind, name, exc)

    def item_bytes(self, item):
        """Bytes of the committed scratch copy a CHECKPOINT item hands over (drain
        progress, ``veloc_backend.workqueue``); 0 for other kinds."""
        if item.kind != CHECKPOINT:
            return 0
        manifest = self.engine.ctx.scratch(item.rank).read_manifest(item.name, item.version, item.rank)
        return sum(int(f.size) for f in manifest.files) if manifest is not None else 0

    # ------------------------------------------------------------ world
    def _turn(self, batch, first):
        """``(mode, reason)`` for this batch; waits for the coordinator when needed."""
        job_nodes = first.job_nodes
        if job_nodes is not None and sorted(job_nodes) != sorted(self.world.nodes):
            return "local", (f"its job runs on node(s) {', '.join(sorted(job_nodes))}, not on the "
                             f"backend world's nodes ({', '.join(self.world.nodes)})")
        if job_nodes is None and len(first.local_ranks) == first.nranks:
            return "local", "its job runs on this node only"
        return self.world.turn(batch.group, batch.complete)

    def _tell(self, batch, kind, name, reason):
        """Log why a batch runs without the collective modules (once per job and reason
        for queries, every time for a checkpoint that loses its collective levels)."""
        if not reason:
            return
        first = batch.items[0]
        if kind == CHECKPOINT and self.collective:
            self.log.warning("%s v%s: collective levels (%s) skipped on node %s: %s", name,
                             first.version, ", ".join(self.collective), self.node, reason)
            return
        key = (first.session, reason)
        if key not in self._told:
            self._told.add(key)
            self.log.info("%s: %s runs on node %s alone: %s", name, kind, self.node, reason)

    @contextlib.contextmanager
    def _alone(self):
        """Run the engine without its peers: collective modules see one node and skip."""
        ctx = self.engine.ctx
        saved, ctx.peers = ctx.peers, Peers(None)
        quiet = [m for m in self.engine.modules if m.collective and hasattr(m, "_warned_alone")]
        flags = [(m, m._warned_alone) for m in quiet]
        for m in quiet:                # their "only one node" warning would mislead here
            m._warned_alone = True
        try:
            yield
        finally:
            ctx.peers = saved
            for m, flag in flags:
                m._warned_alone = flag

    def _after_break(self, batch, kind, name, exc):
        """The world broke while this batch ran with its peers: run it again alone, so
        its local levels are done, and report the lost collective levels."""
        first = batch.items[0]
        self.log.error("%s %s v%s: interrupted when the backend world broke (%s); running it "
                       "again on node %s alone", name, kind, first.version, exc, self.node)
        with self._alone():
            info = self._execute(batch, kind, name)
        if kind != CHECKPOINT:
            return info
        error = CheckpointError(
            f"node {self.node}: collective levels ({', '.join(self.collective) or 'none'}) of "
            f"{name} v{first.version} failed: the backend world broke ({self.world.broken}); "
            "its local levels are done")
        error.veloc_info = {"node": self.node, "module": ",".join(self.collective)}
        raise error

    # ------------------------------------------------------------ engine
    def _execute(self, batch, kind, name):
        first = batch.items[0]
        ranks = sorted({it.rank for it in batch.items})
        version = first.version
        info = {"node": self.node, "name": name}
        if version is not None:
            info["version"] = version
        if kind == CHECKPOINT:
            if not batch.complete:
                ranks = self._committed_ranks(first, ranks)
            if any(it.replayed for it in batch.items):
                self._drop_stale_temps(name, version, ranks)
            info["timings"] = self._checkpoint(Command(CHECKPOINT, name, version, ranks, first.nranks))
        elif kind == AVAILABLE:
            info["value"] = self.engine.available(name, ranks, first.max_version)
        elif kind == SUPERSEDE:
            info["value"] = self.engine.supersede(name, first.threshold, ranks)
        elif kind == VERIFY:
            # ranks that checked their own copy just now (in parallel) are not checked again
            known = {it.rank: it.verified for it in batch.items if it.verified}
            pending = [r for r in ranks if r not in known]
            table = self.engine.verify(name, version, pending, first.nranks)   # always: may be collective
            table.update({r: (level, []) for r, level in known.items()})
            info["value"] = {r: list(v) for r, v in table.items()}
        else:
            plan = {it.rank: it.level for it in batch.items}
            self.engine.restore(name, version, plan)
        return info

    def _checkpoint(self, cmd):
        before = set(self.engine.timings)          # capped list: compare entries, not length
        self.engine.checkpoint(cmd)
        return {module: round(sec, 6) for n, v, module, sec in self.engine.timings
                if n == cmd.name and v == cmd.version and (n, v, module, sec) not in before}

    def _drop_stale_temps(self, name, version, ranks):
        """A version resumed from the journal: the backend that died running it may have
        left temporary files of an interrupted copy in the persistent folder (never
        committed, but taking space). Only this node's ranks' files are touched: other
        nodes' backends write next to them."""
        removed = 0
        for rank in ranks:
            store = self.engine.ctx.persistent(rank)
            if store is not None:      # only dead writers' files (veloc.storage.debris)
                removed += collect_temps(store.version_dir(name, version), f"r{int(rank)}.").files
        if removed:
            self.log.info("%s v%d: removed %d temporary file(s) of an interrupted copy in the "
                          "persistent folder", name, version, removed)

    def _committed_ranks(self, item, ranks):
        """For a version whose commands did not all arrive (their ranks died after
        committing), every local rank of that job whose scratch copy is committed."""
        out = set(ranks)
        for rank in item.local_ranks:
            try:
                if self.engine.ctx.scratch(rank).read_manifest(item.name, item.version, rank) is not None:
                    out.add(rank)
            except (OSError, CorruptCheckpointError):
                pass
        return sorted(out)
