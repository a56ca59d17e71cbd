#!/usr/bin/env python
"""Snapshot stall of numpy training state, as a ratio to one ``np.copyto`` of the same bytes.

One process (``init_single``, sync mode, scratch on tmpfs, no persistent level), a state
of ``--mib`` MiB of float32 arrays split over ``--arrays`` arrays. For every round, on
the same data:

* ``copyto``: one ``np.copyto`` of the whole state into a preallocated buffer (the
  machine's own limit for taking a consistent copy, measured in the same run);
* ``blocking``: ``snapshot()`` then ``wait_snapshot()`` at once (no compute to hide
  the copy behind: the worst case);
* ``overlapped``: ``snapshot()``, then ``--compute-ms`` of numpy compute that does not
  touch the state (forward/backward), then ``with guard():`` (the weight update). The
  stall is the time spent inside ``snapshot()`` plus inside the guard.

Before each measurement the previous persist is awaited (untimed), so nothing else
competes for memory bandwidth. Reported: median over rounds, in ms and as ``stall / copyto``.

    python scripts/bench/bench_snapshot.py                  # 64 MiB, 8 arrays, 9 rounds
    python scripts/bench/bench_snapshot.py --mib 256 --rounds 5 --compute-ms 200
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import veloc  # noqa: E402


def compute(ms, work):
    """About ``ms`` of numpy work on ``work`` (not the protected state)."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        work @ work


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--compute-ms", type=float, default=100.0)
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--json", metavar="OUT", help="also write every round's seconds to OUT")
    args = parser.parse_args()
    per = (args.mib << 20) // 4 // args.arrays
    state = [np.random.default_rng(i).random(per, dtype=np.float32) for i in range(args.arrays)]
    flat_src = [s.view(np.uint8) for s in state]
    reference = np.empty(sum(s.nbytes for s in state), np.uint8)
    reference[::4096] = 0
    work = np.random.default_rng(0).random((96, 96))
    tmp = tempfile.mkdtemp(prefix="veloc-bench-snap-", dir=args.shm_dir)
    rows = {"copyto": [], "blocking": [], "overlapped": [], "in snapshot()": [], "in guard": []}
    try:
        with veloc.init_single(0, {"scratch": tmp + "/{node}", "scratch_versions": 2}) as c:
            for i, arr in enumerate(state):
                c.protect(f"w{i}", arr)
            version = 0
            c.snapshot("b", version)          # warm-up: allocates the staging buffer once
            c.checkpoint_wait()
            for _ in range(args.rounds):
                c.checkpoint_wait()                   # no persist competes with the reference copy
                start = time.perf_counter()
                offset = 0
                for src in flat_src:
                    np.copyto(reference[offset:offset + src.size], src)
                    offset += src.size
                rows["copyto"].append(time.perf_counter() - start)

                version += 1
                c.checkpoint_wait()
                start = time.perf_counter()
                c.snapshot("b", version)
                c.wait_snapshot()
                rows["blocking"].append(time.perf_counter() - start)

                version += 1
                c.checkpoint_wait()
                start = time.perf_counter()
                c.snapshot("b", version)
                in_snapshot = time.perf_counter() - start
                compute(args.compute_ms, work)
                start = time.perf_counter()
                with c.guard():
                    in_guard = time.perf_counter() - start
                    for arr in state:
                        arr += 1e-3                   # the weight update
                rows["in snapshot()"].append(in_snapshot)
                rows["in guard"].append(in_guard)
                rows["overlapped"].append(in_snapshot + in_guard)
            c.checkpoint_wait()
            allocations = c.snapshot_stats["allocations"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copy = statistics.median(rows["copyto"])
    print(f"state {args.mib} MiB in {args.arrays} float32 arrays, {args.rounds} rounds, "
          f"compute {args.compute_ms:.0f} ms between snapshot and guard; staging allocations: {allocations}")
    print(f"{'':<16}{'median ms':>12}{'x copyto':>12}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<16}{med * 1e3:>12.2f}{med / copy:>12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mib": args.mib, "arrays": args.arrays, "rounds": args.rounds, "compute_ms": args.compute_ms,
            "allocations": allocations, "load_average": os.getloadavg()[0], "seconds": rows,
            "x_copyto": {k: statistics.median(v) / copy for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
