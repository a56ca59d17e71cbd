"""``veloc-run -n P [--virtual-nodes N | --nodes N] [--config CFG] -- CMD...``: run an
application under ``mpiexec`` with the active backends it needs.

Runs in the user's shell (one process, not under MPI). In async mode (``mode = async``
in CFG, or ``VELOC_MODE=async``) it first starts the job's backends as ONE MPI world
(:mod:`veloc_backend.world`), so partner copies and erasure coding work between them:

- ``--virtual-nodes N``: ``N`` virtual nodes ``vnode0..`` on this machine, one backend
  each (``mpiexec -n 1 -env VELOC_NODE_ID vnodeI veloc-backend CFG : ...``); the ranks
  are split into ``N`` contiguous blocks, each block with its ``VELOC_NODE_ID``;
- ``--nodes N`` (default 1): one backend per node (``mpiexec -ppn 1 -n N``, placed by
  the MPI launcher on the nodes of the allocation), node ids are host names.

Backends already serving these nodes (this machine's) are asked to drain and stop
first. The world's output goes to ``veloc-backend-world-<key>.out`` next to the
backends' logs; its coordinator prints a ready line there once every member serves,
which the launcher waits for. Then it runs ``mpiexec -n P CMD...``, forwards
SIGINT/SIGTERM to it, asks the backends to stop once their queues are drained (they
outlive the launcher for that; ``--wait`` waits until they have), and exits with the
application's exit code (2 for launcher errors).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from veloc.errors import BackendError, VelocError

from . import control, lifecycle
from .world import READY_LINE

LAUNCHER_IDLE_EXIT = 600   # s: safety net should the launcher itself be killed
READY_TIMEOUT = 90.0       # s: the whole backend world must be up within this


def parse_args(argv):
    p = argparse.ArgumentParser(prog="veloc-run", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--np", type=int, required=True, dest="np", help="number of ranks")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--virtual-nodes", type=int, default=0, metavar="N",
                       help="split the ranks over N virtual nodes on this machine")
    where.add_argument("--nodes", type=int, default=1, metavar="N",
                       help="number of nodes of the allocation (one backend each; default 1)")
    p.add_argument("--config", default=os.environ.get("VELOC_CONFIG"), metavar="CFG",
                   help="the job's INI file (default $VELOC_CONFIG); async mode starts backends")
    p.add_argument("--mpiexec", default=None, help="mpiexec to use (default: the one next to "
                   "this interpreter, else on PATH)")
    p.add_argument("--wait", action="store_true",
                   help="wait until every backend has drained its queue before exiting")
    p.add_argument("--peer-timeout", type=float, default=None, metavar="S",
                   help="backends: a member of the world silent this long is lost (default 60)")
    p.add_argument("--collective-deadline", type=float, default=None, metavar="S",
                   help="backends: a version not submitted on every node after S idle seconds "
                        "skips partner/erasure (default 30)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    opts = p.parse_args(argv)
    if opts.cmd and opts.cmd[0] == "--":
        opts.cmd = opts.cmd[1:]
    if not opts.cmd:
        p.error("no command given: veloc-run -n P [options] -- CMD ARGS...")
    if opts.np < 1 or opts.virtual_nodes < 0 or opts.virtual_nodes > opts.np or opts.nodes < 1:
        p.error("need -n >= 1, --nodes >= 1 and 0 <= --virtual-nodes <= -n")
    return opts


def mpiexec_path(explicit=None):
    """The mpiexec to run: explicit, next to this interpreter (mpich wheel), or on PATH."""
    if explicit:
        return explicit
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def node_blocks(np_, nodes):
    """``[(node id, rank count)]``: ``np_`` ranks in ``nodes`` contiguous blocks."""
    return [(f"vnode{i}", (i + 1) * np_ // nodes - i * np_ // nodes) for i in range(nodes)]


def mpiexec_command(mpiexec, np_, cmd, blocks=None):
    """argv of ``mpiexec`` for the application, MPMD with one block per virtual node."""
    if not blocks:
        return [mpiexec, "-n", str(np_), *cmd]
    out = [mpiexec]
    for i, (node, count) in enumerate(b for b in blocks if b[1]):
        out += ([":"] if i else []) + ["-n", str(count), "-env", "VELOC_NODE_ID", node, *cmd]
    return out


def world_command(mpiexec, cfg, node_ids=None, nodes=1, extra_args=()):
    """argv of ``mpiexec`` for the backend world: MPMD with one backend per virtual node
    (``node_ids``), else one per node of the allocation."""
    backend = lifecycle.backend_command(cfg, extra_args)
    if not node_ids:
        return [mpiexec, "-ppn", "1", "-n", str(nodes), *backend]
    out = [mpiexec]
    for i, node in enumerate(node_ids):
        out += ([":"] if i else []) + ["-n", "1", "-env", "VELOC_NODE_ID", node, *backend]
    return out


def _endpoint(cfg, node, env=None):
    env = dict(os.environ if env is None else env)
    if node is not None:
        env["VELOC_NODE_ID"] = node
    return lifecycle.resolve(cfg, env)


def _stop_running(cfg, local_nodes, env=None, timeout=120.0):
    """Backends already serving these nodes (a previous job's) drain and stop first, so
    every member of the new world can take its node's lock."""
    for node in local_nodes:
        config, node_id, ep = _endpoint(cfg, node, env)
        if lifecycle.ping(ep) is None:
            continue
        print(f"veloc-run: node {node_id}: a backend is already running; asking it to drain "
              "and stop first", file=sys.stderr)
        control.shutdown(ep, drain_first=True)
        deadline = time.monotonic() + timeout
        while lifecycle.backend_alive(ep):
            if time.monotonic() >= deadline:
                raise BackendError(f"the running backend of node {node_id} (pid {lifecycle.read_pid(ep)}) "
                                   f"did not stop within {timeout:g} s; stop it (veloc status CFG)")
            time.sleep(0.1)


def start_world(cfg, mpiexec, node_ids=None, nodes=1, extra_args=(), timeout=READY_TIMEOUT,
                env=None):
    """Start the backend world; ``(Popen, [endpoints on this machine], output file)``.
    ``env``: the environment (default ``os.environ``).

    Raises BackendError (after stopping what it started) if the world does not report
    ready within ``timeout`` seconds or exits first."""
    env = dict(os.environ if env is None else env)
    local_nodes = node_ids or [None]
    _stop_running(cfg, local_nodes, env)
    config, first, ep0 = _endpoint(cfg, local_nodes[0], env)
    out = lifecycle.log_path(config, first, ep0).parent / f"veloc-backend-world-{ep0.key[:8]}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(world_command(mpiexec, cfg, node_ids, nodes, extra_args),
                                env=lifecycle.backend_env(env), stdin=subprocess.DEVNULL,
                                stdout=fd, stderr=fd, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while READY_LINE not in _read(out):
        failed = proc.poll() is not None
        if failed or time.monotonic() >= deadline:
            if not failed:
                _kill_world(proc)
            why = (f"exited with code {proc.returncode}" if failed
                   else f"did not report ready within {timeout:g} s")
            raise BackendError(f"the backend world {why}; its output ({out}):\n"
                               f"{_read(out)[-3000:]}\nsee also the backends' logs next to it")
        time.sleep(0.05)
    eps = []
    if node_ids or nodes == 1:          # every backend runs on this machine
        for node in node_ids or [None]:
            ep = _endpoint(cfg, node, env)[2]
            lifecycle.wait_ready(ep, time.monotonic() + 30)
            eps.append(ep)
    else:                               # this machine's backend, if it is one of the nodes
        ep = _endpoint(cfg, None, env)[2]
        if lifecycle.ping(ep) is not None:
            eps.append(ep)
    return proc, eps, out


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _kill_world(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def backend_args(opts):
    extra = ["--idle-exit", str(LAUNCHER_IDLE_EXIT)]
    if opts.peer_timeout is not None:
        extra += ["--peer-timeout", str(opts.peer_timeout)]
    if opts.collective_deadline is not None:
        extra += ["--collective-deadline", str(opts.collective_deadline)]
    return extra


def run(argv=None):
    """Launch; returns the exit code (the application's, or 2 for launcher errors)."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    mpiexec = mpiexec_path(opts.mpiexec)
    if not mpiexec:
        print("veloc-run: no mpiexec found: pip install mpich or pass --mpiexec", file=sys.stderr)
        return 2
    blocks = node_blocks(opts.np, opts.virtual_nodes) if opts.virtual_nodes else None
    world = None
    eps = []
    if opts.config:
        try:
            config = lifecycle.resolve(opts.config)[0]
            if config.mode == "async":
                node_ids = [b[0] for b in blocks] if blocks else None
                world, eps, out = start_world(opts.config, mpiexec, node_ids, opts.nodes,
                                              backend_args(opts))
                print(f"veloc-run: backend world of {len(node_ids) if node_ids else opts.nodes} "
                      f"node(s) started (pid {world.pid}); output {out}", file=sys.stderr)
        except VelocError as exc:
            print(f"veloc-run: {exc}", file=sys.stderr)
            return 2
        for ep in eps:
            print(f"veloc-run: backend for node {ep.node_id} at {ep.socket}", file=sys.stderr)
    proc = subprocess.Popen(mpiexec_command(mpiexec, opts.np, opts.cmd, blocks))
    forward = lambda sig, _frame: proc.send_signal(sig)   # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    rc = 128 - rc if rc < 0 else rc
    if world is not None:
        finish_world(world, eps, opts.wait)
    return rc


def finish_world(world, eps, wait):
    """After the application: every backend stops once its queue is drained (a shutdown
    request to one member reaches them all); with ``wait``, wait for that."""
    for ep in eps:
        if wait:
            try:
                res = control.wait_drained(ep)
                for f in res["failures"]:
                    print(f"veloc-run: node {ep.node_id}: background failure: {f['error']}",
                          file=sys.stderr)
            except VelocError as exc:
                print(f"veloc-run: node {ep.node_id}: {exc}", file=sys.stderr)
        control.shutdown(ep, drain_first=True)
    if not eps:
        print("veloc-run: no backend of the world runs on this machine; they stop after "
              f"{LAUNCHER_IDLE_EXIT} idle seconds", file=sys.stderr)
    if wait:
        world.wait()


def main(argv=None):
    """Console-script entry point of ``veloc-run``."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
