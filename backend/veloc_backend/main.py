"""``veloc-backend CFG``: the active backend daemon of one node for one job.

Started by the first application rank of a node that finds none (through
``veloc_backend.lifecycle.ensure_backend``), by ``veloc-run``, or by hand / under
``mpiexec -ppn 1``. It takes the node's backend lock (exiting with code 3 if another
backend holds it), lowers its CPU priority, replays its journal, starts a bounded worker
pool, serves the node's ranks on its Unix socket, and logs every batch with the timing
of each module to its log file. It stops on SIGTERM/SIGINT, on a ``shutdown`` request
(optionally after draining), or after ``--idle-exit`` seconds with neither clients nor
work; queued work it did not finish stays journaled for the next backend.

Started as one of an MPI world of backends (``veloc-run``, ``mpiexec -ppn 1``), it
first shakes hands with the other members (all start or none does), then works with
them through :mod:`veloc_backend.world`: engine work is ordered across nodes, a version
that does not reach every node in ``--collective-deadline`` seconds skips the
collective levels, a member silent for ``--peer-timeout`` seconds breaks the world
(the others go on alone), and the members stop together once all are drained. The
world's coordinator prints ``veloc-backend world ready: ...`` once every member serves.

Work is done by an *executor* (``run(batch) -> dict``), built by the factory named by
``--executor MODULE:CALLABLE`` and called as ``factory(config, node, logger)``; the
default runs the engine's module pipeline (:mod:`veloc_backend.executor`).
"""
import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time

from veloc.errors import BackendError, VelocError
from veloc.logfile import file_handler
from veloc.work_item import WorkItem

from . import lifecycle
from . import world as world_mod
from .journal import Journal
from .server import SocketServer
from .workqueue import WorkQueue

log = logging.getLogger("veloc.backend")
DEFAULT_EXECUTOR = f"{__package__}.executor:EngineExecutor"
EXIT_ALREADY_RUNNING = lifecycle.EXIT_ALREADY_RUNNING


def parse_args(argv):
    p = argparse.ArgumentParser(prog="veloc-backend", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the job's INI file (VELOC_* variables override it)")
    p.add_argument("--nice", type=int, default=10, help="CPU priority decrement (default 10)")
    p.add_argument("--idle-exit", type=float, default=0.0, metavar="S",
                   help="exit after S seconds with no client and no work (0 = never)")
    p.add_argument("--orphan-grace", type=float, default=5.0, metavar="S",
                   help="run checkpoint groups still missing ranks S seconds after the "
                        "last client disconnected (their ranks died)")
    p.add_argument("--aggregate-timeout", type=float, default=600.0, metavar="S",
                   help="run groups still missing ranks after S seconds anyway")
    p.add_argument("--stop-timeout", type=float, default=60.0, metavar="S",
                   help="on stop, wait up to S seconds for running work")
    p.add_argument("--executor", default=DEFAULT_EXECUTOR, metavar="MODULE:CALLABLE",
                   help="factory(config, node, logger) of the work executor")
    p.add_argument("--peer-timeout", type=float, default=60.0, metavar="S",
                   help="backend world: a member silent this long is lost (default 60)")
    p.add_argument("--collective-deadline", type=float, default=30.0, metavar="S",
                   help="backend world: a version not submitted on every node after S idle "
                        "seconds skips the collective levels (default 30)")
    opts = p.parse_args(argv)
    if opts.peer_timeout <= 0 or opts.collective_deadline < 0:
        p.error("--peer-timeout must be > 0 and --collective-deadline >= 0")
    return opts


def setup_logging(log_file, node):
    """Log to ``log_file`` (appending, ``0600``) with timestamps, pid and node."""
    root = logging.getLogger()
    root.addHandler(file_handler(log_file, node))
    root.setLevel(logging.INFO)


def load_executor(spec, config, node):
    """Build the executor named ``MODULE:CALLABLE``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BackendError(f"--executor {spec!r}: expected MODULE:CALLABLE")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(config, node, logging.getLogger("veloc.engine"))


class Backend:
    """Request handler and main loop; one per process."""

    def __init__(self, config, node, ep, queue, opts, world=None):
        self.config, self.node, self.ep, self.queue, self.opts = config, node, ep, queue, opts
        self.world = world
        self.server = None
        self.started = time.time()
        self._stop = threading.Event()
        self._drain_then_stop = False

    # ------------------------------------------------------------ requests
    def handle(self, msg):
        """``handler(msg) -> reply`` for the socket server (runs on connection threads)."""
        op = msg["op"]
        if op == "ping":
            return {"pid": os.getpid(), "node": self.node, "key": self.ep.key}
        if op == "status":
            return {"pid": os.getpid(), "node": self.node, "key": self.ep.key,
                    "uptime": round(time.time() - self.started, 3), "socket": str(self.ep.socket),
                    "log": str(self.opts.log_file), "clients": self.server.connections,
                    "stopping": self._stop.is_set() or self._drain_then_stop,
                    "world": self.world.describe() if self.world is not None else None,
                    **self.queue.status()}
        if op == "submit":
            # from_wire refuses a bad item with a WorkItemError naming the field; pid: who
            # sent it (see _release_orphans; 0 when the sender is in another pid namespace)
            pid = msg.get("_peer_pid")
            item = WorkItem.from_wire(msg.get("item")).replace(pid=pid or None)
            rid, group = self.queue.submit(item)
            return {"id": rid, "group": group, "duplicate": rid is None}
        if op == "wait":
            groups = msg.get("groups")
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise ValueError("'wait' needs 'groups': a list of strings")
            results, unknown = self.queue.wait_groups(groups, _timeout(msg))
            return {"results": results, "unknown": unknown, "progress": self.queue.progress(),
                    "pending": [g for g in groups if g not in results and g not in unknown]}
        if op == "drain":
            drained = self.queue.drain(_timeout(msg))
            return {"drained": drained, "pending": self.queue.busy(), "progress": self.queue.progress(),
                    "failures": self.queue.failures[-16:]}
        if op == "shutdown":
            drain = bool(msg.get("drain", False))
            log.info("shutdown requested%s", " after draining" if drain else "")
            return {"stopping": True, "_then": lambda: self.request_stop(drain)}
        raise ValueError(f"op {op!r} is not handled by this backend")

    def request_stop(self, drain=False):
        """Stop now (SIGTERM, shutdown) or once the queue is empty (``drain``)."""
        if drain:
            self._drain_then_stop = True
            if self.world is not None:
                self.world.request_shutdown()
        else:
            self._stop.set()

    # ------------------------------------------------------------ main loop
    def serve(self):
        """Serve until asked to stop; the caller cleans up."""
        # the pid first: whoever gets an answer on the socket can then find who answered
        lifecycle.write_pid(self.ep)
        self.server = SocketServer(self.ep.socket, self.handle).start()
        log.info("backend ready: node %s, socket %s, %d worker(s), executor %s",
                 self.node, self.ep.socket, self.queue.nworkers, self.opts.executor)
        if self.world is not None:
            self.world.serving = True
        elif world_mod.under_mpi():       # a world of one: say so to veloc-run
            print(f"{world_mod.READY_LINE}: 1 node(s): {self.node}", flush=True)
        last_active = last_client = time.monotonic()
        dead_since = {}
        while not self._stop.wait(0.2):
            now = time.monotonic()
            busy = self.queue.busy()
            if self.server.connections:
                last_client = now
            elif now - last_client >= self.opts.orphan_grace:
                self.queue.release_incomplete(reason="no client connected")
            self._release_orphans(dead_since, now)
            self.queue.release_incomplete(self.opts.aggregate_timeout, "aggregation timeout")
            if busy or self.server.connections:
                last_active = now
            world = self.world if self.world is not None and not self.world.detached else None
            if world is not None and world.shutdown_requested:
                self._drain_then_stop = True
            drained = self._drain_then_stop and not busy
            idle = bool(self.opts.idle_exit) and now - last_active >= self.opts.idle_exit
            if world is not None:       # members stop together, once every one is done
                world.set_want_stop(drained or idle)
                if world.stopped:
                    log.info("every backend of the world is drained or idle; stopping")
                    break
                continue
            if drained:
                log.info("queue drained; stopping")
                break
            if idle:
                log.info("idle for %.0f s; stopping", now - last_active)
                break

    def _release_orphans(self, dead_since, now):
        """Groups still missing ranks whose submitting ranks died (the job crashed, or a
        backend resumed them from its journal) run with what they have once a submitter
        has been dead for ``--orphan-grace`` seconds."""
        waiting = self.queue.waiting_pids()
        for group in list(dead_since):
            if group not in waiting:
                del dead_since[group]
        for group, pids in waiting.items():
            if group not in dead_since and any(not lifecycle.pid_alive(p) for p in pids):
                dead_since[group] = now
        ripe = [g for g, t in dead_since.items() if now - t >= self.opts.orphan_grace]
        if ripe:
            self.queue.release_groups(ripe, "a rank that submitted it is gone")

    def close(self):
        """Stop serving and working; queued work stays in the journal."""
        if self.server is not None:
            self.server.close()
        if self.world is not None:
            self.world.stop_waiting()
        stopped = self.queue.stop(self.opts.stop_timeout)
        if not stopped:
            log.warning("work still running after %.0f s; leaving it to the next backend "
                        "(it is journaled)", self.opts.stop_timeout)
        try:
            close = getattr(self.queue.executor, "close", None)
            if close is not None and stopped:     # never pull mappings from under running work
                close()
        finally:
            self.queue.journal.close()


def _timeout(msg):
    t = msg.get("timeout")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise ValueError(f"'timeout' must be a non-negative number of seconds, got {t!r}")
    return float(t)


def _refuse_world(node, reason):
    """A backend that cannot start still meets its world's handshake, so every other
    member learns why and exits instead of waiting for it."""
    try:
        world_mod.handshake(node, ok=False, reason=reason)
    except VelocError:
        pass


def run(argv=None):
    """Run a backend; returns the process exit code."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, node, ep = lifecycle.resolve(opts.config)
    except VelocError as exc:
        print(f"veloc-backend: {exc}", file=sys.stderr)
        _refuse_world(os.environ.get("VELOC_NODE_ID", "?"), f"bad configuration: {exc}")
        return 2
    opts.log_file = lifecycle.log_path(config, node, ep)
    setup_logging(opts.log_file, node)
    lock = lifecycle.acquire_lock(ep.lock, timeout=3.0)
    if lock is None:
        log.error("another backend (pid %s) already serves node %s at %s; exiting",
                  lifecycle.read_pid(ep), node, ep.socket)
        _refuse_world(node, f"another backend (pid {lifecycle.read_pid(ep)}) already serves it")
        return EXIT_ALREADY_RUNNING
    backend = scratch_lock = world = None
    journal_file = lifecycle.journal_path(config, node)
    try:
        lifecycle.cleanup_stale(ep)
        # One backend per scratch too, even if another runtime dir hides its socket.
        journal_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch_lock = lifecycle.try_lock(journal_file.with_suffix(".lock"))
        if scratch_lock is None:
            log.error("another backend already works on scratch %s for node %s from a "
                      "different runtime folder; give every process of the job the same "
                      "VELOC_RUNTIME_DIR / XDG_RUNTIME_DIR", journal_file.parent, node)
            _refuse_world(node, f"another backend works on its scratch {journal_file.parent}")
            return lifecycle.EXIT_SCRATCH_BUSY
        try:
            world = world_mod.handshake(node, peer_timeout=opts.peer_timeout,
                                        deadline=opts.collective_deadline)
        except world_mod.WorldError as exc:
            log.error("%s", exc)
            print(f"veloc-backend: node {node}: {exc}", file=sys.stderr, flush=True)
            return world_mod.EXIT_WORLD_START
        try:
            os.nice(opts.nice)
        except OSError as exc:
            log.warning("cannot lower CPU priority by %d: %s", opts.nice, exc)
        executor = load_executor(opts.executor, config, node)
        journal = Journal(journal_file)
        queue = WorkQueue(journal, executor, workers=config.max_parallelism).start()
        backend = Backend(config, node, ep, queue, opts, world)
        signal.signal(signal.SIGTERM, lambda *_: backend.request_stop())
        signal.signal(signal.SIGINT, lambda *_: backend.request_stop())
        backend.serve()
        return 0
    except Exception:
        log.exception("backend failed")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends it at once
        try:
            if backend is not None:
                backend.close()
        except Exception:     # e.g. scratch deleted under us: still free the endpoint
            log.exception("error while stopping; the journal may be incomplete")
        if world is not None:
            world.close()
        if scratch_lock is not None:
            try:
                lifecycle.release_lock(scratch_lock, journal_file.with_suffix(".lock"))
            except OSError:
                pass
        lifecycle.cleanup_stale(ep)
        lifecycle.release_lock(lock, ep.lock, unlink=True)
        try:
            os.rmdir(ep.dir)  # only if empty; clients re-create it (lifecycle.try_lock)
        except OSError:
            pass
        log.info("backend stopped")
        logging.shutdown()


def main(argv=None):
    """Console-script entry point of ``veloc-backend``.

    A member of a backend world always ends with ``MPI_Finalize`` (at interpreter exit):
    ``mpiexec`` kills every process of the world when one exits without it. A member
    that stops before the others (it left, or the world broke) has freed its node's
    lock, socket and journal by then and only waits there, asleep, for the others; it
    ignores the SIGTERM that ``mpiexec`` forwards to every member (dying of it would make
    ``mpiexec`` kill the members still at work)."""
    code = run(argv)
    if world_mod.current() is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
