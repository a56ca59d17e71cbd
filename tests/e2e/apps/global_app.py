#!/usr/bin/env python3
"""Test application for tests/e2e/test_read_api.py: a 2-D grid decomposed over the ranks
in uneven slabs, protected as a global array, with a replicated step counter and a
per-rank array.

Each rank owns the slab ``rows[r0:r1] x cols[c0:c1]`` of a ``NY x NX`` grid (1 rank: all;
2 ranks: columns 0:13 / 13:30; 4 ranks: a 2x2 split at row 10 and column 13), runs a
few smoothing sweeps of its slab per version and checkpoints versions 1..V of ``glob``.
After the last version rank 0 gathers every slab (MPI) and saves the full grid, the step
counter and each rank's per-rank array to ``--out`` (``.npz``): what the analysis side
must read back from the checkpoint.
"""
import argparse

import numpy as np
from mpi4py import MPI

import veloc

NAME, NY, NX = "glob", 24, 30
ROWS, COLS = (0, 10, NY), (0, 13, NX)


def slab(rank, size):
    """``(offset, shape)`` of ``rank``'s slab."""
    if size == 1:
        return (0, 0), (NY, NX)
    if size == 2:
        return (0, COLS[rank]), (NY, COLS[rank + 1] - COLS[rank])
    if size == 4:
        i, j = divmod(rank, 2)
        return (ROWS[i], COLS[j]), (ROWS[i + 1] - ROWS[i], COLS[j + 1] - COLS[j])
    raise SystemExit(f"global_app runs on 1, 2 or 4 ranks, not {size}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    (r0, c0), (ny, nx) = slab(rank, size)
    yy, xx = np.meshgrid(np.arange(r0, r0 + ny), np.arange(c0, c0 + nx), indexing="ij")
    grid = np.sin(yy / 3.0) * np.cos(xx / 5.0) + yy * 0.01
    step = np.zeros(1, np.int64)
    mine = np.full(3 + rank, rank, np.int32)
    with veloc.init(args.config, comm=comm) as ckpt:
        ckpt.protect("grid", grid, global_shape=(NY, NX), offset=(r0, c0))
        ckpt.protect("step", step, replicated=True)
        ckpt.protect("mine", mine)
        for version in range(1, args.versions + 1):
            for _ in range(5):
                grid[1:-1, 1:-1] = 0.25 * (grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:])
            step[0] += 5
            mine += 1
            ckpt.checkpoint(NAME, version)
    pieces = comm.gather(((r0, c0), grid.copy(), mine.copy()), root=0)
    if rank == 0:
        full = np.empty((NY, NX))
        for (a, b), part, _ in pieces:
            full[a:a + part.shape[0], b:b + part.shape[1]] = part
        np.savez(args.out, grid=full, step=step, **{f"mine{r}": m for r, (_, _, m) in enumerate(pieces)})


if __name__ == "__main__":
    main()
