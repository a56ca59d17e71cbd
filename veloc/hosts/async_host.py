"""Async mode: the engine runs in the node's ``veloc-backend``, not in the application.

Built by :class:`veloc.client.Client` on every rank when ``mode = async``. At init the
node's local leader rank finds the backend of this job on its node or starts one
(``veloc_backend.lifecycle.ensure_backend``), then every rank connects to it.
``checkpoint`` returns once this rank's command is journaled by the backend; the
backend gathers the commands of all local ranks of a version and runs the pipeline
in the background. ``drain`` (``checkpoint_wait``, ``finalize``) waits for this rank's
versions and raises the first background failure as :class:`BackendError` naming node,
module and version. Restart queries go through the backend too, queued behind any
unfinished checkpoint work, so a version still being flushed is seen once it is done.

Every call that reaches the backend is made by all ranks of a node in the same order
(the client's API is collective there), so the ``n``-th call of each rank lands in the
same group: ``<name>/v<version>/<KIND>/<session>-<n>`` — the same name on every node,
which is how backends launched as one MPI world (``veloc-run``) match a node's batch
with the other nodes' before running collective modules on it. Each item also names
the job's nodes (``job_nodes``): work of a job that does not span the backend world
runs on its node alone.
"""
import time
import uuid
from pathlib import Path

from mpi4py import MPI

from veloc.storage.levels import LevelStore
from veloc.engine.module import CHECKPOINT
from veloc.hosts.base import Host
from veloc.errors import BackendError, CheckpointError, RestartError, VelocError
from veloc.ipc import BackendConnection
from veloc.progress import ProgressReporter

START_TIMEOUT = 60.0      # s: find or start the node's backend
# Liveness: the backend answers every request on a connection thread of its own, also
# while its engine runs a long flush, and a "wait" returns after at most half the
# heartbeat ([backend] heartbeat_timeout) with what is still pending; so a backend that
# answers nothing for a whole heartbeat is hung, stopped or dead: BackendError.
WAIT_SHARE = 0.5          # of the heartbeat: one server-side wait
AUTO_IDLE_EXIT = 120      # s: a backend started by a rank exits when idle this long


def _lifecycle():
    """``veloc_backend.lifecycle`` (the backend package, installed with veloc)."""
    try:
        from veloc_backend import lifecycle
    except ImportError as exc:
        raise BackendError(f"async mode needs the veloc_backend package ({exc}): pip install veloc") from None
    return lifecycle


class AsyncHost(Host):
    """The backend connection of one application rank (async mode)."""

    background = True

    def __init__(self, config, comm, rank, node, logger):
        self.config, self.comm, self.rank, self.node, self.log = config, comm, rank, node, logger
        self.nranks = comm.Get_size()
        nodes = comm.allgather(node)
        self.job_nodes = sorted(set(nodes))      # a backend world runs collective work only
        self.node_comm = comm.Split(sorted(set(nodes)).index(node), comm.Get_rank())
        self.local_ranks = self.node_comm.allgather(rank)
        self.session = comm.bcast(uuid.uuid4().hex[:12] if comm.Get_rank() == 0 else None, root=0)
        self._seq = 0
        self._outstanding = []       # groups of this rank's checkpoints not yet waited for
        self.heartbeat = config.section("backend")["heartbeat_timeout"]
        self.conn = None
        self.conn = self._connect()

    # ------------------------------------------------------------ setup
    def _connect(self):
        """Collective: leader starts/finds the backend, then everyone connects; an error
        anywhere is raised on every rank (no rank is left in a collective)."""
        lifecycle = _lifecycle()
        cfg = self.config.source if Path(self.config.source).is_file() else self.config
        extra = ("--idle-exit", str(AUTO_IDLE_EXIT))
        wait = {"timeout": START_TIMEOUT, "extra_args": extra, "hung_after": self.heartbeat}
        ep, error = None, None
        leader = self.node_comm.Get_rank() == 0
        try:
            if leader:
                ep = lifecycle.ensure_backend(cfg, **wait)
        except VelocError as exc:
            error = str(exc)
        error = self.node_comm.bcast(error, root=0)
        if error is None and not leader:
            try:
                ep = lifecycle.ensure_backend(cfg, **wait)
            except VelocError as exc:
                error = str(exc)
        errors = [e for e in self.comm.allgather(error) if e]
        if errors:
            raise BackendError(f"async mode: no backend for node {self.node}: {errors[0]}")
        self.log.info("rank %d: using backend at %s", self.rank, ep.socket)
        owner = (f"node {self.node}'s veloc backend (pid {lifecycle.read_pid(ep)}, socket {ep.socket}, "
                 f"log {lifecycle.log_path(self.config, self.node, ep)})")
        return BackendConnection(ep.socket, self.heartbeat, owner=owner)

    # ------------------------------------------------------------ backend calls
    def _submit(self, kind, name, version=None, **extra):
        self._seq += 1
        group = f"{name}/v{version}/{kind}/{self.session}-{self._seq}"
        item = {"kind": kind, "name": name, "version": version, "rank": self.rank,
                "nranks": self.nranks, "local_ranks": self.local_ranks, "session": self.session,
                "group": group, "group_size": len(self.local_ranks), "order": "engine",
                "key": f"{group}/r{self.rank}", "job_nodes": self.job_nodes, **extra}
        self.conn.request({"op": "submit", "item": item})
        return group

    def _wait(self, groups, block=True):
        """``{group: result}``; with ``block`` every group is present on return."""
        results = {}
        progress = ProgressReporter(logger=self.log, where=f"node {self.node}: waiting for the backend: ") \
            if block and self.rank == self.local_ranks[0] else None      # one line per node
        while True:
            left = [g for g in groups if g not in results]
            if not left:
                return results
            slice_s = self.heartbeat * WAIT_SHARE if block else 0
            reply = self.conn.request({"op": "wait", "groups": left, "timeout": slice_s})
            results.update(reply["results"])
            lost = [g for g in reply.get("unknown", []) if g not in results]
            if lost:
                raise BackendError(f"node {self.node}: the backend has no record of {lost[0]}; "
                                   "was it restarted? see its log")
            if not block:
                return results
            if progress is not None and len(results) < len(groups):
                progress.update(reply.get("progress"))

    def _call(self, kind, name, version=None, error=RestartError, **extra):
        """Submit a query for all local ranks and return its value (blocking)."""
        group = self._submit(kind, name, version, **extra)
        result = self._wait([group])[group]
        if not result["ok"]:
            raise error(f"node {self.node}: {kind.lower()} of {name} v{version} in the "
                        f"backend failed: {result['error']}")
        return result.get("value")

    # ------------------------------------------------------------ host interface
    def checkpoint(self, name, version):
        """Hand the committed version to the backend; returns without waiting."""
        self._outstanding.append(self._submit(CHECKPOINT, name, int(version)))

    def discard(self, name, version):
        """Remove this rank's copies of a version that never reached the backend
        (``name`` is ``None`` when nothing valid was ever written)."""
        if name is None:
            return
        roots = [("scratch", self.config.scratch_dir(self.node, self.rank)),
                 ("persistent", self.config.persistent_dir(self.node, self.rank))]
        for level, root in roots:
            if root is not None:
                LevelStore(level, root).remove(name, version, self.rank, prune=False)

    def supersede(self, name, threshold):
        """Have the backend remove the node's copies of ``name`` at versions ``>= threshold``
        (queued behind unfinished work, which may still be writing such copies)."""
        return self._call("SUPERSEDE", name, error=CheckpointError, threshold=int(threshold)) or {}

    def available(self, name, max_version):
        value = self._call("AVAILABLE", name, max_version=max_version)
        mine = value.get(str(self.rank), {})
        return {int(v): levels for v, levels in mine.items()}

    def verify(self, name, version, verified=None):
        """This rank's ``(fastest intact level or None, reasons)``; ``verified``: the level
        at which this rank has just checked its copy itself (the backend skips it)."""
        level, reasons = self._call("VERIFY", name, int(version), verified=verified)[str(self.rank)]
        return level, list(reasons)

    def restore(self, name, version, level):
        """Have the backend bring this rank's copy to scratch from ``level`` (``None``:
        nothing to bring, the rank reads its copy in place)."""
        if level is not None:
            self._call("RESTORE", name, int(version), level=level)

    def drain(self, keep=0):
        """Wait for this rank's background checkpoints but the newest ``keep``; raise the
        first failure among those waited for."""
        cut = max(0, len(self._outstanding) - keep)
        groups, self._outstanding = self._outstanding[:cut], self._outstanding[cut:]
        if not groups:
            return True
        start = time.monotonic()
        results = self._wait(groups)
        failed = [results[g] for g in groups if not results[g]["ok"]]
        if failed:
            first = failed[0]
            raise BackendError(f"node {first.get('node', self.node)}: background checkpoint of "
                               f"{first.get('name')} v{first.get('version')} failed: "
                               f"{first['error']}")
        self.log.debug("rank %d: %d background checkpoint(s) done after %.3f s wait",
                       self.rank, len(groups), time.monotonic() - start)
        return True

    def finished(self):
        """Whether this rank's background checkpoints are done (never raises for them)."""
        if not self._outstanding:
            return True
        return len(self._wait(self._outstanding, block=False)) == len(self._outstanding)

    def close(self, collective=True):
        """Release the connection; with ``collective`` also the node communicator (freeing
        it is collective, so a rank leaving on an exception keeps it)."""
        if self.conn is not None:
            self.conn.close()
        if collective and self.node_comm != MPI.COMM_NULL:
            self.node_comm.Free()
