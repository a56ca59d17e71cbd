#!/usr/bin/env python
"""Training checkpoint cost: ``examples/train.py`` with two-phase snapshots against the same
run without checkpoints, for the fixed and the auto interval policy.

Each pair runs, back to back and in rotating order, ``train.py --no-checkpoint`` (plain),
the same with ``[policy] mode = fixed, interval = --fixed-interval`` and with ``mode =
auto, overhead = --overhead``, on ``--ranks`` ranks under mpiexec, numpy back end, with a
model sized so that the checkpointed state (weights and both Adam moments) is
``--state-mib`` MiB per rank. Scratch goes to a fresh folder on tmpfs, persistent to one
on disk (``--mode`` sync: the engine runs in the ranks' persist threads; async: in the
node's backend).

Reported per policy, as ratios measured in the same run:

* overhead: the training loop time (``train.py`` own timer; from step ``--timed-from``
  on for "steady", whole loop for "all") over the plain run of the same pair, minus 1;
  median and spread (min..max) over the pairs;
* stall per checkpoint: what the loop waited for ``snapshot()`` and ``wait_snapshot()``
  per checkpoint, divided by one ``np.copyto`` of the whole state, measured by rank 0 at
  the end of the same run (median over checkpoints and pairs, and the max; each run's
  first snapshot, which allocates the staging buffers, is left out);
* CPU overhead: the CPU seconds all ranks spent in the loop (every thread, so the copy
  and persist threads too; in async mode not the backend's) over the plain run's, minus
  1: unlike wall time, barely moved by other jobs on a shared machine;
* the machine's load (``os.getloadavg``, 1 min) before each run.

The ranks run one BLAS thread each unless ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/
``MKL_NUM_THREADS`` say otherwise: numpy's default of a thread per core per rank
oversubscribes a node that runs a rank per core, and made the same run vary by ±10 %.

    python scripts/bench/bench_training.py                 # 72 MiB, 3 pairs
    python scripts/bench/bench_training.py --state-mib 128 --pairs 5 --mode async

Targets (CheckFreq's): auto at a 5 % bound stays under 3.5 % overhead; a stall per
checkpoint of at most one memcpy of the state (ratio <= 1).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import find_mpiexec

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "train.py"
FEATURES, OUTPUTS = 1024, 16
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mib", type=int, default=72, help="checkpointed state per rank (>= 64 for the target)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="samples per rank per step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--timed-from", type=int, default=20, help="first step of the steady-state figure")
    p.add_argument("--fixed-interval", type=int, default=10, help="[policy] interval of the fixed runs")
    p.add_argument("--overhead", type=float, default=0.05, help="[policy] overhead of the auto runs")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    p.add_argument("--json", help="also write every run's figures to this file")
    args = p.parse_args(argv)
    if args.state_mib < 1 or args.pairs < 1 or args.ranks < 1:
        p.error("--state-mib, --pairs and --ranks must be >= 1")
    return args


def model_args(args):
    hidden = math.ceil(args.state_mib * (1 << 20) / (3 * 4 * (FEATURES + 1 + OUTPUTS)))
    samples = args.steps_per_epoch * args.ranks * args.batch
    return ["--backend", "numpy", "--features", FEATURES, "--outputs", OUTPUTS, "--hidden", hidden,
            "--samples", samples, "--batch", args.batch, "--epochs", args.epochs, "--timed-from", args.timed_from]


def run_once(args, work, kind, index):
    out = work / f"{kind}-{index}.json"
    cmd = [find_mpiexec(), "-n", str(args.ranks), sys.executable, str(TRAIN), *map(str, model_args(args)),
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for var in THREAD_VARS:       # one BLAS thread per rank, as an MPI job with a rank per core runs
        env.setdefault(var, "1")
    if kind == "plain":
        cmd.append("--no-checkpoint")
    else:
        cfg = work / f"{kind}.ini"
        scratch, persistent = work / "shm" / kind, work / "disk" / kind
        for d in (scratch, persistent):
            shutil.rmtree(d, ignore_errors=True)
        policy = (f"mode = fixed\ninterval = {args.fixed_interval}\n" if kind == "fixed"
                  else f"mode = auto\noverhead = {args.overhead}\n")
        cfg.write_text(f"scratch = {scratch}/{{node}}\npersistent = {persistent}\nmode = {args.mode}\n"
                       f"scratch_versions = 2\nmax_versions = 2\n\n[policy]\n{policy}")
        cmd += ["--config", str(cfg)]
        env["VELOC_RUNTIME_DIR"] = str(work / "runtime")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"bench_training: {kind} run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    figures = json.loads(out.read_text())
    figures.update(kind=kind, pair=index, load=load)
    if kind != "plain" and args.mode == "async":
        stop_backends(cfg, env)
    return figures


def stop_backends(cfg, env):
    from veloc_backend import control
    for ep, _ in control.job_backends(cfg, env):
        control.shutdown(ep, drain_first=True)


def summarize(runs, args):
    plain = {r["pair"]: r for r in runs if r["kind"] == "plain"}
    state = runs[0]["state_bytes"]
    print(f"# examples/train.py, numpy, {args.ranks} ranks, {state / (1 << 20):.0f} MiB checkpointed state per "
          f"rank, {runs[0]['steps']} steps, {args.mode} mode, {args.pairs} interleaved pairs")
    base = [plain[i]["timed_seconds"] for i in plain]
    print(f"plain loop (steady, from step {args.timed_from}): median {statistics.median(base):.2f} s; "
          f"np.copyto of the state: median {statistics.median(r['copyto_seconds'] for r in runs) * 1e3:.1f} ms")
    rows = [("POLICY", "OVERHEAD steady", "(spread)", "OVERHEAD all", "CPU", "(spread)", "CKPTS",
             "STALL/copyto med", "max", "LOAD")]
    for kind in ("fixed", "auto"):
        mine = [r for r in runs if r["kind"] == kind]
        steady = [r["timed_seconds"] / plain[r["pair"]]["timed_seconds"] - 1 for r in mine]
        whole = [r["seconds"] / plain[r["pair"]]["seconds"] - 1 for r in mine]
        cpu = [r["cpu_seconds"] / plain[r["pair"]]["cpu_seconds"] - 1 for r in mine]
        ratios = [s / r["copyto_seconds"] for r in mine for s in r["stalls"][1:]]   # the first allocates
        label = f"fixed k={args.fixed_interval}" if kind == "fixed" else f"auto {100 * args.overhead:g} %"
        rows.append((label, f"{100 * statistics.median(steady):+.2f} %",
                     f"{100 * min(steady):+.2f}..{100 * max(steady):+.2f}",
                     f"{100 * statistics.median(whole):+.2f} %", f"{100 * statistics.median(cpu):+.2f} %",
                     f"{100 * min(cpu):+.2f}..{100 * max(cpu):+.2f}",
                     "/".join(str(r["checkpoints"]) for r in mine),
                     f"{statistics.median(ratios):.2f}" if ratios else "-", f"{max(ratios):.2f}" if ratios else "-",
                     "/".join(f"{r['load']:.1f}" for r in mine)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    auto = [r for r in runs if r["kind"] == "auto"]
    if auto and auto[-1].get("policy"):
        d = auto[-1]["policy"]
        print(f"auto's last decision: k={d.get('k')} Ti={d.get('Ti')} stall={d.get('stall')} "
              f"persist={d.get('persist')} ({d.get('reason')})")
    print("load (1 min) before the plain runs: " + "/".join(f"{plain[i]['load']:.1f}" for i in sorted(plain)))


def main(argv=None):
    args = parse_args(argv)
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-train-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-train-", dir=args.disk_dir))
    (disk / "shm").symlink_to(shm)
    runs = []
    try:
        order = ["plain", "fixed", "auto"]
        for index in range(args.pairs):
            for kind in order:
                runs.append(run_once(args, disk, kind, index))
                print(f"  pair {index} {kind}: loop {runs[-1]['seconds']:.2f} s, steady "
                      f"{runs[-1]['timed_seconds']:.2f} s, {runs[-1]['checkpoints']} checkpoints, "
                      f"load {runs[-1]['load']:.1f}", file=sys.stderr, flush=True)
            order = order[1:] + order[:1]          # rotate which kind goes first
        summarize(runs, args)
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=1))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
