#!/usr/bin/env python
"""Run every benchmark in scripts/bench; write one JSON, a markdown table of ratios and plots.

    python scripts/bench/run_all.py --quick              # a few minutes: small sizes, one pair
    python scripts/bench/run_all.py --out bench-out      # the full set (about an hour on 2 cores)
    python scripts/bench/run_all.py --only checkpoint_sync,async_heat
    python scripts/bench/run_all.py --out DIR --replot --readme README.md   # table into the README

Each benchmark runs as its own process, one after another (they would disturb each other
otherwise), with its output kept in ``<out>/<name>.log`` and its raw figures in
``<out>/<name>.json``. Then:

- ``<out>/results.json``: the command, machine, load averages, every benchmark's raw
  figures and the table rows;
- ``<out>/results.md``: one markdown table of ratios against this machine's own limits
  measured in the same run (``np.copyto`` of the same bytes, raw file writes and reads),
  with the spread over repetitions or pairs and the load average;
- ``<out>/blocking_vs_size.png`` (blocking time of ``checkpoint()`` per size, sync and
  async, against ``np.copyto``) and ``<out>/overhead_per_config.png`` (loop-time
  overhead of the heat and training loops per configuration), when matplotlib is
  installed; without it the plots are skipped with a message (``pip install 'veloc[bench]'``).

``--readme FILE`` replaces the block between ``<!-- run_all:begin -->`` and
``<!-- run_all:end -->`` in FILE with that table (of the rows given per size, the 256 MiB
ones), so the README's figures are generated, never typed. ``--keep`` keeps the results of benchmarks already in ``--out`` that this
call does not run (e.g. a long benchmark rerun alone after the others).

A benchmark that fails or runs past ``--timeout`` is recorded as failed (its log says
why) and the others still run; the exit status is 1 if any failed.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import bench_summary as summary

HERE = Path(__file__).resolve().parent

# name: (script, common args, quick args, full args, writes --json)
BENCHMARKS = {
    "checkpoint_sync": ("bench_checkpoint.py", ["--mode", "sync"],
                        ["--sizes", "64M,256M", "--reps", "2", "--settle", "0.5"],
                        ["--sizes", "64M,256M,1G", "--reps", "5"], True),
    "checkpoint_async": ("bench_checkpoint.py", ["--mode", "async"],
                         ["--sizes", "64M,256M", "--reps", "2", "--settle", "0.5"],
                         ["--sizes", "64M,256M,1G", "--reps", "5"], True),
    "async_blocking": ("bench_async.py", ["--part", "blocking"],
                       ["--sizes", "64M,256M", "--versions", "5", "--back-to-back", "2"],
                       [], True),
    "async_heat": ("bench_async.py", ["--part", "heat"],
                   ["--pairs", "1", "--steps", "100", "--heat-mib", "64"],
                   ["--pairs", "5", "--steps", "400"], True),
    "async_heat_scratch_only": ("bench_async.py", ["--part", "heat", "--no-persistent"],
                                ["--pairs", "1", "--steps", "100", "--heat-mib", "64"],
                                ["--pairs", "3", "--steps", "400"], True),
    "async_interleaved": ("bench_interleaved.py", [], ["--mib", "64", "--pairs", "4"], [], True),
    "async_interleaved_scratch_only": ("bench_interleaved.py", ["--no-persistent"], ["--mib", "64", "--pairs", "4"],
                                       [], True),
    "training": ("bench_training.py", [],
                 ["--pairs", "1", "--epochs", "1", "--steps-per-epoch", "30", "--state-mib", "16",
                  "--timed-from", "10"], ["--pairs", "3"], True),
    "training_interleaved": ("bench_training_interleaved.py", [], ["--state-mib", "16", "--pairs", "4",
                                                                    "--block", "60"], ["--pairs", "6"], True),
    "snapshot": ("bench_snapshot.py", [], ["--mib", "32", "--rounds", "3"], [], True),
    "redundancy": ("bench_redundancy.py", [], ["--mib", "8", "--reps", "2"], [], False),
    "erasure_codecs": ("bench_erasure_codecs.py", [], ["--quick"], [], False),
    "async_levels": ("bench_async_levels.py", [], ["--mib", "8", "--versions", "4"], [], False),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and one pair: a few minutes")
    ap.add_argument("--out", default=None, help="output folder (default bench-results/<UTC time>)")
    ap.add_argument("--only", default=None, help=f"comma list of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="", help="comma list of benchmarks not to run")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default 900 with --quick, 5400 without)")
    ap.add_argument("--readme", default=None, metavar="FILE",
                    help="write the results table into FILE between the run_all markers")
    ap.add_argument("--keep", action="store_true",
                    help="keep results already in --out for benchmarks not run now")
    ap.add_argument("--replot", action="store_true",
                    help="only rebuild results.md and the plots from the JSON files already in --out")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names + [n for n in args.skip.split(",") if n] if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = [n for n in names if n not in args.skip.split(",")]
    if args.out is None:
        if args.replot:
            ap.error("--replot needs --out")
        args.out = str(Path("bench-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    if args.timeout is None:
        args.timeout = 900.0 if args.quick else 5400.0
    return args


def run_one(name, args, out):
    script, common, quick, full, writes_json = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *common, *(quick if args.quick else full)]
    json_path = out / f"{name}.json"
    if writes_json:
        cmd += ["--json", str(json_path)]
    record = {"command": " ".join(cmd), "load_before": os.getloadavg()[0]}
    print(f"[run_all] {name}: {record['command']}", flush=True)
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=HERE.parent.parent)
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = None
            record["error"] = f"ran past --timeout {args.timeout:g} s"
    record["seconds"] = round(time.monotonic() - start, 1)
    record["load_after"] = os.getloadavg()[0]
    record["ok"] = record["returncode"] == 0
    if record["ok"] and writes_json and json_path.exists():
        record["data"] = json.loads(json_path.read_text())
    elif not record["ok"]:
        record.setdefault("error", f"exit status {record['returncode']}; see {name}.log")
    print(f"[run_all] {name}: {'ok' if record['ok'] else 'FAILED (' + record['error'] + ')'} "
          f"in {record['seconds']:.0f} s", flush=True)
    return record


BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def update_readme(path, table, out):
    """Replace the text between the run_all markers of ``path`` with ``table``."""
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"run_all: {path} needs exactly one {BEGIN} ... {END} block")
    # no H1 inside; of the per-size rows, the README keeps the 256 MiB ones (results.md has all)
    table = "\n".join(line for line in table.splitlines() if not line.startswith("# ")
                      and not ("MiB/rank" in line and "256 MiB/rank" not in line))
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    note = f"<!-- generated by scripts/bench/run_all.py from {out}/results.json; do not edit by hand -->\n"
    path.write_text(f"{head}{BEGIN}\n{note}{table.strip()}\n{END}{tail}")
    print(f"[run_all] results table written into {path}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        doc = json.loads((out / "results.json").read_text())
    else:
        kept = {}
        if args.keep and (out / "results.json").exists():
            kept = json.loads((out / "results.json").read_text())["benchmarks"]
        doc = {"command": " ".join([sys.executable] + sys.argv), "quick": args.quick,
               "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_at_start": os.getloadavg(), "benchmarks": kept}
        for name in args.names:
            doc["benchmarks"][name] = run_one(name, args, out)
            (out / "results.json").write_text(json.dumps(doc, indent=1))   # whatever exists so far
    doc["rows"] = summary.rows(doc["benchmarks"])
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(summary.markdown(doc))
    print((out / "results.md").read_text())
    if args.readme:
        update_readme(Path(args.readme), summary.markdown(doc), out)
    for message in summary.plots(doc, out):
        print(f"[run_all] {message}")
    failed = [n for n, r in doc["benchmarks"].items() if not r.get("ok")]
    if failed:
        print(f"[run_all] failed: {', '.join(failed)} (see their logs in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
