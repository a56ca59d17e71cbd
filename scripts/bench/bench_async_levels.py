#!/usr/bin/env python
"""Async mode: does the application's blocking time grow when partner or erasure coding
is on? (issue 4: it must not.)

For each configuration (scratch only, partner, xor, rs with 2 parity; no persistent
level) this launches ``veloc-run -n 4 --virtual-nodes 4`` (backends as one MPI world) on
an app that protects ``--mib`` MiB per rank and checkpoints ``--versions`` times with an
idle gap between checkpoints (so the background work of the previous version can finish,
as it does behind real computation). It reports the median blocking time of
``checkpoint()`` over the steady versions as a ratio to ``np.copyto`` of the same bytes,
measured right before each checkpoint on the same rank.

    python scripts/bench/bench_async_levels.py [--mib 32] [--versions 8] [--gap 1.0]
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEVELS = {
    "scratch only": "",
    "partner": "[partner]\nenabled = true\n",
    "xor": "[erasure]\nenabled = true\nscheme = xor\ngroup_size = 4\n",
    "rs, 2 parity": "[erasure]\nenabled = true\nscheme = rs\nparity = 2\ngroup_size = 4\n",
}


def app(args):
    """One rank: checkpoints with a gap; prints its copy/checkpoint ratios as JSON (rank 0)."""
    import numpy as np
    from mpi4py import MPI
    import veloc
    comm = MPI.COMM_WORLD
    data = np.random.default_rng(comm.rank).integers(0, 255, args.mib << 20, dtype=np.uint8)
    scratch = np.empty_like(data)
    ratios = []
    with veloc.init(args.config, comm) as ckpt:
        ckpt.protect("data", data)
        for version in range(1, args.versions + 1):
            time.sleep(args.gap)
            comm.Barrier()
            t0 = time.perf_counter()
            np.copyto(scratch, data)
            t1 = time.perf_counter()
            ckpt.checkpoint("bench", version)
            t2 = time.perf_counter()
            if version > 3:                       # steady state: recycled scratch files
                ratios.append((t1 - t0) / (t2 - t1))
    allr = comm.gather(ratios, root=0)
    if comm.rank == 0:
        print("RESULT " + json.dumps(sorted(r for rr in allr for r in rr)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--versions", type=int, default=8)
    p.add_argument("--gap", type=float, default=1.0)
    p.add_argument("--app", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.app:
        return app(args)
    base = Path(tempfile.mkdtemp(prefix="veloc-bench-levels-", dir="/dev/shm"))
    rows = []
    try:
        for label, section in LEVELS.items():
            cfg = base / f"{len(rows)}.ini"
            cfg.write_text(f"scratch = {base}/s{len(rows)}/{{node}}\nmode = async\nscratch_versions = 2\n{section}")
            cmd = [str(Path(sys.executable).parent / "veloc-run"), "-n", "4", "--virtual-nodes", "4",
                   "--config", str(cfg), "--wait", "--", sys.executable, __file__, "--app",
                   "--config", str(cfg), "--mib", str(args.mib), "--versions", str(args.versions),
                   "--gap", str(args.gap)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{label}: failed (exit {out.returncode})\n{out.stdout}\n{out.stderr}")
            ratios = json.loads(line[0][7:])
            rows.append((label, statistics.median(ratios), min(ratios), max(ratios)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"async checkpoint() blocking, {args.mib} MiB per rank, 4 ranks on 4 virtual nodes, "
          "x np.copyto (higher is faster)")
    print(f"{'levels':<16}{'median':>8}{'min':>8}{'max':>8}")
    for label, med, lo, hi in rows:
        print(f"{label:<16}{med:>8.2f}{lo:>8.2f}{hi:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
