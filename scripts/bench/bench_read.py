#!/usr/bin/env python3
"""Read API: ``veloc.open`` (digest check) and ``read_global`` (stitching) against this
machine's own limits, measured in the same run, single process, no MPI.

A global float64 array of ``--size`` bytes is checkpointed on tmpfs scratch by ``--ranks``
``init_single`` processes' worth of slabs (row blocks of uneven height). Then, per
repetition, with the scratch files in the page cache:

- ``open(verify=True)`` against one xxh3_128 pass over the same bytes (the hash limit);
- ``read_global`` against one ``np.copyto`` of the same bytes into a fresh array;
- ``export`` (when h5py is installed) against ``np.copyto``, and the file's size.

Prints the median and best time of each and its ratio (limit time / operation time;
1.0 = as fast as the limit). Example::

    .venv/bin/python scripts/bench/bench_read.py --size 512M --ranks 4 --reps 5
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import xxhash

from benchlib import human, parse_size

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import veloc  # noqa: E402


def timed(fn, reps):
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=parse_size("256M"), help="global array bytes")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shm-dir", default="/dev/shm")
    args = p.parse_args()
    base = tempfile.mkdtemp(prefix="veloc-bench-read-", dir=args.shm_dir)
    try:
        cols = 1024
        rows = args.size // 8 // cols
        full = np.random.default_rng(0).random((rows, cols))
        cuts = np.linspace(0, rows, args.ranks + 1).astype(int)
        cuts[1:-1] += np.arange(1, args.ranks) % 3      # uneven slabs
        cfg = {"scratch": f"{base}/{{node}}", "scratch_versions": "1"}
        for rank in range(args.ranks):
            with veloc.init_single(rank, cfg) as client:
                client.protect("g", full[cuts[rank]:cuts[rank + 1]], global_shape=full.shape,
                               offset=(int(cuts[rank]), 0))
                client.checkpoint("bench", 1)
        nbytes = full.nbytes

        def open_verify():
            veloc.open(cfg, "bench").close()

        def read_global():
            with veloc.open(cfg, "bench", verify=False) as view:
                view.read_global("g")

        def copy_limit():
            np.copyto(np.empty_like(full), full)

        def hash_limit():
            xxhash.xxh3_128(memoryview(full)).hexdigest()

        rows_out = [("xxh3_128 (limit)", timed(hash_limit, args.reps), None),
                    ("open(verify=True)", timed(open_verify, args.reps), "xxh3_128 (limit)"),
                    ("np.copyto (limit)", timed(copy_limit, args.reps), None),
                    ("read_global", timed(read_global, args.reps), "np.copyto (limit)")]
        try:
            import h5py  # noqa: F401
            from veloc.cli.export import export_version
            out = os.path.join(base, "out.h5")

            def export():
                with veloc.open(cfg, "bench", verify=False) as view:
                    export_version(view, out, force=True)
            rows_out.append(("export (h5py)", timed(export, args.reps), "np.copyto (limit)"))
        except ImportError:
            print("h5py not installed: export not measured")
        medians = {name: statistics.median(t) for name, t, _ in rows_out}
        print(f"global array {human(nbytes)} ({rows}x{cols} float64) in {args.ranks} slabs, {args.reps} reps")
        print(f"{'operation':<20} {'median s':>9} {'best s':>9} {'GB/s':>7} {'x limit':>8}")
        for name, times, limit in rows_out:
            med = medians[name]
            ratio = f"{medians[limit] / med:.2f}" if limit else "1.00"
            print(f"{name:<20} {med:>9.4f} {min(times):>9.4f} {nbytes / med / 1e9:>7.2f} {ratio:>8}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
