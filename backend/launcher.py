"""``veloc-run -n P [--virtual-nodes N] [--config CFG] -- CMD...``: run an application
under ``mpiexec`` with the active backends it needs.

Runs in the user's shell (one process, not under MPI). In async mode (``mode = async``
in CFG, or ``VELOC_MODE=async``) it first starts the backend of each node — this
machine's node, or each of ``N`` virtual nodes ``vnode0..`` with ``VELOC_NODE_ID`` set,
the ranks split into ``N`` contiguous blocks — then runs ``mpiexec -n P CMD...`` (with
``-env VELOC_NODE_ID`` per block for virtual nodes), forwards SIGINT/SIGTERM to it, and
exits with the application's exit code. Backends are then asked to stop once their
queues are drained; they outlive the launcher for that (``--wait`` waits for it).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from veloc.errors import VelocError

from . import control, lifecycle

LAUNCHER_IDLE_EXIT = 600   # s: safety net should the launcher itself be killed


def parse_args(argv):
    p = argparse.ArgumentParser(prog="veloc-run", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--np", type=int, required=True, dest="np", help="number of ranks")
    p.add_argument("--virtual-nodes", type=int, default=0, metavar="N",
                   help="split the ranks over N virtual nodes on this machine")
    p.add_argument("--config", default=os.environ.get("VELOC_CONFIG"), metavar="CFG",
                   help="the job's INI file (default $VELOC_CONFIG); async mode starts backends")
    p.add_argument("--mpiexec", default=None, help="mpiexec to use (default: the one next to "
                   "this interpreter, else on PATH)")
    p.add_argument("--wait", action="store_true",
                   help="wait until every backend has drained its queue before exiting")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    opts = p.parse_args(argv)
    if opts.cmd and opts.cmd[0] == "--":
        opts.cmd = opts.cmd[1:]
    if not opts.cmd:
        p.error("no command given: veloc-run -n P [options] -- CMD ARGS...")
    if opts.np < 1 or opts.virtual_nodes < 0 or opts.virtual_nodes > opts.np:
        p.error("need -n >= 1 and 0 <= --virtual-nodes <= -n")
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


def start_backends(cfg, node_ids):
    """Start (or find) the backend of each node; returns their endpoints."""
    eps = []
    for node in node_ids:
        env = dict(os.environ)
        if node is not None:
            env["VELOC_NODE_ID"] = node
        eps.append(lifecycle.ensure_backend(cfg, env, timeout=60,
                                            extra_args=("--idle-exit", str(LAUNCHER_IDLE_EXIT))))
    return eps


def run(argv=None):
    """Launch; returns the exit code (the application's, or 2 for launcher errors)."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    mpiexec = mpiexec_path(opts.mpiexec)
    if not mpiexec:
        print("veloc-run: no mpiexec found: pip install mpich or pass --mpiexec", file=sys.stderr)
        return 2
    blocks = node_blocks(opts.np, opts.virtual_nodes) if opts.virtual_nodes else None
    eps = []
    if opts.config:
        try:
            config = lifecycle.resolve(opts.config)[0]
            if config.mode == "async":
                eps = start_backends(opts.config, [b[0] for b in blocks] if blocks else [None])
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
    for ep in eps:
        if opts.wait:
            try:
                res = control.wait_drained(ep)
                for f in res["failures"]:
                    print(f"veloc-run: node {ep.node_id}: background failure: {f['error']}",
                          file=sys.stderr)
            except VelocError as exc:
                print(f"veloc-run: node {ep.node_id}: {exc}", file=sys.stderr)
        control.shutdown(ep, drain_first=True)
    return rc


def main(argv=None):
    """Console-script entry point of ``veloc-run``."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
