#!/usr/bin/env python3
"""Test application for the multi-level e2e tests (tests/e2e/test_multilevel.py).

Every rank protects arrays whose sizes and contents depend on its rank and on the
version, so the nodes of an erasure group have blocks of different lengths.

``--phase checkpoint``: checkpoint versions 1..V of ``ml`` and exit.
``--phase restart``: agree on a version with ``restart_test``, restore it, check every
array bit for bit against what was checkpointed, and print on rank 0::

    ml: restarted version V levels [L0, L1, ...] exact True

or ``ml: restarted version None`` when nothing is restorable. ``--then V2`` checkpoints
version V2 afterwards (the job goes on after a rebuild). ``ML_MPI_PIECE=N`` cuts every
MPI message of the partner/erasure levels into pieces of N bytes.
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

import veloc

NAME = "ml"


def expected(rank, version, scale):
    """The arrays rank ``rank`` protects at ``version`` (deterministic)."""
    rng = np.random.default_rng(1000 * rank + version)
    return {
        "field": rng.random(scale * (100 + 37 * rank)),
        "ints": rng.integers(-2**40, 2**40, size=(scale * 3 + rank, 5), dtype=np.int64),
        "step": np.array([version], dtype=np.int64),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--phase", choices=("checkpoint", "restart"), required=True)
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--scale", type=int, default=20)
    p.add_argument("--then", type=int, default=None)
    args = p.parse_args()
    if os.environ.get("ML_MPI_PIECE"):      # exercise the cutting of big messages
        from veloc.redundancy import transfer
        transfer.PIECE = int(os.environ["ML_MPI_PIECE"])
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with veloc.init(args.config, comm=comm) as ckpt:
        arrays = {k: np.zeros_like(v) for k, v in expected(rank, 0, args.scale).items()}
        for key, arr in arrays.items():
            ckpt.protect(key, arr)
        if args.phase == "checkpoint":
            for version in range(1, args.versions + 1):
                for key, value in expected(rank, version, args.scale).items():
                    arrays[key][...] = value
                ckpt.checkpoint(NAME, version)
            if rank == 0:
                print(f"{NAME}: checkpointed versions 1..{args.versions}", flush=True)
            return
        version = ckpt.restart_test(NAME)
        if version is None:
            if rank == 0:
                print(f"{NAME}: restarted version None", flush=True)
            return
        ckpt.restart(NAME, version)
        want = expected(rank, version, args.scale)
        exact = all(arrays[k].tobytes() == want[k].tobytes() for k in arrays)
        levels = comm.gather(ckpt.last_restart.level, root=0)
        exact = comm.allreduce(exact, op=MPI.LAND)
        if rank == 0:
            print(f"{NAME}: restarted version {version} levels {levels} exact {exact}", flush=True)
        if args.then is not None:
            for key, value in expected(rank, args.then, args.scale).items():
                arrays[key][...] = value
            ckpt.checkpoint(NAME, args.then)
            if rank == 0:
                print(f"{NAME}: checkpointed version {args.then}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
