"""What the two interleaved benchmarks share (``bench_interleaved.py``, heat;
``bench_training_interleaved.py``, training): running the one ``mpiexec`` job whose
ranks alternate checkpointed and plain blocks, and printing its pairs."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_async import python_env, stop_backends

REPO = Path(__file__).resolve().parents[2]


def run_job(app_text, ranks, job_args, shm, disk, timeout, async_mode, env_extra=None):
    """Write ``app_text`` to ``disk``, run it on ``ranks`` ranks as ``app REPO *job_args
    OUT`` (the app writes its JSON to OUT), stop the backends it started, return the JSON."""
    from benchlib import find_mpiexec
    mpiexec = find_mpiexec()
    if not mpiexec:
        sys.exit(f"{Path(sys.argv[0]).name}: no mpiexec (pip install mpich)")
    app, out, runtime = disk / "app.py", disk / "out.json", disk / "runtime"
    app.write_text(app_text)
    runtime.mkdir(mode=0o700)
    env = python_env({"VELOC_RUNTIME_DIR": str(runtime)})
    for key, value in (env_extra or {}).items():
        env.setdefault(key, value)
    cmd = [mpiexec, "-n", str(ranks), sys.executable, str(app), str(REPO), *map(str, job_args), str(out)]
    try:
        subprocess.run(cmd, check=True, timeout=timeout, cwd=disk, env=env)
    finally:
        if async_mode:
            stop_backends({"scratch": f"{shm}/scratch", "mode": "async"}, runtime)
    return json.loads(out.read_text())


def add_common_args(parser):
    """The options both interleaved benchmarks take."""
    parser.add_argument("--warmup", type=int, default=2, help="A blocks before the timed pairs (default 2)")
    parser.add_argument("--pairs", type=int, default=8, help="timed A/B pairs (default 8)")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--disk-dir", default="/tmp")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the figures to this file")


def run_pairs(block, warmup, pairs, load=os.getloadavg, floor=False):
    """In the job, on every rank: ``warmup`` checkpointed blocks, then ``pairs`` pairs in
    the order A B, B A, A B, ... (``block(True)`` is A); one record per pair. ``floor``:
    every pair also runs ``block("floor")`` (F: the same bytes moved by the cheapest means,
    nothing else), as A B F, F B A, ..., so the plain block sits between the other two."""
    for _ in range(warmup):
        block(True)
    kinds = (True, False, "floor") if floor else (True, False)
    records = []
    for p in range(pairs):
        order = kinds if p % 2 == 0 else kinds[::-1]
        got = {kind: block(kind) for kind in order}
        record = {"pair": p, "a_first": order[0] is True, "a": got[True], "b": got[False], "load": load()[0]}
        if floor:
            record["f"] = got["floor"]
        records.append(record)
    return records


def pair_summary(records):
    """Overheads per pair from records whose ``a``/``b`` (and ``f``) are ``(wall, ..., cpu, ...)``."""
    over = [r["a"][0] / r["b"][0] - 1 for r in records]
    cpu = [r["a"][2] / r["b"][2] - 1 for r in records]
    out = {"overhead": over, "cpu_overhead": cpu, "median_overhead": statistics.median(over),
           "median_cpu_overhead": statistics.median(cpu), "loads": [r["load"] for r in records],
           "b_seconds": [r["b"][0] for r in records]}
    if records and "f" in records[0]:
        floor = [r["f"][0] / r["b"][0] - 1 for r in records]
        beyond = [r["a"][0] / r["f"][0] - 1 for r in records]
        out.update(floor_overhead=floor, median_floor_overhead=statistics.median(floor),
                   beyond_floor=beyond, median_beyond_floor=statistics.median(beyond))
    return out


def pct(value):
    return f"{value:+.1%}"


def print_pairs(summary):
    """The overhead and CPU lines of a summary with ``overhead``/``cpu_overhead`` pairs."""
    print(f"  overhead (A/B - 1), median   {pct(summary['median_overhead'])}   pairs: "
          + ", ".join(map(pct, summary["overhead"])))
    print(f"  CPU time of the ranks, median {pct(summary['median_cpu_overhead'])}   pairs: "
          + ", ".join(map(pct, summary["cpu_overhead"])))
    if "floor_overhead" in summary:
        print(f"  floor (F/B - 1), median      {pct(summary['median_floor_overhead'])}   pairs: "
              + ", ".join(map(pct, summary["floor_overhead"])))
        print(f"  beyond the floor (A/F - 1)   {pct(summary['median_beyond_floor'])}   pairs: "
              + ", ".join(map(pct, summary["beyond_floor"])))


def print_load_and_save(summary, args, load, doc):
    print(f"  plain block seconds: {min(summary['b_seconds']):.2f}..{max(summary['b_seconds']):.2f}; "
          f"load average during the pairs {min(summary['loads']):.1f}..{max(summary['loads']):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_at_start": load, **doc,
                                               "summary": summary}, indent=1))
