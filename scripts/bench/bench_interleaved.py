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
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from interleaved_job import add_common_args, pair_summary, pct, print_load_and_save, print_pairs, run_job

REPO = Path(__file__).resolve().parents[2]

APP = textwrap.dedent("""
    import json, mmap, os, queue, sys, threading, time
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
    sys.path.insert(0, os.path.join(sys.argv[1], "scripts", "bench"))
    from interleaved_job import run_pairs
    from heat import exchange_halos, initial_grid, jacobi_step, row_range
    import veloc
    cfg, mib, every, periods, warmup, pairs = sys.argv[2], *map(int, sys.argv[3:8])
    floor_shm, floor_disk, out = sys.argv[8:11]
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

    def start_floor():
        # F blocks: one memcpy into a mapped, pre-faulted tmpfs file, and one O_DIRECT
        # write of it to a new disk file by a thread at veloc's backend priority (nice 10)
        nbytes = bufs[0][1:hi - lo + 1].nbytes
        fd = os.open(os.path.join(floor_shm, f"stage.r{rank}"), os.O_RDWR | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, nbytes)
        stage_map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        os.close(fd)
        stage = np.frombuffer(stage_map, dtype=bufs[0].dtype).reshape(hi - lo, cols)
        work = queue.Queue()

        def writer():
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            view, written, aligned = memoryview(stage_map), [], nbytes - nbytes % 4096
            while True:
                n = work.get()
                path = os.path.join(floor_disk, f"floor.r{rank}.{n}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
                done = 0
                while done < aligned:
                    done += os.pwrite(fd, view[done:min(done + (32 << 20), aligned)], done)
                os.fsync(fd)
                os.close(fd)
                written.append(path)
                while len(written) > 2:
                    os.unlink(written.pop(0))
                work.task_done()

        threading.Thread(target=writer, daemon=True).start()
        return stage, work

    floor = start_floor() if floor_shm != "-" else None

    def block(kind):
        comm.Barrier()
        c0, t0, inside = time.process_time(), time.perf_counter(), 0.0
        for _ in range(periods):
            if kind is True:
                s = time.perf_counter()
                version[0] += 1
                ckpt.protect("grid", bufs[0][1:hi - lo + 1], global_shape=(rows, cols), offset=(lo, 0))
                ckpt.checkpoint("heat", version[0])
                inside += time.perf_counter() - s
            elif kind == "floor":
                s = time.perf_counter()
                version[0] += 1
                np.copyto(floor[0], bufs[0][1:hi - lo + 1])
                if floor_disk != "-":          # scratch only: the copy is the whole floor
                    floor[1].put(version[0])
                inside += time.perf_counter() - s
            for _ in range(every):
                exchange_halos(comm, bufs[0], up, down)
                jacobi_step(bufs[0], bufs[1], i0, i1)
                bufs.reverse()
        if kind is not False:
            s = time.perf_counter()
            if kind is True:
                ckpt.checkpoint_wait()
            else:
                floor[1].join()
            inside += time.perf_counter() - s
        comm.Barrier()
        wall = time.perf_counter() - t0
        return max(comm.allgather(wall)), max(comm.allgather(inside)), comm.allreduce(time.process_time() - c0)

    records = run_pairs(block, warmup, pairs, floor=floor is not None)
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
    p.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--no-persistent", action="store_true", help="scratch only")
    p.add_argument("--no-floor", action="store_true",
                   help="no F blocks (by default every pair also runs the floor: the same bytes "
                        "copied once and, with persistent, written once with O_DIRECT)")
    add_common_args(p)
    return p.parse_args(argv)


def summarize(doc):
    recs = doc["records"]
    inside = [r["a"][1] / r["b"][0] for r in recs]
    out = dict(pair_summary(recs), inside=inside, median_inside=statistics.median(inside))
    if recs and "f" in recs[0]:
        floor_inside = [r["f"][1] / r["b"][0] for r in recs]
        out.update(floor_inside=floor_inside, median_floor_inside=statistics.median(floor_inside))
    return out


def main(argv=None):
    args = parse_args(argv)
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-il-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-il-", dir=args.disk_dir))
    try:
        cfg = disk / "veloc.ini"
        lines = [f"scratch = {shm}/scratch", "mode = async"]
        if not args.no_persistent:
            lines.append(f"persistent = {disk}/persistent")
        cfg.write_text("\n".join(lines) + "\n")
        load = os.getloadavg()[0]
        print(f"bench_interleaved: {os.cpu_count()} CPU(s), load average {load:.2f} at start; config: "
              + "; ".join(lines), flush=True)
        floor_shm, floor_disk = "-", "-"
        if not args.no_floor:
            floor_shm = shm / "floor"
            floor_shm.mkdir(mode=0o700)
            if not args.no_persistent:
                floor_disk = disk / "floor"
                floor_disk.mkdir(mode=0o700)
        doc = run_job(APP, args.np, [cfg, args.mib, args.every, args.periods, args.warmup, args.pairs,
                                     floor_shm, floor_disk], shm, disk, args.timeout, async_mode=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    s = summarize(doc)
    print(f"\n== heat stencil, {args.np} ranks x {args.mib} MiB, blocks of {args.periods} x {args.every} "
          f"iterations, {args.pairs} A/B pairs in one job, async, "
          f"{'scratch only' if args.no_persistent else 'scratch + persistent every version'}")
    print_pairs(s)
    print(f"  inside checkpoint() + final wait, share of B  {pct(s['median_inside'])}")
    if "floor_inside" in s:
        print(f"  floor: inside the copy + final wait, share of B  {pct(s['median_floor_inside'])}")
    print_load_and_save(s, args, load, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
