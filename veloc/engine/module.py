"""Commands, the engine context, and the module base class.

One engine runs per node: inside the application on the node's leader rank (sync mode)
or in the active backend (async mode). Modules never know which. A module handles a
command for one checkpoint version on behalf of all the node's local ranks at once, so
collective modules (partner, erasure) can act once per node per version.
"""
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from veloc.errors import BackendError, CheckpointError
from veloc.storage.levels import LevelStore, RecyclePool

CHECKPOINT, RESTART, TEST = "CHECKPOINT", "RESTART", "TEST"


class LevelUnreachable(CheckpointError):
    """A configured level cannot be written for a version (e.g. a collective level with
    no other node's engine connected). The engine still runs the other modules, then
    reports the version as failed at that level: a configured level is a promise."""

_helpers = threading.local()   # CPU seconds of for_each_rank helper threads, per caller thread


def helper_cpu_seconds():
    """CPU seconds the calling thread's :meth:`Module.for_each_rank` helpers used so far
    (the engine adds them to a module's own thread CPU time in its timing log)."""
    return getattr(_helpers, "seconds", 0.0)


@dataclass
class Command:
    """A request for version ``version`` of ``name`` from the node's ranks ``ranks``."""
    kind: str
    name: str
    version: int
    ranks: list
    nranks: int
    plan: dict = field(default_factory=dict)   # RESTART: {rank: level to restore from}
    # CHECKPOINT: ranks whose scratch digests this pipeline run has just computed (checksum
    # module), so later modules of the same run copy those files without hashing them again
    fresh_digests: set = field(default_factory=set)
    mapped: object = None    # CHECKPOINT: hashing.MappedFiles of this run, set by the engine


class Peers:
    """The engines of all nodes of a job (a communicator of node leaders or backends).

    ``comm`` is an mpi4py communicator with one process per node, or ``None`` for a
    single node. Decisions that nodes must share go through :meth:`agree`.

    ``timeout`` (seconds, ``None`` = forever) bounds each wait for the other nodes at
    :meth:`quiet_sync`; ``abort`` is a callable returning a reason to stop waiting at
    once (or ``None``), e.g. the active backend's "the backend world is broken". After
    a timeout or an abort the communicator holds an unfinished barrier, so this object
    is *broken*: every later collective raises :class:`~veloc.errors.BackendError` at
    once instead of mismatching the other nodes.
    """

    def __init__(self, comm=None, timeout=None, abort=None):
        self.comm = comm
        self.timeout = timeout
        self.abort = abort
        self.broken = None       # why the peers cannot be used any more

    @property
    def size(self):
        return 1 if self.comm is None else self.comm.Get_size()

    @property
    def index(self):
        return 0 if self.comm is None else self.comm.Get_rank()

    def quiet_sync(self, poll=0.002, timeout=None):
        """Wait for every node at a non-blocking barrier, sleeping between polls.

        Blocking MPI collectives spin a core while they wait; a backend waiting for a slow
        node must not steal the application's CPU, so collectives are preceded by this.
        Raises ``BackendError`` after ``timeout`` (default: the object's) or on abort.
        """
        if self.comm is None:
            return
        if self.broken:
            raise BackendError(self.broken)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        request = self.comm.Ibarrier()
        while not request.Test():
            reason = self.abort() if self.abort is not None else None
            if reason is None and deadline is not None and time.monotonic() >= deadline:
                reason = (f"the other nodes' engines did not reach the same step within "
                          f"{timeout:g} s (a node is hung, dead or out of step)")
            if reason:
                self.broken = f"engine {self.index} of {self.size} gave up waiting for the other nodes: {reason}"
                raise BackendError(self.broken)
            time.sleep(poll)

    def agree(self, value):
        """Every node gets node 0's ``value``."""
        if self.comm is None:
            return value
        self.quiet_sync()
        return self.comm.bcast(value, root=0)

    def allgather(self, value):
        if self.comm is None:
            return [value]
        self.quiet_sync()
        return self.comm.allgather(value)


class EngineContext:
    """What modules may use: config, node identity, level stores, peers, a logger."""

    def __init__(self, config, node, peers=None, logger=None):
        self.config = config
        self.node = node
        self.peers = peers or Peers()
        self.log = logger or logging.getLogger("veloc.engine")
        self.nranks = None    # size of the job being verified for restart, when known

    def scratch(self, rank):
        return LevelStore("scratch", self.config.scratch_dir(self.node, rank))

    def pool(self, rank):
        return RecyclePool(self.config.scratch_dir(self.node, rank))

    def persistent(self, rank):
        root = self.config.persistent_dir(self.node, rank)
        return None if root is None else LevelStore("persistent", root)


class Module:
    """Base of every pipeline module.

    Subclasses set ``name`` (also their config section) and ``config_keys``, the keys of
    that section (``veloc.config_keys.module_keys(default priority, **extra keys)``;
    ``None``: no section), and override the handlers they need. A handler returns ``True`` (done) or ``False``
    (not my business), or raises. Level modules also set ``level`` and implement
    :meth:`available`, :meth:`verify` and :meth:`restore`.
    """
    name = "module"
    config_keys = None
    level = None
    collective = False    # True: its handlers communicate with the other nodes' engines
    collects_old_versions = False   # True: garbage collection, skipped for a version that missed a level

    @classmethod
    def check_config(cls, section, top, source):
        """Cross-key checks of this module's typed ``section`` (and the typed top-level keys
        ``top``) when a configuration is loaded; raise ConfigError."""

    def __init__(self, ctx):
        self.ctx = ctx
        section = ctx.config.section(self.name) if self.name in ctx.config.sections else {}
        self.section = section
        self.priority = section.get("priority", 0)
        self.every = section.get("every", 1)
        enabled = section.get("enabled")
        self.enabled = self.default_enabled() if enabled is None else enabled
        self._seen = {}
        self._last_due = {}
        self._warned_alone = False

    def default_enabled(self):
        return True

    interval = None     # seconds between versions acted on (VELOC's *_interval keys), if any

    def due(self, cmd):
        """Whether this module acts on this version: every ``every``-th version and, with an
        ``interval``, at most once per interval (0 = every version, < 0 = never). A time
        decision is taken by node 0 and shared, so every node acts on the same versions."""
        count = self._seen.get(cmd.name, 0)
        self._seen[cmd.name] = count + 1
        if count % self.every != 0:
            return False
        if self.interval is None or self.interval <= 0:
            return self.interval is None or self.interval == 0
        now = time.monotonic()
        last = self._last_due.get(cmd.name)
        go = self.ctx.peers.agree(last is None or now - last >= self.interval)
        if go:
            self._last_due[cmd.name] = now
        return go

    def peers_connected(self):
        """Collective modules, restart side: whether other nodes' engines are there to work
        with (alone, the level is simply empty); warns once."""
        if self.ctx.peers.size > 1:
            return True
        if not self._warned_alone:
            self._warned_alone = True
            self.ctx.log.warning("%s: only one node's engine is connected; this level needs two or more "
                                 "nodes (sync mode over MPI, or backends launched as one MPI job, e.g. by "
                                 "veloc-run); the %s level stays empty", self.name, self.level)
        return False

    def require_peers(self, cmd):
        """Collective modules, checkpoint side: raise :class:`LevelUnreachable` when no other
        node's engine is connected, so the version is reported as missing this level
        instead of silently going without it."""
        if self.ctx.peers.size > 1:
            return
        raise LevelUnreachable(
            f"node {self.ctx.node}: the {self.level} level is configured ([{self.name}]) but {cmd.name} "
            f"v{cmd.version} cannot reach it: only this node's engine is connected. It needs two or "
            "more nodes: sync mode over MPI across nodes, or in async mode backends launched as one "
            f"MPI world (veloc-run); or disable [{self.name}]")

    def for_each_rank(self, ranks, work):
        """Run ``work(rank)`` for every local rank, up to ``max_parallelism`` at once, and
        return the results in rank order; after all finished, the first failure in rank
        order is raised. For the per-rank data passes (hashing, copies): their native code
        releases the GIL, and on a node whose cores all run application ranks, which wait
        for each other every iteration, spreading this work over the cores holds the
        ranks back at the same time instead of one after another."""
        ranks = list(ranks)
        workers = min(len(ranks), self.ctx.config.max_parallelism)
        if workers <= 1:
            return [work(rank) for rank in ranks]
        cpu = []

        def timed(rank):
            start = time.thread_time()
            try:
                return work(rank)
            finally:
                cpu.append(time.thread_time() - start)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"veloc-{self.name}") as pool:
            futures = [pool.submit(timed, rank) for rank in ranks]
        _helpers.seconds = helper_cpu_seconds() + sum(cpu)
        return [f.result() for f in futures]

    def checkpoint(self, cmd):
        return False

    def restart(self, cmd):
        return False

    # Level modules ---------------------------------------------------------------
    def supersede(self, name, threshold, ranks):
        """Remove this node's copies of ``name`` with versions ``>= threshold`` at this level
        (a new run of ``name`` replaces them); return the versions removed."""
        return set()

    def available(self, name, ranks):
        """``{rank: set(versions)}`` committed at this level (cheap: no data read)."""
        return {}

    def verify(self, name, version, ranks):
        """``{rank: None if intact else reason}`` for this level's copies."""
        return {rank: f"no {self.level} level" for rank in ranks}

    def restore(self, name, version, ranks):
        """Bring the ranks' copies from this level back to scratch, verified; ``False``
        if this module holds no level."""
        return False
