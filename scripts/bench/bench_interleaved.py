#!/usr/bin/env python
"""Async overhead of the heat loop, with checkpointed and plain blocks interleaved in ONE job.

Why: on a shared VM the speed of the same loop moves by tens of percent from one minute
to the next (memory bandwidth taken by other tenants), so two separate runs, even
interleaved, compare different machines. Here one ``mpiexec`` job of 2 ranks runs the
``examples/heat.py`` stencil (its own functions, 256 MiB per rank by default) in blocks
of ``--periods`` x ``--every`` iterations, alternately

* **A**: a ``checkpoint()`` (async mode, default config: scratch on tmpfs, persistent on
  disk, every version flushed) at the start of every period, then ``--every``
  iterations; the block ends with ``checkpoint_wait()``, so any background work still
  running is charged to A, never to the next block;
* **B**: the same iterations without checkpoints;

in the order A B B A A B B A ... (so a slow drift favours neither), after ``--warmup``
A blocks that fill the scratch rotation (their files are then recycled, as in every
long run). Overhead per adjacent pair = time(A) / time(B) - 1 (slowest rank, barrier
before and after each block); reported: median and spread over the pairs, the share of
A spent inside ``checkpoint()``, the CPU time of the ranks per block, and the load.

    python scripts/bench/bench_interleaved.py                      # 256 MiB/rank, 8 pairs
    python scripts/bench/bench_interleaved.py --mib 64 --pairs 4 --json out.json

Scratch and persistent go to fresh folders under ``--shm-dir`` / ``--disk-dir``, removed
at the end (persistent keeps every version, as the default config does: about
``(warmup + pairs) * periods`` x 2 x ``--mib`` MiB of disk during the run).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench_async import python_env, stop_backends
from benchlib import find_mpiexec

REPO = Path(__file__).resolve().parents[2]

APP = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
    from heat import exchange_halos, initial_grid, jacobi_step, row_range
    import veloc
    cfg, mib, every, periods, warmup, pairs, out = sys.argv[2], *map(int, sys.argv[3:8]), sys.argv[8]
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    cols = 8192
    rows = max(size, (mib << 20) // (cols * 8) * size)
    lo, hi = row_range(rows, size, rank)
    up = rank - 1 if rank > 0 else MPI.PROC_NULL
    down = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    i0, i1 = max(lo, 1) - lo + 1, min(hi, rows - 1) - lo + 1
    bufs = [initial_grid(lo, hi, cols)]
    bufs.append(bufs[0].copy())
    version = [0]
    ckpt = veloc.init(cfg, comm=comm)

    def block(checkpointing):
        comm.Barrier()
        c0, t0, inside = time.process_time(), time.perf_counter(), 0.0
        for _ in range(periods):
            if checkpointing:
                s = time.perf_counter()
                version[0] += 1
                ckpt.protect("grid", bufs[0][1:hi - lo + 1], global_shape=(rows, cols), offset=(lo, 0))
                ckpt.checkpoint("heat", version[0])
                inside += time.perf_counter() - s
            for _ in range(every):
                exchange_halos(comm, bufs[0], up, down)
                jacobi_step(bufs[0], bufs[1], i0, i1)
                bufs.reverse()
        if checkpointing:
            s = time.perf_counter()
            ckpt.checkpoint_wait()
            inside += time.perf_counter() - s
        comm.Barrier()
        wall = time.perf_counter() - t0
        return max(comm.allgather(wall)), max(comm.allgather(inside)), comm.allreduce(time.process_time() - c0)

    for _ in range(warmup):
        block(True)
    records = []
    for p in range(pairs):
        order = (True, False) if p % 2 == 0 else (False, True)
        got = {kind: block(kind) for kind in order}
        records.append({"pair": p, "a_first": order[0], "a": got[True], "b": got[False],
                        "load": os.getloadavg()[0]})
    ckpt.finalize()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"rows": rows, "cols": cols, "records": records}, f)
""")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="grid MiB per rank (default 256)")
    p.add_argument("--every", type=int, default=20, help="iterations per period (default 20)")
    p.add_argument("--periods", type=int, default=3, help="periods per block (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="A blocks before the timed pairs (default 2)")
    p.add_argument("--pairs", type=int, default=8, help="timed A/B pairs (default 8)")
    p.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--no-persistent", action="store_true", help="scratch only")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def summarize(doc):
    recs = doc["records"]
    over = [r["a"][0] / r["b"][0] - 1 for r in recs]
    inside = [r["a"][1] / r["b"][0] for r in recs]
    cpu = [r["a"][2] / r["b"][2] - 1 for r in recs]
    return {"overhead": over, "inside": inside, "cpu_overhead": cpu,
            "median_overhead": statistics.median(over), "median_inside": statistics.median(inside),
            "median_cpu_overhead": statistics.median(cpu), "loads": [r["load"] for r in recs],
            "b_seconds": [r["b"][0] for r in recs]}


def main(argv=None):
    args = parse_args(argv)
    mpiexec = find_mpiexec()
    if not mpiexec:
        sys.exit("bench_interleaved: no mpiexec (pip install mpich)")
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-il-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-il-", dir=args.disk_dir))
    try:
        cfg = disk / "veloc.ini"
        lines = [f"scratch = {shm}/scratch", "mode = async"]
        if not args.no_persistent:
            lines.append(f"persistent = {disk}/persistent")
        cfg.write_text("\n".join(lines) + "\n")
        app, out = disk / "app.py", disk / "out.json"
        app.write_text(APP)
        load = os.getloadavg()[0]
        cmd = [mpiexec, "-n", str(args.np), sys.executable, str(app), str(REPO), str(cfg), str(args.mib),
               str(args.every), str(args.periods), str(args.warmup), str(args.pairs), str(out)]
        print(f"bench_interleaved: {os.cpu_count()} CPU(s), load average {load:.2f} at start; config: "
              + "; ".join(lines), flush=True)
        runtime = disk / "runtime"
        runtime.mkdir(mode=0o700)
        env = python_env({"VELOC_RUNTIME_DIR": str(runtime)})
        try:
            subprocess.run(cmd, check=True, timeout=args.timeout, cwd=disk, env=env)
        finally:
            stop_backends({"scratch": f"{shm}/scratch", "mode": "async"}, runtime)
        doc = json.loads(out.read_text())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    s = summarize(doc)
    pct = lambda v: f"{v:+.1%}"
    print(f"\n== heat stencil, {args.np} ranks x {args.mib} MiB, blocks of {args.periods} x {args.every} "
          f"iterations, {args.pairs} A/B pairs in one job, async, "
          f"{'scratch only' if args.no_persistent else 'scratch + persistent every version'}")
    print(f"  overhead (A/B - 1), median   {pct(s['median_overhead'])}   pairs: "
          + ", ".join(pct(v) for v in s["overhead"]))
    print(f"  inside checkpoint() + final wait, share of B  {pct(s['median_inside'])}")
    print(f"  CPU time of the ranks, median {pct(s['median_cpu_overhead'])}   pairs: "
          + ", ".join(pct(v) for v in s["cpu_overhead"]))
    print(f"  plain block seconds: {min(s['b_seconds']):.2f}..{max(s['b_seconds']):.2f}; "
          f"load average during the pairs {min(s['loads']):.1f}..{max(s['loads']):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_at_start": load, **doc, "summary": s},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
