#!/usr/bin/env python
"""Benchmark the partner and erasure levels: encode and rebuild throughput per node, and
the extra time each adds to a blocking ``checkpoint()`` in sync mode.

Runs itself under ``mpiexec`` on ``--nodes`` virtual nodes (one rank each, told apart by
``VELOC_NODE_ID``; scratch on tmpfs). Every rank protects one ``--mib`` MiB array. For
each configuration (scratch only, partner, xor, rs with 2 parity; no persistent level):

* ``ckpt``: median wall time of ``checkpoint()`` over ``--reps`` versions (after a
  warm-up version), and ``extra`` = that minus the scratch-only median;
* ``module``: median time the engine spent in the partner/erasure module itself, and
  ``MB/s`` = array bytes / module time (encode throughput per node);
* ``rebuild``: node n1 loses its copy of the newest version; wall time of
  ``restart_test()`` + ``restart()`` on every rank (it includes the re-protection of the
  version), and ``MB/s`` = array bytes / that time (rebuild throughput of the lost node).

Every time is also given as a ratio against ``np.copyto`` of the same bytes, measured in
the same run on all ranks at once (the ranks share the machine's cores the way the
checkpoint does): ``x copy`` = time / copy time, so a line reads "costs N memcpys".

    python scripts/bench/bench_redundancy.py                 # 4 nodes, 32 MiB, 5 reps
    python scripts/bench/bench_redundancy.py --mib 128 --reps 3
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MB = 1e6


def configs(base):
    common = {"scratch": f"{base}/{{name}}/{{node}}", "mode": "sync", "scratch_versions": 2}
    return {
        "scratch": {},
        "partner": {"partner": {"enabled": True}},
        "xor": {"erasure": {"enabled": True, "scheme": "xor", "group_size": 16}},
        "rs2": {"erasure": {"enabled": True, "scheme": "rs", "parity": 2, "group_size": 16}},
    }, common


def copy_seconds(nbytes, reps):
    import numpy as np
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def worker(args):
    import numpy as np
    from mpi4py import MPI

    import veloc
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    nbytes = args.mib << 20
    comm.Barrier()
    copy_s = max(comm.allgather(copy_seconds(nbytes, args.reps)))
    table, extra_cfg = configs(args.base)
    rows = {}
    for label, sections in table.items():
        cfg = dict(extra_cfg, scratch=extra_cfg["scratch"].replace("{name}", label), **sections)
        with veloc.init(cfg, comm=comm) as ck:
            data = np.random.default_rng(rank).integers(0, 256, nbytes, dtype=np.uint8)
            ck.protect("data", data)
            times, module = [], []
            for version in range(args.reps + 1):
                data[:8] = version
                comm.Barrier()
                t0 = time.perf_counter()
                ck.checkpoint("bench", version)
                elapsed = time.perf_counter() - t0
                engine = ck.host.engine
                spent = sum(s for n, v, m, s in engine.timings if v == version and m in ("partner", "erasure"))
                if version:
                    times.append(max(comm.allgather(elapsed)))
                    module.append(max(comm.allgather(spent)))
            newest = args.reps
            if rank == 1:
                shutil.rmtree(Path(cfg["scratch"].format(node=os.environ["VELOC_NODE_ID"])) / "bench" / f"v{newest}")
            comm.Barrier()
            t0 = time.perf_counter()
            version = ck.restart_test("bench")
            if version is not None:
                ck.restart("bench", version)
            rebuild = max(comm.allgather(time.perf_counter() - t0))
            levels = comm.gather(ck.last_restart.level if version is not None else None, root=0)
            expect = newest - 1 if label == "scratch" else newest   # scratch only: older version
            ok = comm.allreduce(version == expect and int(data[0]) == expect, op=MPI.LAND)
        rows[label] = (statistics.median(times), statistics.median(module), rebuild, levels, ok)
    if rank == 0:
        report(args, copy_s, rows, comm.Get_size())


def report(args, copy_s, rows, nodes):
    nbytes = args.mib << 20
    base = rows["scratch"][0]
    print(f"bench_redundancy: {nodes} virtual nodes x 1 rank, {args.mib} MiB per rank, median of "
          f"{args.reps}, sync mode, tmpfs scratch, {os.cpu_count()} cores")
    print(f"np.copyto of {args.mib} MiB on every rank at once: {copy_s * 1e3:.1f} ms "
          f"({nbytes / copy_s / MB:.0f} MB/s per rank)\n")
    head = (f"{'level':8} {'ckpt ms':>8} {'extra ms':>9} {'x copy':>7} | {'module ms':>9} {'MB/s':>7} "
            f"{'x copy':>7} | {'rebuild ms':>10} {'MB/s':>7} {'x copy':>7}  lost node read from")
    print(head)
    print("-" * len(head))
    for label, (ckpt, module, rebuild, levels, ok) in rows.items():
        extra = ckpt - base
        enc = f"{module * 1e3:9.1f} {nbytes / module / MB:7.0f} {module / copy_s:7.1f}" if module else \
            f"{'-':>9} {'-':>7} {'-':>7}"
        where = (levels[1] if levels else "none") + ("" if ok else "  (WRONG VERSION OR DATA)")
        print(f"{label:8} {ckpt * 1e3:8.1f} {extra * 1e3:9.1f} {extra / copy_s:7.1f} | {enc} | "
              f"{rebuild * 1e3:10.1f} {nbytes / rebuild / MB:7.0f} {rebuild / copy_s:7.1f}  {where}")
    print("\nscratch only: n1 has no other copy of the newest version, so the job restarts from the one "
          "before (a plain scratch read, for reference).\nEvery rank shares 2 cores with 3 others here: "
          "medians move by 2x between runs; compare the x copy columns of one run.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    base = tempfile.mkdtemp(prefix="veloc-bench-redundancy-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec"]
    me = [sys.executable, __file__, "--worker", "--base", base, "--mib", str(args.mib), "--reps", str(args.reps)]
    for i in range(args.nodes):
        cmd += ([":"] if i else []) + ["-n", "1", "-env", "VELOC_NODE_ID", f"n{i}", *me]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        return subprocess.call(cmd, env=env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
