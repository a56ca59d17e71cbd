"""The backends of one job as one MPI world: who runs which engine work, and how.

Started by ``veloc-run`` (one ``mpiexec`` MPMD world, one backend per node or virtual
node) or by hand (``mpiexec -ppn 1 veloc-backend CFG``). Who calls what, in every
backend process of the world:

- :func:`handshake` (``veloc_backend.main``, main thread, once, after taking the node's
  locks): every member says whether it could start; if one could not, all exit, so a
  world is either complete or not there at all. Returns a :class:`World`, or ``None``
  when the process is not part of an MPI world of two or more backends.
- :meth:`World.turn` (the executor, on the worker thread holding the engine, before
  every batch): blocks until the world's coordinator decides how this node runs it:
  ``"full"`` (every node runs the same batch next, collective modules included) or
  ``"local"`` (collective modules are skipped, local levels still run).
- :meth:`World.running` (executor): marks the engine busy while it runs a batch.
- The main loop: :meth:`set_want_stop`, :attr:`stopped`, :attr:`shutdown_requested`;
  :meth:`close` when the process ends.

Why: collective modules (partner, erasure) and any agreed decision need every node's
engine to run the same batch in the same order, and a node whose application ranks
crashed before submitting version *v* never will. So no engine enters a collective
step on its own; a coordinator decides first.

Protocol: one coordinator thread per backend, on a private duplicate of the world
communicator, using only non-blocking point-to-point messages polled with sleeps (a
dead or hung peer never blocks a thread for good). Each round every member sends its
state (the batch waiting at the head of its engine queue, busy or not, wants to stop)
to world rank 0, which answers every member with the round's decisions:

- every node waits with the same batch at its head: ``full`` (``local`` if the batch
  is incomplete on some node: ranks of that node died before submitting it);
- otherwise, while no engine is busy (so nothing can change but the application's
  ranks submitting), the oldest waiting batch accumulates stall time; after
  ``deadline`` seconds it is decided ``local`` for every node (logged: the version
  misses its collective levels), and a node that gets it later runs it locally too;
- the world stops (every backend exits together) once every member wants to stop;
  a ``shutdown`` request on any member is passed to all.

Failures: a member that does not answer within ``peer_timeout`` seconds (hung, or
exited), or that leaves (SIGTERM), breaks the world: every member that still answers
is told, logs it as an error, and from then on runs everything ``local`` (scratch,
checksum and flush keep working) until it is restarted. An engine waiting in a
collective step is released at once (its :class:`~veloc.engine.module.Peers` aborts);
one stuck in a data transfer with a dead peer for ``peer_timeout`` more seconds makes
the backend exit (code :data:`EXIT_STUCK`; its journal keeps the work for the next).
A member killed by a signal is different: MPICH's ``mpiexec`` then kills the whole world
at once (nothing hangs; every journal keeps its node's unfinished work for ``veloc
drain`` or the next ``veloc-run``). Members end with ``MPI_Finalize``, which returns once
every member has called it (a member that stopped early waits there asleep).
"""
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict

from veloc.errors import BackendError

from .workqueue import Deferred

log = logging.getLogger("veloc.backend.world")

EXIT_WORLD_START = 5     # another member of the world could not start
EXIT_STUCK = 6           # an engine stayed stuck in a collective transfer after the world broke
START_TIMEOUT = 60.0     # s: every member must reach the handshake within this
TAG_STATE, TAG_RESULT = 7311, 7312
READY_LINE = "veloc-backend world ready"   # printed by the coordinator once all serve
FAST, BUSY, IDLE = 0.005, 0.05, 0.1   # s between rounds: a batch waits / an engine works / idle
_MPI_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")
_current = None


class WorldError(BackendError):
    """The backend world could not be formed."""


def under_mpi():
    """True if this process was started by an MPI launcher."""
    return any(k in os.environ for k in _MPI_MARKERS)


def current():
    """The :class:`World` of this process, or ``None`` (set by ``veloc_backend.main``)."""
    return _current


def _poll(test, deadline, wake=None):
    """Poll ``test()`` with short sleeps until true (True) or ``deadline`` (False)."""
    delay = 0.0002
    while not test():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if wake is not None and wake():
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    return True


def handshake(node, ok=True, reason=None, timeout=START_TIMEOUT, **opts):
    """Collective over the MPI world: every member reports whether it started.

    Returns a running :class:`World` (this member and all others started), ``None`` (not
    in an MPI world of two or more), or raises :class:`WorldError` naming the members
    that could not start (every member raises the same). ``opts``: see :class:`World`.
    """
    global _current
    if not under_mpi():
        return None
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    request = comm.Ibarrier()
    if not _poll(request.Test, time.monotonic() + timeout):
        raise WorldError(f"not every backend of the world ({comm.Get_size()} processes) reached "
                         f"its start within {timeout:g} s; see the other nodes' logs")
    table = comm.allgather((node, bool(ok), reason, os.getpid()))
    problems = [f"node {n} (world rank {i}): {r}" for i, (n, good, r, _) in enumerate(table) if not good]
    names = [n for n, *_ in table]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"node id(s) {twice} appear more than once: give every backend its own "
                        "VELOC_NODE_ID (or host)")
    if problems:
        raise WorldError("the backend world cannot start: " + "; ".join(problems))
    engine_comm, coord_comm = comm.Dup(), comm.Dup()
    _current = World(coord_comm, engine_comm, names, comm.Get_rank(), **opts)
    return _current


class World:
    """This backend's membership in the world; see the module docstring."""

    def __init__(self, comm, engine_comm, nodes, index, peer_timeout=60.0, deadline=30.0,
                 collective_timeout=None):
        self.comm, self.engine_comm = comm, engine_comm
        self.nodes, self.index = list(nodes), index
        self.node = self.nodes[index]
        self.peer_timeout, self.deadline = float(peer_timeout), float(deadline)
        self.collective_timeout = (max(600.0, 10 * self.peer_timeout) if collective_timeout is None
                                   else float(collective_timeout))
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._decided = OrderedDict()    # key -> (mode, reason)
        self._head = None                # (key, complete) of the batch waiting to run
        self._busy = False
        self._busy_full_since = None
        self._want_stop = False
        self._shutdown = False
        self._leave = False
        self._closing = False
        self._pending_broken = None
        self.serving = False
        self.broken = None               # reason, once the world is broken
        self.broken_at = None
        self.stopped = False             # every member agreed to stop
        self.shutdown_requested = False
        self.ready = False
        self.rounds = 0
        # coordinator (index 0) only
        self._first_seen, self._stall, self._last_round = {}, {}, time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="veloc-world", daemon=True)
        self._thread.start()
        log.info("backend world: node %s is member %d of %d (nodes %s); coordinator: node %s; "
                 "peer timeout %g s, collective deadline %g s", self.node, index, len(nodes),
                 ", ".join(self.nodes), self.nodes[0], self.peer_timeout, self.deadline)

    # ------------------------------------------------------------ engine side
    def engine_peers(self):
        """The :class:`Peers` the engine uses: aborts when the world breaks."""
        from veloc.engine.module import Peers
        return Peers(self.engine_comm, timeout=self.collective_timeout, abort=lambda: self.broken)

    def turn(self, key, complete=True):
        """Block until this node may run batch ``key``; ``(mode, reason)``. Raises
        :class:`Deferred` if the backend stops first."""
        with self._cond:
            self._head = (key, bool(complete))
            self._wake.set()
            try:
                while True:
                    if key in self._decided:
                        return self._decided[key]
                    if self.broken:
                        return "local", f"the backend world is broken ({self.broken})"
                    if self._closing:
                        raise Deferred(f"{key}: backend stopping before its turn")
                    self._cond.wait(1.0)
            finally:
                self._head = None

    @contextlib.contextmanager
    def running(self, full):
        """Mark the engine busy (with a ``full`` batch: one that talks to the peers)."""
        with self._cond:
            self._busy = True
            self._busy_full_since = time.monotonic() if full else None
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._busy_full_since = None

    def declare_broken(self, reason):
        """The engine found the peers out of step: break the world for every member."""
        with self._cond:
            if self.broken is None:
                self._set_broken(f"node {self.node}: {reason}", tell=True)

    # ------------------------------------------------------------ main loop side
    def set_want_stop(self, want):
        self._want_stop = bool(want)

    def request_shutdown(self):
        """Ask every member to stop once its queue is drained."""
        self._shutdown = True
        self._wake.set()

    @property
    def detached(self):
        """True once this backend works alone (world broken or left)."""
        return self.broken is not None

    def describe(self):
        return {"nodes": self.nodes, "index": self.index, "coordinator": self.nodes[0],
                "rounds": self.rounds, "broken": self.broken, "stopped": self.stopped}

    def stop_waiting(self):
        """Release a batch waiting for its turn (it stays journaled)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self):
        """End membership: a member that leaves before the world stops tells the others
        (they go on alone)."""
        self.stop_waiting()
        if not self.stopped and self.broken is None:
            self._leave = True
            self._wake.set()
            self._thread.join(2 * self.peer_timeout + 5)
        else:
            self._thread.join(5)

    # ------------------------------------------------------------ coordinator thread
    def _state(self):
        with self._cond:
            head = self._head
            return {"head": head[0] if head else None, "complete": head[1] if head else True,
                    "busy": self._busy,
                    "want_stop": self._want_stop, "shutdown": self._shutdown,
                    "serving": self.serving, "leave": self._leave, "broken": self._pending_broken}

    def _loop(self):
        try:
            if self.index == 0:
                self._coordinate()
            else:
                self._follow()
        except Exception as exc:          # never silently: the world is gone for this member
            log.exception("backend world: coordinator thread failed")
            with self._cond:
                if self.broken is None:
                    self._set_broken(f"node {self.node}: internal error: {exc!r}")
        self._watchdog()

    def _follow(self):
        root = 0
        sends = []
        while True:
            self._wake.clear()
            state = self._state()
            sends = [r for r in sends if not r.Test()]
            sends.append(self.comm.isend(state, dest=root, tag=TAG_STATE))
            box = {}

            def test():
                probe = self.comm.improbe(source=root, tag=TAG_RESULT)
                if probe is not None:
                    box["msg"] = probe.recv()
                return probe is not None

            if not _poll(test, time.monotonic() + 2 * self.peer_timeout + 1):
                with self._cond:
                    self._set_broken(f"the coordinator, node {self.nodes[root]}, did not answer "
                                     f"within {2 * self.peer_timeout + 1:g} s (hung or dead)")
                return
            if not self._apply(box["msg"]) or state["leave"]:
                return
            self._wake.wait(box["msg"]["interval"])

    def _coordinate(self):
        others = range(1, len(self.nodes))
        sends = []
        while True:
            waiting, states = set(others), {}

            def test():
                for i in list(waiting):
                    probe = self.comm.improbe(source=i, tag=TAG_STATE)
                    if probe is not None:
                        states[i] = probe.recv()
                        waiting.discard(i)
                return not waiting

            complete = _poll(test, time.monotonic() + self.peer_timeout)
            states[0] = self._state()
            if not complete:
                lost = [self.nodes[i] for i in sorted(waiting)]
                result = {"broken": f"node(s) {', '.join(lost)} did not answer within "
                                    f"{self.peer_timeout:g} s (hung or dead)"}
            else:
                result = self._decide(states)
            for i in states:
                if i != 0:
                    sends.append(self.comm.isend(result, dest=i, tag=TAG_RESULT))
            sends = [r for r in sends if not r.Test()]
            if not self._apply(result):
                _poll(lambda: all(r.Test() for r in sends), time.monotonic() + 5)
                return

    def _decide(self, states):
        """The coordinator's decisions for one round (``states`` by member index)."""
        now = time.monotonic()
        elapsed, self._last_round = now - self._last_round, now
        n = len(self.nodes)
        result = {"decide": [], "interval": IDLE, "broken": None,
                  "stop": all(s["want_stop"] for s in states.values()),
                  "shutdown": any(s["shutdown"] for s in states.values()),
                  "ready": all(s["serving"] for s in states.values())}
        leaving = [self.nodes[i] for i, s in states.items() if s["leave"]]
        reported = [s["broken"] for s in states.values() if s["broken"]]
        if leaving or reported:
            result["broken"] = (f"node(s) {', '.join(leaving)} left the backend world (stopped)"
                                if leaving else reported[0])
            return result
        heads = {i: s for i, s in states.items() if s["head"] and s["head"] not in self._decided}
        if any(s["busy"] for s in states.values()):
            result["interval"] = BUSY
        if not heads:
            self._first_seen.clear()
            self._stall.clear()
            return result
        result["interval"] = FAST
        keys = {s["head"] for s in heads.values()}
        for key in keys:
            self._first_seen.setdefault(key, self.rounds)
        for key in list(self._first_seen):
            if key not in keys:
                self._first_seen.pop(key)
                self._stall.pop(key, None)
        if len(heads) == n and len(keys) == 1:
            (key,) = keys
            partial = [self.nodes[i] for i, s in heads.items() if not s["complete"]]
            if partial:
                result["decide"].append((key, "local", f"ranks of node(s) {', '.join(partial)} "
                                         "died before submitting it"))
            else:
                result["decide"].append((key, "full", None))
            return result
        if any(s["busy"] for s in states.values()):
            return result                 # someone is still working: not a stall
        oldest = min(keys, key=lambda k: (self._first_seen[k], k))
        self._stall[oldest] = self._stall.get(oldest, 0.0) + elapsed
        if self._stall[oldest] >= self.deadline:
            missing = [self.nodes[i] for i in range(n) if states[i]["head"] != oldest]
            result["decide"].append((oldest, "local", f"node(s) {', '.join(missing)} did not "
                                     f"submit it within {self.deadline:g} s (their ranks crashed "
                                     "or run late)"))
        return result

    def _apply(self, result):
        """Apply one round's result; False when the coordinator thread should end."""
        self.rounds += 1
        with self._cond:
            for key, mode, reason in result.get("decide", []):
                self._decided[key] = (mode, reason)
                while len(self._decided) > 4096:
                    self._decided.popitem(last=False)
            if result.get("shutdown") and not self.shutdown_requested:
                self.shutdown_requested = True
                log.info("backend world: shutdown requested; stopping once every node is drained")
            if result.get("ready") and not self.ready:
                self.ready = True
                log.info("backend world ready: %d node(s): %s", len(self.nodes), ", ".join(self.nodes))
                if self.index == 0:
                    print(f"{READY_LINE}: {len(self.nodes)} node(s): {' '.join(self.nodes)}",
                          flush=True)
            if result.get("broken"):
                self._set_broken(result["broken"])
                return False
            if result.get("stop"):
                self.stopped = True
                log.info("backend world: every node is drained and stopping")
                self._cond.notify_all()
                return False
            self._cond.notify_all()
        return True

    def _set_broken(self, reason, tell=False):
        """Caller holds ``_cond``. ``tell``: report it to the coordinator first."""
        if tell and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._pending_broken = reason     # sent with the next state; the result breaks all
            self._wake.set()
            deadline = time.monotonic() + self.peer_timeout
            while self.broken is None and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if self.broken is not None:
                return
        self.broken = reason
        self.broken_at = time.monotonic()
        self._cond.notify_all()
        if self._leave:
            log.info("left the backend world")
            return
        log.error("backend world broken: %s. Collective levels (partner, erasure) are skipped "
                  "from now on; node %s keeps its local levels (scratch, checksum, flush) "
                  "until its backend is restarted", reason, self.node)

    def _watchdog(self):
        """After the world broke: an engine still inside a collective step (a transfer
        with a dead peer cannot be aborted) for ``peer_timeout`` more seconds ends the
        process; the journal keeps the unfinished work for the next backend."""
        while self.broken is not None and not self._closing:
            since = self._busy_full_since
            if since is not None and time.monotonic() - max(since, self.broken_at) > self.peer_timeout:
                log.critical("engine stuck in a collective step for %.0f s after the backend world "
                             "broke; exiting (code %d) so a new backend can resume the journal",
                             time.monotonic() - since, EXIT_STUCK)
                logging.shutdown()
                os._exit(EXIT_STUCK)
            time.sleep(0.5)
