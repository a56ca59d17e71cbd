#!/usr/bin/env python
"""Persistent bytes and end-to-end time of ``examples/heat.py`` in async mode, with and
without ``[compress]``, in the same run.

Runs alternate (async, async+compress, async+compress, async, ...), ``--pairs`` pairs, plus
one ``--no-checkpoint`` run per pair as the machine's own reference. Scratch on tmpfs,
persistent on disk (``/tmp``), every version kept (``max_versions = 0``) so the
persistent folder's size at the end is every byte the job flushed. Reported: the
persistent bytes (``du`` of the folder, and the ratio), heat's loop time and the
``mpiexec`` wall time (which includes the final drain of the backend), as medians with
every pair shown, and the load average before and after.

    python scripts/bench/bench_compress_heat.py                     # 64 MiB per rank, 3 pairs
    python scripts/bench/bench_compress_heat.py --heat-mib 256 --pairs 5
"""
import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_async import heat_run, stop_backends
from benchlib import MIB


def du(path):
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heat-mib", type=int, default=64, help="heat grid MiB per rank")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--codec", default="auto")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    opts = p.parse_args()
    opts.scratch_versions = 2
    cols = 8192
    rows = opts.heat_mib * MIB * opts.np // (8 * cols)
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-cz-", dir=opts.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-cz-", dir=opts.disk_dir))
    runtime = Path(tempfile.mkdtemp(prefix="vbc-", dir="/tmp"))
    results = {"raw": [], "compress": [], "plain": []}
    print(f"bench_compress_heat: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f} at start",
          flush=True)
    try:
        for i in range(opts.pairs):
            results["plain"].append(heat_run(opts, rows, cols))
            for kind in (("raw", "compress") if i % 2 == 0 else ("compress", "raw")):
                tag = f"{kind}{i}"
                cfg = shm / f"{tag}.ini"
                lines = [f"scratch = {shm}/{tag}/{{node}}", "mode = async", "scratch_versions = 2",
                         f"persistent = {disk}/{tag}", "max_versions = 0"]
                if kind == "compress":
                    lines += ["[compress]", "enabled = true", f"codec = {opts.codec}"]
                cfg.write_text("\n".join(lines) + "\n")
                run = heat_run(opts, rows, cols, cfg, runtime)
                stop_backends(cfg, runtime)
                run["persistent_bytes"] = du(disk / tag)
                results[kind].append(run)
                shutil.rmtree(shm / tag, ignore_errors=True)
                shutil.rmtree(disk / tag, ignore_errors=True)
            r, c = results["raw"][-1], results["compress"][-1]
            print(f"  pair {i + 1}: raw loop {r['loop']:.2f} s wall {r['wall']:.2f} s {r['persistent_bytes']} B; "
                  f"compress loop {c['loop']:.2f} s wall {c['wall']:.2f} s {c['persistent_bytes']} B; "
                  f"plain loop {results['plain'][-1]['loop']:.2f} s", flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    med = lambda kind, key: statistics.median(x[key] for x in results[kind])   # noqa: E731
    pairs = list(zip(results["raw"], results["compress"]))
    print(f"\n== examples/heat.py async, {opts.np} ranks, grid {rows} x {cols} ({opts.heat_mib} MiB per rank), "
          f"{opts.steps} iterations, checkpoint every {opts.every}; [compress] codec = {opts.codec}")
    print(f"  persistent bytes: raw {med('raw', 'persistent_bytes'):.0f}, compressed "
          f"{med('compress', 'persistent_bytes'):.0f}: "
          f"{med('raw', 'persistent_bytes') / max(1, med('compress', 'persistent_bytes')):.1f}x fewer")
    for key, label in (("loop", "loop time"), ("wall", "mpiexec wall time")):
        ratios = [c[key] / r[key] - 1 for r, c in pairs]
        print(f"  {label:18} plain {med('plain', key):6.2f} s  async {med('raw', key):6.2f} s  "
              f"async+compress {med('compress', key):6.2f} s  compress vs async {statistics.median(ratios):+.1%} "
              f"(pairs: {', '.join(f'{x:+.1%}' for x in ratios)})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
