#!/usr/bin/env python
"""Async mode speed, as ratios to this machine's own limits measured in the same run.

Part ``blocking`` (2 ranks under mpiexec, one node, the node's backend started by the
ranks): per-rank blocking bandwidth of ``checkpoint()`` in async mode against
``np.copyto`` of the same bytes into a preallocated buffer. Scratch on tmpfs,
persistent on disk, ``scratch_versions = 2`` (old versions' files are recycled for new
ones). For every version: ``checkpoint_wait()`` (untimed: the backend is idle), barrier,
timed ``np.copyto`` on every rank, barrier, timed ``checkpoint()``. v1-v3 write fresh
tmpfs pages (the backend recycles v1's file when it drops v1 after v3, keeping two
versions); from v4 on the local write reuses recycled, pre-faulted files ("steady"). Then a few ``checkpoint()`` calls back to back (each also waits for the
previous version's background checksum + flush: what an application that checkpoints
faster than its persistent storage sees). Times are the slowest rank's; GB/s = bytes
per rank / time; "x copyto" = median over versions of copyto time / checkpoint time.

Part ``heat``: ``examples/heat.py`` on 2 ranks with a grid of ``--heat-mib`` MiB per
rank, checkpointing every ``--every`` iterations in async mode (scratch on tmpfs,
persistent on disk), against the same run with ``--no-checkpoint``; runs alternate
(plain, async, async, plain, ...). Reported: heat's own loop time (includes the blocking
part of every checkpoint, not ``veloc.init`` nor the final drain), the time the loop
spent inside ``checkpoint()``, and the whole ``mpiexec`` wall time (includes starting
the backend and draining the last version at exit). Overhead = async / plain - 1 per
adjacent pair, median over pairs. The loop time is also reported from iteration
``every * (scratch_versions + 1)`` on ("steady"): the first ``scratch_versions + 1``
checkpoints write freshly allocated tmpfs pages, which on this VM cost a host page
fault each (about 0.35 GB/s, see bench_checkpoint's "fresh" rows); later ones reuse
those files, as every checkpoint of a long run does.

    python scripts/bench/bench_async.py                       # both parts, defaults below
    python scripts/bench/bench_async.py --part blocking --sizes 256M,1G --versions 6
    python scripts/bench/bench_async.py --part heat --heat-mib 256 --steps 200 --pairs 3

Every file goes to fresh folders under ``--shm-dir`` (/dev/shm) and ``--disk-dir``
(/tmp), removed at the end; the backends started are stopped. Memory: about 6 x size per
rank for ``blocking`` (array, copyto buffer, up to four scratch files).
"""
import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import GIB, MIB, find_mpiexec, human, parse_size

REPO = Path(__file__).resolve().parents[2]
HEAT_LINE = re.compile(r"heat: done at iteration (\d+) \((\d+) iterations in this run, ([\d.]+) s; "
                       r"(\d+) checkpoints, ([\d.]+) s\); after iteration \d+: ([\d.]+) s, "
                       r"(\d+) checkpoints, ([\d.]+) s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("blocking", "heat", "all"), default="all")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                   default=[256 * MIB, GIB], help="bytes per rank (blocking part)")
    p.add_argument("--versions", type=int, default=9, help="isolated checkpoints per size (>= 4)")
    p.add_argument("--back-to-back", type=int, default=3, help="back-to-back checkpoints per size")
    p.add_argument("--scratch-versions", type=int, default=2,
                   help="scratch_versions of the runs (default 2, as in configs/async.ini)")
    p.add_argument("--heat-mib", type=int, default=256, help="heat grid MiB per rank")
    p.add_argument("--steps", type=int, default=200, help="heat iterations")
    p.add_argument("--every", type=int, default=20, help="heat checkpoint interval")
    p.add_argument("--pairs", type=int, default=3, help="heat (plain, async) run pairs")
    p.add_argument("--np", type=int, default=2, help="ranks")
    p.add_argument("--backend-args", default=None, metavar="ARGS",
                   help="heat part: start the node's backend here with these extra "
                        "veloc-backend arguments (e.g. '--nice 19'); default: the ranks start "
                        "it with its defaults")
    p.add_argument("--no-persistent", action="store_true", help="heat part: scratch only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="heat part: extra top-level config line for the async runs (repeatable), "
                        "e.g. --set max_parallelism=1")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    p.add_argument("--json", metavar="OUT", help="write every raw time to OUT")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.versions < 4:
        p.error("--versions must be >= 4 (v1-v3 fresh; steady from v4)")
    return opts


def python_env(extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def stop_backends(cfg, runtime):
    """Stop every backend of this bench job (they were started by the ranks)."""
    from veloc_backend import control
    env = dict(os.environ, VELOC_RUNTIME_DIR=str(runtime))
    for ep, st in control.job_backends(cfg, env):
        control.shutdown(ep, drain_first=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(st["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


# ---------------------------------------------------------------- part: blocking

def worker(opts):
    """Runs on every rank under mpiexec: prints one JSON line (rank 0) per size."""
    import numpy as np
    from mpi4py import MPI

    import veloc
    comm = MPI.COMM_WORLD
    shm, disk = Path(os.environ["BENCH_SHM"]), Path(os.environ["BENCH_DISK"])
    out = []
    for size in opts.sizes:
        tag = f"s{size}"
        cfg = {"scratch": str(shm / tag / "{node}"), "persistent": str(disk / tag),
               "mode": "async", "scratch_versions": opts.scratch_versions, "max_versions": 2}
        a = np.random.default_rng(comm.rank).random(size // 8)
        ref = np.empty_like(a)
        np.copyto(ref, a)                          # fault the reference buffer in once
        rows = {"size": size, "copyto": [], "isolated": [], "back_to_back": []}

        def slowest(seconds):
            return comm.allreduce(seconds, op=MPI.MAX)

        with veloc.init(cfg, comm) as ck:
            ck.protect("a", a)
            for v in range(1, opts.versions + opts.back_to_back + 1):
                a[0] = v
                isolated = v <= opts.versions
                if isolated:
                    ck.checkpoint_wait()           # background of the previous version: untimed
                comm.Barrier()
                t = time.perf_counter()
                np.copyto(ref, a)
                rows["copyto"].append(slowest(time.perf_counter() - t))
                comm.Barrier()
                t = time.perf_counter()
                ck.checkpoint("bench", v)
                rows["isolated" if isolated else "back_to_back"].append(slowest(time.perf_counter() - t))
            t = time.perf_counter()
            ck.checkpoint_wait()
            rows["final_wait"] = slowest(time.perf_counter() - t)
        del a, ref
        out.append(rows)
    if comm.rank == 0:
        print("BENCH " + json.dumps(out), flush=True)


def run_blocking(opts, shm, disk, runtime):
    env = python_env({"BENCH_SHM": str(shm), "BENCH_DISK": str(disk),
                      "VELOC_RUNTIME_DIR": str(runtime)})
    args = [find_mpiexec(), "-n", str(opts.np), sys.executable, __file__, "--worker",
            "--sizes", ",".join(str(s) for s in opts.sizes), "--versions", str(opts.versions),
            "--back-to-back", str(opts.back_to_back), "--scratch-versions", str(opts.scratch_versions)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"blocking part failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    for size in opts.sizes:
        stop_backends({"scratch": str(shm / f"s{size}" / "{node}"), "mode": "async"}, runtime)
    results = json.loads(line[6:])
    print(f"\n== checkpoint() blocking time, async mode, {opts.np} ranks, scratch {shm} (tmpfs), "
          f"persistent {disk}")
    for r in results:
        size, copy = r["size"], r["copyto"]
        n = len(r["isolated"])
        ratio = [copy[i] / r["isolated"][i] for i in range(n)]
        b2b = [copy[n + i] / t for i, t in enumerate(r["back_to_back"])]
        gbs = lambda t: size / t / 1e9            # noqa: E731
        print(f"\n{human(size)} per rank")
        print(f"  {'':36} {'GB/s/rank':>10} {'x copyto':>9}")
        print(f"  {'np.copyto (limit)':36} {gbs(statistics.median(copy)):10.2f} {1.0:9.2f}")
        print(f"  {'checkpoint() v1 (fresh scratch)':36} {gbs(r['isolated'][0]):10.2f} {ratio[0]:9.2f}")
        print(f"  {'checkpoint() v2 (fresh scratch)':36} {gbs(r['isolated'][1]):10.2f} {ratio[1]:9.2f}")
        print(f"  {'checkpoint() v3 (fresh scratch)':36} {gbs(r['isolated'][2]):10.2f} {ratio[2]:9.2f}")
        steady = r["isolated"][3:]
        print(f"  {f'checkpoint() steady, v4-v{n} (median)':36} {gbs(statistics.median(steady)):10.2f} "
              f"{statistics.median(ratio[3:]):9.2f}   (min {min(ratio[3:]):.2f}, max {max(ratio[3:]):.2f})")
        if b2b:
            print(f"  {'checkpoint() back to back (median)':36} "
                  f"{gbs(statistics.median(r['back_to_back'])):10.2f} {statistics.median(b2b):9.2f}"
                  "   (waits for the previous version's checksum + flush)")
    return results


# ---------------------------------------------------------------- part: heat

def heat_run(opts, rows, cols, cfg=None, runtime=None):
    args = [find_mpiexec(), "-n", str(opts.np), sys.executable, str(REPO / "examples" / "heat.py"),
            "--rows", str(rows), "--cols", str(cols), "--steps", str(opts.steps),
            "--timed-from", str(steady_from(opts))]
    args += ["--config", str(cfg), "--every", str(opts.every)] if cfg else ["--no-checkpoint"]
    env = python_env({"VELOC_RUNTIME_DIR": str(runtime)} if runtime else None)
    t = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of mpiexec and the ranks (their waited-for descendants), not of a backend
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    match = HEAT_LINE.search(proc.stdout)
    if proc.returncode or not match:
        raise SystemExit(f"heat run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return {"loop": float(match.group(3)), "ckpt": float(match.group(5)), "ranks_cpu": cpu,
            "load": os.getloadavg()[0],
            "checkpoints": int(match.group(4)), "wall": wall, "steady_loop": float(match.group(6)),
            "steady_checkpoints": int(match.group(7)), "steady_ckpt": float(match.group(8))}


def steady_from(opts):
    """The iteration after which the scratch files are recycled: the first
    ``scratch_versions + 1`` checkpoints write freshly allocated tmpfs pages."""
    return opts.every * (opts.scratch_versions + 1)


MODULE_LINE = re.compile(r"v\d+: (\w+) done in [\d.]+ s \(([\d.]+) s CPU\)")


def backend_cpu(logs):
    """``{module: CPU seconds}`` summed over every version, from the backend logs in ``logs``."""
    out = {}
    for path in Path(logs).glob("*.log"):
        for match in MODULE_LINE.finditer(path.read_text(errors="replace")):
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
    return out


def run_heat(opts, shm, disk, runtime):
    cols = 8192
    rows = opts.heat_mib * MIB * opts.np // (8 * cols)
    plain, async_ = [], []
    for i in range(opts.pairs):
        for kind in (("plain", "async") if i % 2 == 0 else ("async", "plain")):
            if kind == "plain":
                plain.append(heat_run(opts, rows, cols))
                continue
            tag = f"heat{i}"
            cfg = Path(shm) / f"{tag}.ini"
            lines = [f"scratch = {shm}/{tag}/{{node}}", "mode = async",
                     f"scratch_versions = {opts.scratch_versions}"]
            if not opts.no_persistent:
                lines += [f"persistent = {disk}/{tag}", "max_versions = 2"]
            logs = Path(disk) / f"{tag}-logs"
            if not any(item.split("=", 1)[0].strip() == "log_prefix" for item in opts.set):
                lines.append(f"log_prefix = {logs}")      # the backend's per-module CPU
            lines += [" = ".join(part.strip() for part in item.split("=", 1)) for item in opts.set]
            cfg.write_text("\n".join(lines) + "\n")
            if opts.backend_args is not None:     # start the node's backend here
                from veloc_backend import lifecycle
                lifecycle.ensure_backend(cfg, python_env({"VELOC_RUNTIME_DIR": str(runtime)}),
                                         extra_args=("--idle-exit", "300", *shlex.split(opts.backend_args)))
            async_.append(heat_run(opts, rows, cols, cfg, runtime))
            stop_backends(cfg, runtime)
            async_[-1]["backend_cpu"] = backend_cpu(logs)
            shutil.rmtree(logs, ignore_errors=True)
            shutil.rmtree(Path(shm) / tag, ignore_errors=True)
            shutil.rmtree(Path(disk) / tag, ignore_errors=True)
        print(f"  pair {i + 1}: plain loop {plain[-1]['loop']:.2f} s, async loop {async_[-1]['loop']:.2f} s "
              f"({async_[-1]['checkpoints']} checkpoints, {async_[-1]['ckpt']:.2f} s in checkpoint())",
              flush=True)
    loop = [a["loop"] / p["loop"] - 1 for p, a in zip(plain, async_)]
    steady = [a["steady_loop"] / p["steady_loop"] - 1 for p, a in zip(plain, async_)]
    wall = [a["wall"] / p["wall"] - 1 for p, a in zip(plain, async_)]
    med = lambda runs, k: statistics.median(r[k] for r in runs)   # noqa: E731
    print(f"\n== examples/heat.py, {opts.np} ranks, grid {rows} x {cols} ({opts.heat_mib} MiB per rank), "
          f"{opts.steps} iterations, async checkpoint every {opts.every} "
          f"({async_[0]['checkpoints']} versions), persistent {'off' if opts.no_persistent else disk}"
          + (f", backend args {opts.backend_args!r}" if opts.backend_args else "")
          + (f", config {', '.join(opts.set)}" if opts.set else ""))
    print(f"  {'':28} {'plain':>8} {'async':>8} {'overhead':>9}")
    print(f"  {'loop time (s, median)':28} {med(plain, 'loop'):8.2f} {med(async_, 'loop'):8.2f} "
          f"{statistics.median(loop):+9.1%}   (pairs: {', '.join(f'{x:+.1%}' for x in loop)})")
    print(f"  {'  of which in checkpoint()':28} {'':8} {med(async_, 'ckpt'):8.2f} "
          f"{med(async_, 'ckpt') / med(plain, 'loop'):+9.1%}")
    print(f"  {f'steady, after iteration {steady_from(opts)} (s)':28} {med(plain, 'steady_loop'):8.2f} "
          f"{med(async_, 'steady_loop'):8.2f} {statistics.median(steady):+9.1%}   "
          f"(pairs: {', '.join(f'{x:+.1%}' for x in steady)})")
    print(f"  {'  of which in checkpoint()':28} {'':8} {med(async_, 'steady_ckpt'):8.2f} "
          f"{med(async_, 'steady_ckpt') / med(plain, 'steady_loop'):+9.1%}   "
          f"({async_[0]['steady_checkpoints']} checkpoints into recycled scratch files)")
    print(f"  {'mpiexec wall time (s)':28} {med(plain, 'wall'):8.2f} {med(async_, 'wall'):8.2f} "
          f"{statistics.median(wall):+9.1%}   (incl. backend start and final drain)")
    cpu = [a["ranks_cpu"] / p["ranks_cpu"] - 1 for p, a in zip(plain, async_)]
    print(f"  {'CPU time of the ranks (s)':28} {med(plain, 'ranks_cpu'):8.2f} {med(async_, 'ranks_cpu'):8.2f} "
          f"{statistics.median(cpu):+9.1%}   (pairs: {', '.join(f'{x:+.1%}' for x in cpu)}; "
          "the backend's own CPU is in its log)")
    per_module = {}
    for run in async_:
        for module, secs in run.get("backend_cpu", {}).items():
            per_module.setdefault(module, []).append(1e3 * secs / run["checkpoints"])
    if per_module:
        print("  backend CPU per checkpoint (ms, median over runs; from its log): " + ", ".join(
            f"{m} {statistics.median(v):.0f}" for m, v in per_module.items()))
        total = [(a["ranks_cpu"] + sum(a.get("backend_cpu", {}).values())) / p["ranks_cpu"] - 1
                 for p, a in zip(plain, async_)]
        print(f"  {'CPU time, ranks + backend':28} {'':8} {'':8} {statistics.median(total):+9.1%}   "
              f"(pairs: {', '.join(f'{x:+.1%}' for x in total)})")
    loads = {kind: ", ".join(f"{r['load']:.1f}" for r in runs) for kind, runs in (("plain", plain), ("async", async_))}
    print(f"  load average after each run: plain {loads['plain']}; async {loads['async']}")
    return {"plain": plain, "async": async_, "rows": rows, "cols": cols}


def main():
    opts = parse_args()
    if opts.worker:
        return worker(opts)
    shm = Path(tempfile.mkdtemp(prefix="veloc-bench-async-", dir=opts.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="veloc-bench-async-", dir=opts.disk_dir))
    runtime = Path(tempfile.mkdtemp(prefix="vba-", dir="/tmp"))
    results = {}
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"bench_async: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}; "
              f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
        if opts.part in ("blocking", "all"):
            results["blocking"] = run_blocking(opts, shm, disk, runtime)
        if opts.part in ("heat", "all"):
            results["heat"] = run_heat(opts, shm, disk, runtime)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
        if opts.json:
            Path(opts.json).write_text(json.dumps(results, indent=1))
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
