#!/usr/bin/env python
"""Training overhead with checkpointed and plain blocks of steps interleaved in ONE job.

The companion of ``bench_training.py`` (which compares separate runs) for a shared VM
whose speed drifts by ±10 % between runs: one ``mpiexec`` job trains the numpy MLP of
``examples/train.py`` (its own classes, ``--state-mib`` MiB of weights and Adam moments
per rank, gradients averaged by ``Allreduce``) in blocks of ``--block`` steps,
alternately

* **A**: the training loop of ``examples/train.py`` with the two-phase API under the
  ``[policy]`` (``wait_snapshot()`` then ``with ckpt.guard():`` around the update,
  ``need_checkpoint(step)`` then ``snapshot()``); the block ends with
  ``checkpoint_wait()``, so every persist it started is charged to it;
* **B**: the same steps without snapshots: only ``need_checkpoint(step)`` is called, its
  answer ignored, so that the policy times every step (B steps are clean ones to it)
  instead of seeing one giant step across each B block, which made it lower ``k``;

in the order A B B A ... after ``--warmup`` A blocks (the policy's first profile, the
staging buffers and the scratch rotation). The step counter runs on through B blocks,
so the policy sees the true time per step. The ranks run one BLAS thread each (unless
``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` say otherwise): with a
rank per core, numpy's default of a thread per core per rank oversubscribes the node and
made plain blocks vary from 5 to 19 s here. Overhead per adjacent pair = time(A) /
time(B) - 1 (slowest rank); reported: median and spread over the pairs, the stall per
checkpoint against one ``np.copyto`` of the state, the checkpoints per A block.

    python scripts/bench/bench_training_interleaved.py --pairs 6            # auto, 5 %
    python scripts/bench/bench_training_interleaved.py --policy fixed --interval 10
"""
import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from bench_training import FEATURES, OUTPUTS, THREAD_VARS
from interleaved_job import add_common_args, pair_summary, print_load_and_save, print_pairs, run_job

REPO = Path(__file__).resolve().parents[2]

APP = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
    sys.path.insert(0, os.path.join(sys.argv[1], "scripts", "bench"))
    from interleaved_job import run_pairs
    import train
    import veloc
    from veloc.data import ResumableSampler
    cfg, block, warmup, pairs, out = sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[-1]
    args = train.parse_args(sys.argv[7:-1] + ["--config", cfg])      # sys.argv[6] is "--"
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x, y = train.make_data(args)
    model, stateful, nparams, _ = train.build_model(args)
    sampler = ResumableSampler(args.samples, seed=args.seed, rank=rank, world_size=size)
    flat = np.zeros(nparams + 1, np.float32)
    ckpt = veloc.init(cfg, comm)
    for name, obj in dict(stateful, sampler=sampler).items():
        ckpt.protect_stateful(name, obj)
    state_bytes = sum(a.nbytes for a in model.params.values()) * 3
    src = np.ones(state_bytes // 4, np.float32)
    dst = np.empty_like(src)
    t = time.perf_counter(); np.copyto(dst, src); copyto_s = time.perf_counter() - t
    src = dst = None
    step = [0]

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from sampler.iter_batches(args.batch)
            epoch += 1
    feed = batches()

    def run_block(checkpointing):
        comm.Barrier()
        c0, t0, stalls, ckpts = time.process_time(), time.perf_counter(), 0.0, 0
        for _ in range(block):
            idx = next(feed)
            flat[-1] = model.gradients(x[idx], y[idx], flat[:-1])
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat[:] /= np.float32(size)
            if checkpointing:
                s = time.perf_counter()
                ckpt.wait_snapshot()
                stalls += time.perf_counter() - s
                with ckpt.guard():
                    model.update(flat[:-1])
            else:
                model.update(flat[:-1])
            step[0] += 1
            # asked in B blocks too (the answer ignored there): the policy then times every
            # step, not one giant step spanning a B block, and keeps its cadence
            if ckpt.need_checkpoint(step[0]) and checkpointing:
                s = time.perf_counter()
                ckpt.snapshot("train", step[0])
                stalls += time.perf_counter() - s
                ckpts += 1
        if checkpointing:
            ckpt.checkpoint_wait()
        comm.Barrier()
        wall = time.perf_counter() - t0
        return (max(comm.allgather(wall)), max(comm.allgather(stalls)), comm.allreduce(time.process_time() - c0),
                ckpts)

    records = run_pairs(run_block, warmup, pairs)
    ckpt.finalize()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"records": records, "state_bytes": state_bytes, "copyto_seconds": copyto_s}, f)
""")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mib", type=int, default=72, help="checkpointed state per rank (default 72)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per rank per step")
    p.add_argument("--block", type=int, default=240,
                   help="steps per block (default 240: the final wait for the persist in flight, charged to "
                        "each A block, stays small against the block)")
    p.add_argument("--policy", choices=("auto", "fixed"), default="auto")
    p.add_argument("--overhead", type=float, default=0.05, help="[policy] overhead, auto (default 0.05)")
    p.add_argument("--interval", type=int, default=10, help="[policy] interval, fixed (default 10)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    add_common_args(p)
    return p.parse_args(argv)


def summarize(doc):
    recs = doc["records"]
    per_ckpt = [r["a"][1] / r["a"][3] / doc["copyto_seconds"] for r in recs if r["a"][3]]
    return dict(pair_summary(recs), stall_x_copyto=per_ckpt, checkpoints_per_block=[r["a"][3] for r in recs])


def main(argv=None):
    args = parse_args(argv)
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-ti-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-ti-", dir=args.disk_dir))
    hidden = math.ceil(args.state_mib * (1 << 20) / (3 * 4 * (FEATURES + 1 + OUTPUTS)))
    model = ["--backend", "numpy", "--features", FEATURES, "--outputs", OUTPUTS, "--hidden", hidden,
             "--samples", 50 * args.ranks * args.batch, "--batch", args.batch]
    policy = (f"mode = auto\noverhead = {args.overhead}\n" if args.policy == "auto"
              else f"mode = fixed\ninterval = {args.interval}\n")
    try:
        cfg = disk / "veloc.ini"
        cfg.write_text(f"scratch = {shm}/scratch\npersistent = {disk}/persistent\nmode = {args.mode}\n"
                       f"scratch_versions = 2\nmax_versions = 2\n\n[policy]\n{policy}")
        load = os.getloadavg()[0]
        print(f"bench_training_interleaved: {os.cpu_count()} CPU(s), load average {load:.2f} at start; "
              f"{args.mode} mode, policy {policy.strip().replace(chr(10), ', ')}", flush=True)
        # one BLAS thread per rank, as an MPI job with a rank per core runs
        doc = run_job(APP, args.ranks, [cfg, args.block, args.warmup, args.pairs, "--", *model], shm, disk,
                      args.timeout, async_mode=args.mode == "async", env_extra={v: "1" for v in THREAD_VARS})
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    s = summarize(doc)
    print(f"\n== examples/train.py numpy MLP, {args.ranks} ranks, {doc['state_bytes'] / (1 << 20):.0f} MiB state "
          f"per rank, blocks of {args.block} steps, {args.pairs} A/B pairs in one job, {args.mode} mode, "
          f"policy {args.policy}")
    print_pairs(s)
    if s["stall_x_copyto"]:
        print(f"  stall per checkpoint: median {statistics.median(s['stall_x_copyto']):.2f}x one np.copyto of "
              f"the state (max {max(s['stall_x_copyto']):.2f}x); checkpoints per A block: "
              + ", ".join(map(str, s["checkpoints_per_block"])))
    print_load_and_save(s, args, load, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
