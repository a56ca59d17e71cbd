"""``veloc plan CFG``: measured cost per configured level and the intervals a multi-level
model predicts from them.

Run by a user on one node, outside the application (no MPI). For each level the
configuration enables, the cost of one checkpoint of ``--size`` bytes per rank:

* scratch and persistent are **measured**: a test payload is written (and fsynced) to a
  temporary file under the level's folder, ``--reps`` times; scratch is timed when it
  overwrites an already-allocated file, as veloc's recycled scratch files are;
* partner and erasure need other nodes, which one process cannot reach, so they are
  **estimated** from figures measured here: a copy over the network at ``--net-gbps``
  (default: this machine's memory-copy bandwidth, an optimistic stand-in) plus a scratch
  write at the receiver (erasure: plus one XOR pass, and a ``1/(group_size-1)`` share of
  parity written).

Failure rates come from ``--mtbf-process`` (failures a scratch copy survives; default:
``[policy] mtbf``), ``--mtbf-node`` (a lost node: partner and erasure) and
``--mtbf-system`` (every node-local copy lost: persistent). Each level with a failure
rate gets its Young interval ``sqrt(2 C MTBF)``, nested so each period is a whole
multiple of the faster level's, and its share of the run time lost (see
``veloc.training.interval_models``). Nothing of the application's checkpoints is read or
changed.
"""
import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from veloc.cli.inspect import UsageError
from veloc.config import load_config, node_id
from veloc.storage.fileio import FILE_MODE, make_dirs
from veloc.errors import VelocError
from veloc.training.interval_models import multilevel_plan

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]?)(i?[bB])?\s*", text)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64M, 1G or 4096 (bytes, > 0)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _duration(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 3600, 90m, 6h or 7d (> 0)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def plan_args(p):
    p.add_argument("cfg", metavar="CFG", help="the application's veloc INI configuration file")
    p.add_argument("--size", type=_size, default=64 << 20, help="checkpoint bytes per rank (default 64M)")
    p.add_argument("--reps", type=int, default=3, choices=range(1, 101), metavar="N",
                   help="timed writes per level; the median is used (default 3)")
    p.add_argument("--mtbf-process", type=_duration, metavar="T",
                   help="mean time between failures a scratch copy survives (default: [policy] mtbf)")
    p.add_argument("--mtbf-node", type=_duration, metavar="T", help="mean time between node losses")
    p.add_argument("--mtbf-system", type=_duration, metavar="T",
                   help="mean time between failures that lose every node-local copy")
    p.add_argument("--net-gbps", type=_positive, metavar="GB/s",
                   help="network bandwidth for the partner/erasure estimates (default: memory-copy bandwidth)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.epilog = "T accepts s, m, h, d suffixes (default seconds). Costs assume the whole state is written per rank."


def _timed_writes(key, folder, payload, reps, overwrite):
    """Median seconds to write ``payload`` into a temporary file under ``folder`` and fsync."""
    try:
        make_dirs(folder)
    except VelocError as exc:
        reason = getattr(exc.__cause__, "strerror", None) or str(exc)
        raise UsageError(f"{key} folder {folder} (config key '{key}') cannot be created: {reason}") from None
    path = Path(folder) / f".veloc-plan-{os.getpid()}.tmp"
    times = []
    try:
        for _ in range(reps + (1 if overwrite else 0)):
            start = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if overwrite else os.O_TRUNC), FILE_MODE)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view[:1 << 26]):]
                os.fsync(fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
            if not overwrite:
                os.unlink(path)
    except OSError as exc:
        raise UsageError(f"cannot write a {len(payload)}-byte test file in {folder} (config key '{key}'): "
                         f"{exc.strerror}") from None
    finally:
        if path.exists():
            path.unlink()
    return float(np.median(times[1:] if overwrite else times))


def _copy_seconds(payload, reps):
    out = np.empty_like(payload)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        np.copyto(out, payload)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def measure_levels(config, size, reps, net_gbps=None):
    """``[(level, cost_s, how)]`` for every level ``config`` enables, fastest first."""
    node = node_id()
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    copy_s = _copy_seconds(payload, reps)
    scratch_s = _timed_writes("scratch", config.scratch_dir(node, 0), payload, reps, overwrite=True)
    net_s = size / (net_gbps * 1e9) if net_gbps else copy_s
    net_how = f"network at {net_gbps:g} GB/s" if net_gbps else "network taken as fast as a local copy"
    levels = [("scratch", scratch_s, "measured: overwrite of a recycled file + fsync")]
    if config.section("partner").get("enabled"):
        levels.append(("partner", net_s + scratch_s, f"estimated: {net_how} + a scratch write"))
    erasure = config.section("erasure")
    if erasure.get("enabled"):
        share = 1.0 / max(1, erasure["group_size"] - 1)
        levels.append(("erasure", net_s + copy_s + share * scratch_s,
                       f"estimated: {net_how} + one XOR pass + 1/{erasure['group_size'] - 1} parity write"))
    if config.persistent is not None and config.persistent_interval >= 0:
        persistent_s = _timed_writes("persistent", config.persistent_dir(node, 0), payload, reps, overwrite=False)
        levels.append(("persistent", persistent_s, "measured: new file + fsync"))
    return levels, copy_s


def run_plan(args):
    config = load_config(args.cfg)
    levels, copy_s = measure_levels(config, args.size, args.reps, args.net_gbps)
    mtbf = {"scratch": args.mtbf_process or config.section("policy").get("mtbf"), "partner": args.mtbf_node,
            "erasure": args.mtbf_node, "persistent": args.mtbf_system}
    modelled = [(name, cost, mtbf[name]) for name, cost, _ in levels if mtbf[name]]
    plans = {p.name: p for p in multilevel_plan(modelled)}
    rows = []
    for name, cost, how in levels:
        p = plans.get(name)
        rows.append({"level": name, "cost_s": cost, "how": how, "mtbf_s": mtbf[name],
                     "young_s": p.young if p else None, "period_s": p.period if p else None,
                     "every": p.multiple if p else None, "overhead": p.overhead if p else None})
    total = sum(p.overhead for p in plans.values())
    if args.json:
        print(json.dumps({"size": args.size, "copy_s": copy_s, "levels": rows, "total_overhead": total}, indent=1))
        return 0
    print(f"# {args.size} bytes per rank; np.copyto of it here: {copy_s:.4f} s "
          f"({args.size / copy_s / 1e9:.2f} GB/s)")
    table = [("LEVEL", "COST", "MTBF", "YOUNG", "PERIOD", "EVERY", "OVERHEAD", "HOW")]
    for r in rows:
        modelled = r["period_s"] is not None
        table.append((r["level"], f"{r['cost_s']:.4f} s", _hours(r["mtbf_s"]),
                      _span(r["young_s"]) if modelled else "-", _span(r["period_s"]) if modelled else "-",
                      f"x{r['every']}" if modelled else "-", f"{100 * r['overhead']:.3f} %" if modelled else "-",
                      r["how"]))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    if plans:
        print(f"predicted overhead, all modelled levels: {100 * total:.3f} % "
              "(checkpoint time + expected re-execution, first order)")
    missing = [r["level"] for r in rows if r["period_s"] is None]
    if missing:
        print(f"no failure rate for {', '.join(missing)}: give --mtbf-process (scratch), --mtbf-node "
              "(partner, erasure), --mtbf-system (persistent) to model them")
    return 0


def _hours(seconds):
    return "-" if not seconds else f"{seconds / 3600:g} h"


def _span(seconds):
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"
