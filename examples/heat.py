#!/usr/bin/env python3
"""2-D heat diffusion (Jacobi iteration, 5-point stencil) protected by veloc.

The global grid has ``--rows`` x ``--cols`` cells including its boundary. The top
boundary row is held at ``HOT``, the other three boundaries at 0; the interior starts
at 0 and relaxes towards the steady state. Rows are split into contiguous blocks, one
per rank (1-D decomposition); before every iteration each rank exchanges one halo row
with the rank above and the rank below (``Sendrecv``).

Each rank keeps two buffers of shape ``(local_rows + 2, cols)`` (one ghost row on each
side) and swaps them after every iteration. What veloc protects is exactly the state
an uninterrupted run carries from one iteration to the next:

* ``"grid"``: the rank's owned rows of the *current* buffer (a contiguous view; it is
  re-protected before every checkpoint because the current buffer alternates), as the
  slab of the global ``rows`` x ``cols`` grid that starts at the rank's first row, and
* ``"it"``: the iteration counter (a one-element int64 array), replicated (every rank
  holds the same value).

Because the grid is a global array and the counter replicated, a checkpoint written in
the HDF5 format (``[flush] format = hdf5``) restores on another number of ranks: each
rank reads its own rows. The Jacobi result does not depend on the decomposition, so
such a run still ends bit-for-bit equal to an uninterrupted one.

Both buffers hold the same fixed boundary values from the start, and ghost rows are
refreshed before they are read, so restoring ``"grid"`` and ``"it"`` in place is enough
for a restarted run to finish bit-for-bit equal to one that never failed.

Usage (4 ranks, 2 virtual nodes)::

    mpiexec -n 2 -env VELOC_NODE_ID n0 python examples/heat.py --config cfg.ini \\
          : -n 2 -env VELOC_NODE_ID n1 python examples/heat.py --config cfg.ini

Every rank parses the same options. Checkpoints are named ``heat`` with the iteration
number as version. ``--fail-at IT --fail-rank R`` makes rank R kill itself with SIGKILL
once every rank has completed iteration IT (and its checkpoint, if IT is a checkpoint
iteration); the other ranks stop there too, and mpiexec tears the whole job down. Any
exception on any rank ends the job (see ``main``). On start-up the newest consistent
version, if any, is restored and rank 0 prints one line::

    veloc: restarted from version 30 (levels: scratch=2, persistent=2)

and at the end ``heat: done at iteration N ...``. With ``--timed-from IT`` that line
also gives the time of the iterations after IT alone (and of their checkpoints): the
steady state, once the first checkpoints have allocated their node-local storage.
"""
import argparse
import contextlib
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import job_exit  # examples/job_exit.py

HOT = 100.0
"""Temperature of the top boundary row."""

LEVELS = ("scratch", "partner", "erasure", "persistent")
"""Restore levels, fastest first: the order counts are printed in."""

CKPT_NAME = "heat"

TEARDOWN_S = 30.0
"""How long the surviving ranks of a simulated failure wait for mpiexec to end them."""


def parse_args(argv=None):
    """Command-line options; every rank parses the same ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="veloc INI file (required unless --no-checkpoint)")
    p.add_argument("--rows", type=int, default=256, help="global grid rows incl. boundary")
    p.add_argument("--cols", type=int, default=256, help="global grid columns incl. boundary")
    p.add_argument("--steps", type=int, default=200, help="total number of iterations")
    p.add_argument("--every", type=int, default=50,
                   help="checkpoint every K iterations (version = iteration number); 0 = never")
    p.add_argument("--fail-at", type=int, default=None, metavar="IT",
                   help="kill --fail-rank right after iteration IT (and its checkpoint)")
    p.add_argument("--fail-rank", type=int, default=0, metavar="R", help="rank that dies")
    p.add_argument("--out", help="rank 0 gathers the final grid and saves it to this .npy")
    p.add_argument("--timed-from", type=int, default=None, metavar="IT",
                   help="also report the time of the iterations after IT (steady state)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="plain run without veloc (the reference)")
    args = p.parse_args(argv)
    if not args.no_checkpoint and not args.config:
        p.error("--config is required unless --no-checkpoint is given")
    if args.rows < 3 or args.cols < 3:
        p.error("--rows and --cols must be at least 3")
    if args.steps < 0 or args.every < 0:
        p.error("--steps and --every must be >= 0")
    return args


def row_range(rows, size, rank):
    """Global rows ``[lo, hi)`` owned by ``rank``: contiguous blocks, sizes differ by <= 1."""
    base, extra = divmod(rows, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def initial_grid(lo, hi, cols):
    """Local buffer (owned rows plus one ghost row each side) holding the initial state."""
    u = np.zeros((hi - lo + 2, cols), dtype=np.float64)
    if lo == 0 and hi > 0:
        u[1, :] = HOT          # global row 0: the hot boundary
    return u


def exchange_halos(comm, u, up, down):
    """Fill ghost rows of ``u`` from the neighbours (``MPI.PROC_NULL`` at the edges)."""
    n = u.shape[0] - 2
    # my first owned row goes up, the lower neighbour's first row fills my bottom ghost
    comm.Sendrecv(u[1], dest=up, sendtag=1, recvbuf=u[n + 1], source=down, recvtag=1)
    # my last owned row goes down, the upper neighbour's last row fills my top ghost
    comm.Sendrecv(u[n], dest=down, sendtag=2, recvbuf=u[0], source=up, recvtag=2)


def jacobi_step(u, out, i0, i1):
    """One Jacobi sweep of local rows ``[i0, i1)`` from ``u`` into ``out``.

    Each new value is ``(((up + down) + left) + right) * 0.25``, evaluated elementwise
    in that fixed order, so the result does not depend on how rows are distributed.
    """
    if i1 <= i0:
        return
    t = out[i0:i1, 1:-1]
    np.add(u[i0 - 1:i1 - 1, 1:-1], u[i0 + 1:i1 + 1, 1:-1], out=t)
    t += u[i0:i1, :-2]
    t += u[i0:i1, 2:]
    t *= 0.25


def level_summary(levels):
    """``scratch=2, persistent=2`` from the per-rank list of restore levels."""
    counts = {}
    for lvl in levels:
        counts[lvl] = counts.get(lvl, 0) + 1
    order = [lvl for lvl in LEVELS if lvl in counts] + sorted(set(counts) - set(LEVELS))
    return ", ".join(f"{lvl}={counts[lvl]}" for lvl in order)


def try_restart(comm, ckpt, it):
    """Restore the newest consistent ``heat`` version, if any; return it or ``None``.

    Collective. Rank 0 prints the restart line with the level each rank restored from.
    """
    version = ckpt.restart_test(CKPT_NAME)
    if version is None:
        return None
    ckpt.restart(CKPT_NAME, version)
    if int(it[0]) != version:
        raise RuntimeError(f"rank {comm.rank}: restored iteration {int(it[0])} "
                           f"but checkpoint version is {version}")
    info = getattr(ckpt, "last_restart", None)
    levels = comm.gather(getattr(info, "level", "unknown"), root=0)
    if comm.rank == 0:
        print(f"veloc: restarted from version {version} (levels: {level_summary(levels)})",
              flush=True)
    return version


def _unlink_mpi_shm():
    """Remove the names of MPICH's shared-memory segments that this process maps.

    MPICH unlinks its ``/dev/shm/mpich_shm_*`` segment only in ``MPI_Finalize``, so every
    simulated crash (or ``MPI_Abort``) would leak a few MiB of tmpfs. Every local rank
    attached during ``MPI_Init``, so dropping the name now is harmless: the mappings stay
    valid until the processes exit. Linux only, best effort.
    """
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
    except OSError:
        return
    paths = {f[5].strip() for f in fields if len(f) == 6}
    for path in paths:
        if path.startswith("/dev/shm/mpich_shm_") and not path.endswith("(deleted)"):
            try:
                os.unlink(path)
            except OSError:
                pass


def die(comm, it, fail_rank):
    """Simulated hard failure after iteration ``it``.

    Every rank first reaches this point (so the iteration's checkpoint is complete
    everywhere), then ``fail_rank`` SIGKILLs itself and the others wait in a barrier it
    never enters until mpiexec tears the job down. The failure point is therefore the
    same in every run, which keeps the tests deterministic.
    """
    comm.Barrier()
    if comm.rank == fail_rank:
        print(f"heat: rank {comm.rank} failing after iteration {it}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        _unlink_mpi_shm()
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)  # not reached
    # never completes: the job is torn down around us. Should the launcher be slow to
    # notice (a heavily loaded machine), leave on our own after TEARDOWN_S, like a
    # rank killed by it, so the run still ends with a failure.
    request = comm.Ibarrier()
    deadline = time.monotonic() + TEARDOWN_S
    while not request.Test():
        if time.monotonic() > deadline:
            sys.stdout.flush()
            _unlink_mpi_shm()
            os._exit(137)
        time.sleep(0.05)


def gather_grid(comm, u, rows, cols, lo, hi):
    """Rank 0 receives every rank's owned rows and returns the global grid (others: None)."""
    counts = comm.gather((hi - lo) * cols, root=0)
    full = None
    recv = None
    if comm.rank == 0:
        full = np.empty((rows, cols), dtype=np.float64)
        displs = np.concatenate(([0], np.cumsum(counts)[:-1])).tolist()
        recv = [full, counts, displs, MPI.DOUBLE]
    comm.Gatherv(np.ascontiguousarray(u[1:-1]), recv, root=0)
    return full


def protect_grid(ckpt, u, args, lo, hi):
    """Protect the owned rows of buffer ``u`` as rows ``[lo, hi)`` of the global grid, so a
    checkpoint restores on any number of ranks (each reads its own rows)."""
    ckpt.protect("grid", u[1:hi - lo + 1], global_shape=(args.rows, args.cols), offset=(lo, 0))


def run(args, comm):
    """The simulation; returns the iteration it ended at."""
    rank, size = comm.rank, comm.size
    if args.rows < size:
        raise ValueError(f"--rows {args.rows} must be >= the number of ranks ({size})")
    if args.fail_at is not None and not 0 <= args.fail_rank < size:
        raise ValueError(f"--fail-rank {args.fail_rank} is not a rank of this job (0..{size - 1})")
    lo, hi = row_range(args.rows, size, rank)
    up = rank - 1 if rank > 0 else MPI.PROC_NULL
    down = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    # local rows that get updated: global rows 1 .. rows-2 (local index = global - lo + 1)
    i0 = max(lo, 1) - lo + 1
    i1 = min(hi, args.rows - 1) - lo + 1

    cur = initial_grid(lo, hi, args.cols)
    nxt = cur.copy()
    it = np.zeros(1, dtype=np.int64)

    if args.no_checkpoint:
        session = contextlib.nullcontext(None)
    else:
        import veloc  # only needed when checkpointing
        session = veloc.init(args.config, comm=comm)

    t_ckpt = 0.0
    n_ckpt = 0
    steady = None   # [start time, checkpoint seconds, checkpoints] from --timed-from on
    with session as ckpt:
        if ckpt is not None:
            protect_grid(ckpt, cur, args, lo, hi)
            ckpt.protect("it", it, replicated=True)
            if try_restart(comm, ckpt, it) is None and rank == 0:
                print("heat: no checkpoint found, starting from the initial state", flush=True)
        first = int(it[0])
        t_start = time.perf_counter()
        while it[0] < args.steps:
            if steady is None and args.timed_from is not None and it[0] >= args.timed_from:
                steady = [time.perf_counter(), t_ckpt, n_ckpt]
            exchange_halos(comm, cur, up, down)
            jacobi_step(cur, nxt, i0, i1)
            cur, nxt = nxt, cur
            it[0] += 1
            if ckpt is not None and args.every and it[0] % args.every == 0:
                t0 = time.perf_counter()
                protect_grid(ckpt, cur, args, lo, hi)   # the current buffer alternates
                ckpt.checkpoint(CKPT_NAME, int(it[0]))
                t_ckpt += time.perf_counter() - t0
                n_ckpt += 1
            if args.fail_at is not None and it[0] == args.fail_at:
                die(comm, int(it[0]), args.fail_rank)
        t_end = time.perf_counter()
        elapsed = t_end - t_start
        if args.out:
            full = gather_grid(comm, cur, args.rows, args.cols, lo, hi)
            if rank == 0:
                np.save(args.out, full)
        if rank == 0:
            print(f"heat: done at iteration {int(it[0])} ({int(it[0]) - first} iterations "
                  f"in this run, {elapsed:.3f} s; {n_ckpt} checkpoints, {t_ckpt:.3f} s)"
                  + (f"; after iteration {args.timed_from}: {t_end - steady[0]:.3f} s, "
                     f"{n_ckpt - steady[2]} checkpoints, {t_ckpt - steady[1]:.3f} s" if steady else ""),
                  flush=True)
    return int(it[0])


def main(argv=None):
    """Entry point: parse options and run on ``MPI.COMM_WORLD``.

    An exception ends the job with exit code 1: normally when every rank failed (veloc's
    errors are raised on every rank), with ``MPI_Abort`` when one rank failed alone (the
    others would wait forever in their next collective); see ``job_exit``.
    """
    args = parse_args(argv)
    job_exit.prepare(MPI.COMM_WORLD)
    try:
        run(args, MPI.COMM_WORLD)
    except BaseException:
        job_exit.fail(MPI.COMM_WORLD, cleanup=_unlink_mpi_shm)


if __name__ == "__main__":
    main()
