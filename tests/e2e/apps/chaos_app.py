#!/usr/bin/env python3
"""Application of the fault-injection suite (scripts/chaos.py, tests/e2e/test_chaos.py).

Every rank protects a few small arrays whose content is a deterministic function of
``(version, rank)`` (:func:`expected`), so any restored state can be checked bit for bit
without keeping a copy. The version is the iteration number.

Run: ``chaos_app.py --config CFG --journal DIR --result DIR --iterations N [--every K]
[--wait-every W] [--extra E] [--sleep S] [--fresh] [--first F]``. Unless ``--fresh``,
each rank first asks ``restart_test``; if a
version comes back it restores it and compares every array with :func:`expected`, and
writes ``DIR/r<rank>.json`` (``{"rank", "version", "exact", "level"}``) before going on.
It then checkpoints every ``K`` iterations up to ``N`` (or ``E`` more iterations after
a restored version when ``--extra`` is given) and leaves with ``finalize(drain=True)``.

Journal: each rank appends to ``<journal>/r<rank>.log`` (fsynced, outside veloc's
folders) every version that veloc reported done: in sync mode when ``checkpoint()``
returned, in async mode when ``checkpoint_wait()`` (every ``W`` checkpoints) or
``finalize(drain=True)`` returned. These lines are what must survive a crash.

SIGUSR1 prints every thread's stack to stderr (the driver asks for it before it kills
a hung job). Exit codes: 0 done, 3 a ``VelocError`` (printed on stdout as ``rank R VelocError:``),
anything else aborts the job after printing the traceback.
"""
import argparse
import faulthandler
import json
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import veloc

NAME = "chaos"


def expected(version, rank):
    """The arrays of ``rank`` at ``version``: small, of rank-dependent sizes."""
    rng = np.random.default_rng([version, rank, 7])
    return {
        "field": rng.random(48 + 16 * rank),
        "ints": rng.integers(-2**40, 2**40, size=(3 + rank % 3, 4), dtype=np.int64),
        "step": np.array([version, rank], dtype=np.int64),
    }


class Journal:
    """This rank's fsynced record of the versions veloc reported done."""

    def __init__(self, folder, rank):
        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(os.path.join(folder, f"r{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def done(self, versions):
        if versions:
            os.write(self.fd, "".join(f"{v}\n" for v in versions).encode())
            os.fsync(self.fd)


def write_result(folder, rank, result):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"r{rank}.json")
    with open(path + ".part", "w") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def run(args, comm):
    rank = comm.Get_rank()
    journal = Journal(args.journal, rank)
    async_mode = False
    with veloc.init(args.config, comm=comm) as ckpt:
        async_mode = ckpt.config.mode == "async"
        arrays = {k: np.zeros_like(v) for k, v in expected(0, rank).items()}
        for key, arr in arrays.items():
            ckpt.protect(key, arr)
        start, last = args.first, args.iterations
        version = None if args.fresh else ckpt.restart_test(NAME)
        if version is not None:
            ckpt.restart(NAME, version)
            want = expected(version, rank)
            exact = all(arrays[k].tobytes() == want[k].tobytes() for k in arrays)
            level = getattr(ckpt.last_restart, "level", None)
            write_result(args.result, rank, {"rank": rank, "version": version, "exact": exact, "level": level})
            start = version + 1
        elif not args.fresh:
            write_result(args.result, rank, {"rank": rank, "version": None, "exact": True, "level": None})
        if args.extra is not None:
            last = start + args.extra - 1
        pending, taken = [], 0
        for it in range(start, last + 1):
            if args.sleep:
                time.sleep(args.sleep)
            if it % args.every:
                continue
            for key, value in expected(it, rank).items():
                arrays[key][...] = value
            ckpt.checkpoint(NAME, it)
            taken += 1
            if not async_mode:
                journal.done([it])
                continue
            pending.append(it)
            if taken % args.wait_every == 0:
                ckpt.checkpoint_wait()
                journal.done(pending)
                pending = []
    journal.done(pending)          # finalize(drain=True) returned: every level has them


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--wait-every", type=int, default=1)
    p.add_argument("--extra", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--first", type=int, default=1, help="first iteration of a run that does not restart")
    p.add_argument("--fresh", action="store_true", help="do not look for a version to restart from")
    args = p.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # the driver's stack dump of a hang
    comm = MPI.COMM_WORLD
    try:
        run(args, comm)
    except veloc.VelocError as exc:
        print(f"rank {comm.Get_rank()} {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(4)
