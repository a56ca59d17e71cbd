"""Sync mode: the engine runs inside the application, on one leader rank per node.

Every rank of the client's communicator calls these methods collectively. Ranks are
grouped into nodes by node identity (``VELOC_NODE_ID`` or host name, gathered over the
communicator, so virtual nodes on one machine are separate nodes); the lowest rank of
each node is its leader and hosts the node's :class:`Engine`; the leaders form the
communicator that cross-node modules use. Errors are shared, so every rank raises the
same exception and no rank is left waiting in a collective. With ``log_prefix`` the
leader's engine logs like the async backend's (each module's time per version) to
``<log_prefix>/veloc-sync-<node>.log`` (``veloc.logfile``).
"""
import traceback

from mpi4py import MPI

from veloc.engine.module import CHECKPOINT, Command, Peers
from veloc.engine.pipeline import Engine
from veloc.hosts.base import Host
from veloc.errors import CheckpointError, RestartError, VelocError
from veloc.logfile import sync_engine_logger


class SyncHost(Host):
    """The node-local engine host of one application rank (sync mode)."""

    def __init__(self, config, comm, rank, node, logger):
        self.comm = comm
        self.rank = rank
        self.node = node
        self.nranks = comm.Get_size()
        nodes = comm.allgather(node)
        color = sorted(set(nodes)).index(node)
        self.node_comm = comm.Split(color, comm.Get_rank())
        self.is_leader = self.node_comm.Get_rank() == 0
        self.leader_comm = comm.Split(0 if self.is_leader else MPI.UNDEFINED, comm.Get_rank())
        self.local_ranks = self.node_comm.allgather(rank)
        self.engine = None
        self.engine_comm = None
        if self.is_leader:
            # The engine's own communicator, so its collectives never match the host's.
            self.engine_comm = self.leader_comm.Dup() if self.leader_comm.Get_size() > 1 else None
            peers = Peers(self.engine_comm)
            engine_log = sync_engine_logger(config, node, logger)
            self.engine = Engine(config, node, peers, engine_log)
            engine_log.info("sync engine of node %s (ranks %s of %d): modules %s", node, self.local_ranks,
                            self.nranks, ", ".join(f"{n}({p})" for n, p in self.engine.describe()))

    def _on_leaders(self, action, error_cls):
        """Run ``action(engine)`` on every leader; return its result to all local ranks.

        Raises ``error_cls`` on every rank of the job if any leader failed.
        """
        result, error = None, None
        if self.is_leader:
            try:
                result = action(self.engine)
            except VelocError as exc:
                error = str(exc)
            except Exception as exc:   # a bug must not leave the other ranks waiting
                error = f"node {self.node}: internal error: {exc!r}\n{traceback.format_exc()}"
            errors = [e for e in self.leader_comm.allgather(error) if e]
            error = errors[0] if errors else None
        result, error = self.node_comm.bcast((result, error), root=0)
        if error:
            raise error_cls(error)
        return result

    def checkpoint(self, name, version):
        cmd = Command(CHECKPOINT, name, version, self.local_ranks, self.nranks)
        self._on_leaders(lambda engine: engine.checkpoint(cmd), CheckpointError)

    def discard(self, name, version):
        """Remove every local rank's copy of a version at every level (``success=False``)."""
        def drop(engine):
            if name is None:
                return
            for rank in self.local_ranks:
                for store in (engine.ctx.scratch(rank), engine.ctx.persistent(rank)):
                    if store is not None:
                        store.remove(name, version, rank, prune=False)
        self._on_leaders(drop, CheckpointError)

    def supersede(self, name, threshold):
        """Collective: remove the node's copies of ``name`` at versions ``>= threshold`` at
        every level; ``{level: [versions]}`` removed on this rank's node."""
        return self._on_leaders(lambda engine: engine.supersede(name, threshold, self.local_ranks),
                                CheckpointError)

    def available(self, name, max_version):
        """This rank's ``{version: [levels]}``."""
        table = self._on_leaders(lambda engine: engine.available(name, self.local_ranks, max_version),
                                 RestartError)
        return table[self.rank]

    def verify(self, name, version, verified=None):
        """This rank's ``(fastest intact level or None, reasons)``. ``verified``: the level
        at which this rank has just checked its copy itself (``None``: not checked); the
        leader's engine checks the other ranks only."""
        known = dict(zip(self.local_ranks, self.node_comm.allgather(verified)))
        pending = [r for r in self.local_ranks if known[r] is None]

        def check(engine):
            table = engine.verify(name, version, pending, self.nranks)   # collective modules: always
            return {r: (known[r], []) if known[r] is not None else table[r] for r in self.local_ranks}
        return self._on_leaders(check, RestartError)[self.rank]

    def restore(self, name, version, level):
        """Bring this rank's copy to scratch from ``level`` (collective; ``None``: nothing
        to bring for this rank, which reads its copy in place)."""
        plan = self.node_comm.gather((self.rank, level), root=0)
        self._on_leaders(lambda engine: engine.restore(name, version, dict(plan)), RestartError)

    def drain(self, keep=0):
        """Nothing runs in the background in sync mode."""
        return True

    def close(self, collective=True):
        """Release the host; ``collective=False`` (a rank leaving on an exception, while the
        others may be elsewhere) frees no communicator, since freeing is collective."""
        if self.engine is not None:
            self.engine.close()
        if not collective:
            return
        for comm in (self.engine_comm, self.leader_comm, self.node_comm):
            if comm is not None and comm != MPI.COMM_NULL:
                comm.Free()
