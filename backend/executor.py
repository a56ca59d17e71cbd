"""The backend's default executor: runs batches of rank commands through the engine.

Built once per ``veloc-backend`` process (``factory(config, node, logger)``) and called
by the work queue's worker threads; every batch carries ``order = "engine"``, so the
engine is only ever used by one thread at a time, in arrival order — the same order on
every node, which collective modules rely on.

Item kinds (sent by ``veloc.async_host`` on each application rank; one batch holds the
items of every local rank for the same call):

- ``CHECKPOINT`` — run the pipeline for version ``version`` of ``name``.
- ``AVAILABLE`` — ``{rank: {version: [levels]}}`` (restart_test).
- ``VERIFY`` — ``{rank: [fastest intact level or None, reasons]}``.
- ``RESTORE`` — bring each rank's copy back to scratch from its ``level``.
"""
import os

from veloc.engine.module import CHECKPOINT, Command, Peers
from veloc.engine.pipeline import Engine
from veloc.errors import CorruptCheckpointError

KINDS = (CHECKPOINT, "AVAILABLE", "VERIFY", "RESTORE")
_MPI_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


def backend_peers():
    """The backends' own MPI world when started under ``mpiexec`` (one per node), else
    ``Peers(None)``: a backend started by a rank serves its node alone."""
    if not any(k in os.environ for k in _MPI_MARKERS):
        return Peers(None)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return Peers(comm if comm.Get_size() > 1 else None)


class EngineExecutor:
    """``run(batch) -> dict`` over one :class:`~veloc.engine.pipeline.Engine`."""

    def __init__(self, config, node, logger):
        self.node = node
        self.engine = Engine(config, node, backend_peers(), logger)
        logger.info("engine modules: %s", ", ".join(f"{n}({p})" for n, p in self.engine.describe()))

    def run(self, batch):
        first = batch.items[0]
        kind, name = first.get("kind"), first.get("name")
        if kind not in KINDS or not isinstance(name, str):
            raise ValueError(f"work item of unknown kind {kind!r} (name {name!r}); "
                             f"known: {', '.join(KINDS)}")
        if any(it.get("kind") != kind or it.get("name") != name for it in batch.items):
            raise ValueError(f"batch {batch.group} mixes kinds or names")
        ranks = sorted({int(it["rank"]) for it in batch.items})
        version = first.get("version")
        info = {"node": self.node, "name": name}
        if version is not None:
            info["version"] = int(version)
        if kind == CHECKPOINT:
            if not batch.complete:
                ranks = self._committed_ranks(first, ranks)
            info["timings"] = self._checkpoint(Command(CHECKPOINT, name, int(version), ranks,
                                                       int(first["nranks"])))
        elif kind == "AVAILABLE":
            info["value"] = self.engine.available(name, ranks, first.get("max_version"))
        elif kind == "VERIFY":
            table = self.engine.verify(name, int(version), ranks, first.get("nranks"))
            info["value"] = {r: list(v) for r, v in table.items()}
        else:
            plan = {int(it["rank"]): it["level"] for it in batch.items}
            self.engine.restore(name, int(version), plan)
        return info

    def _checkpoint(self, cmd):
        before = set(self.engine.timings)          # capped list: compare entries, not length
        self.engine.checkpoint(cmd)
        return {module: round(sec, 6) for n, v, module, sec in self.engine.timings
                if n == cmd.name and v == cmd.version and (n, v, module, sec) not in before}

    def _committed_ranks(self, item, ranks):
        """For a version whose commands did not all arrive (their ranks died after
        committing), every local rank of that job whose scratch copy is committed."""
        out = set(ranks)
        for rank in item.get("local_ranks") or ():
            try:
                if self.engine.ctx.scratch(rank).read_manifest(item["name"], int(item["version"]),
                                                               rank) is not None:
                    out.add(int(rank))
            except (OSError, CorruptCheckpointError):
                pass
        return sorted(out)
