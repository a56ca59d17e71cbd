#!/usr/bin/env python3
"""Fault-injection campaign: real jobs under ``mpiexec``/``veloc-run``, SIGKILLs at random
or named pipeline points, lost scratch, full disks; then a restart that must bring back
the right state.

``scripts/chaos.py --cycles N --seed S [--configs C ...] [--targets T ...] [--out DIR]``

Each cycle (drawn from ``(seed, cycle)``, see ``scripts/chaos/plan.py``) picks a config
(sync/async persistent, sync partner on 4 virtual nodes, async partner under
``veloc-run``, XOR on 4 nodes, Reed-Solomon on 4-6 nodes with 2 parity blocks, scratch
only; ``scratch_versions`` 1-2, ``max_versions`` 1-3), runs
``tests/e2e/apps/chaos_app.py`` and SIGKILLs a target: one rank, the whole job, a
backend, a backend mid-flush, or whatever process passes a named point
(``VELOC_FAULT``, ``veloc/faults.py``); or fills one node's scratch (a small tmpfs).
It then optionally deletes one node's scratch or all scratch, restarts the job and
counts, per config and per target:

- ``torn``: restored arrays differ from what was checkpointed at that version, or ranks
  restored different versions;
- ``lost``: the restored version is older than the newest one every rank's journal
  recorded as done, where the config's levels promise to keep it (all scratch lost with
  no persistent level, or one node lost with scratch only, promise nothing);
- ``hang``: a run did not end within ``--timeout`` seconds;
- ``leftover``: a process of the cycle (rank, launcher, backend) still alive after it;
- ``debris``: temporary files, rank files without a manifest, erasure folders without a
  group record left on scratch or persistent after the restart run completed;
- ``error``: a run failed in a way the fault does not explain (a non-veloc exception,
  a restart run that does not complete).

Writes ``DIR/chaos.json`` (every cycle and the counts) and prints the table. Exits 1
if any count but ``debris`` is non-zero, or ``debris`` too with ``--strict-debris``
(the default; ``--no-strict-debris`` to tolerate it).
"""
import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import checks, jobs, report  # noqa: E402
from chaos.plan import CONFIGS, TARGETS, config_text, must_survive, plan_cycle  # noqa: E402


def cycle_paths(run_id, index):
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    base_shm, base = shm / f"chaos-{run_id}-{index}", Path("/tmp") / f"chaos-{run_id}-{index}"
    paths = {"shm": base_shm, "base": base, "scratch": base_shm / "scratch", "persistent": base / "persistent",
             "runtime": base / "runtime", "cfg": base / "cycle.ini"}
    for phase in ("first", "restart"):
        paths[f"journal_{phase}"] = base / f"journal-{phase}"
        paths[f"result_{phase}"] = base / f"result-{phase}"
        paths[f"log_{phase}"] = base / phase
    return paths


def run_first(cycle, paths, tag, timeout, notes):
    """The faulty run; ``(rc or None if it hung, what was done to it)``."""
    env = jobs.job_env(tag, paths, cycle.fault_env())
    proc = jobs.start(jobs.job_command(cycle, paths, "first"), env, paths["log_first"])
    deadline = time.monotonic() + timeout
    acted, filler = None, None
    while True:
        rc = jobs.wait(proc, 0.02)
        if rc is not None:
            break
        if time.monotonic() >= deadline:
            break
        if acted is None and cycle.point is None and jobs.progress(paths["journal_first"]) >= cycle.kill_after:
            time.sleep(cycle.kill_delay)
            if cycle.target == "fill_disk":
                filler = jobs.fill(paths["scratch"] / cycle.nodes[cycle.victim])
                acted = f"filled {cycle.nodes[cycle.victim]}"
            else:
                acted = "killed " + ",".join(jobs.kill_target(cycle, tag)) or "nothing to kill"
    if rc is None:
        jobs.kill_all(tag)
        proc.wait()
    if filler is not None:
        filler.unlink(missing_ok=True)
    notes["first_rc"], notes["acted"] = rc, acted
    return rc, acted


def run_restart(cycle, paths, tag, timeout, notes):
    env = jobs.job_env(tag, paths)
    proc = jobs.start(jobs.job_command(cycle, paths, "restart"), env, paths["log_restart"])
    rc = jobs.wait(proc, timeout)
    if rc is None:
        jobs.kill_all(tag)
        proc.wait()
    elif cycle.mode == "async" and cycle.launcher == "mpiexec":
        err = jobs.stop_backends(paths["cfg"], env)
        if err:
            notes["stop"] = err
    notes["restart_rc"] = rc
    return rc


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def run_cycle(cycle, run_id, timeout, keep_dir):
    """Run one cycle; its record ``{"cycle", "verdict", "notes", "seconds"}``."""
    t0 = time.monotonic()
    tag = f"{run_id}-{cycle.index}"
    paths = cycle_paths(run_id, cycle.index)
    for key in ("scratch", "persistent", "runtime"):
        paths[key].mkdir(parents=True, exist_ok=True)
    paths["cfg"].write_text(config_text(cycle, paths["scratch"], paths["persistent"]))
    mounted = None
    if cycle.target == "fill_disk":
        mounted = paths["scratch"] / cycle.nodes[cycle.victim]
        if not jobs.mount_small(mounted):
            mounted = None
    verdict = dict.fromkeys(("torn", "lost", "hang", "leftover", "debris", "error"), "")
    notes = {}
    try:
        rc1, acted = run_first(cycle, paths, tag, timeout, notes)
        out1 = read(f"{paths['log_first']}.out") + read(f"{paths['log_first']}.err")
        if rc1 is None:
            verdict["hang"] = f"first run did not end within {timeout:g} s ({acted or 'no fault acted yet'})"
        elif "Traceback" in out1:
            verdict["error"] = "first run: " + checks.first_error_line(out1)
        elif rc1 != 0 and acted is None and cycle.point is None:
            verdict["error"] = f"first run exited {rc1} without a fault: " + checks.first_error_line(out1)
        notes["first_error"] = checks.first_error_line(out1) if rc1 else ""
        jobs.kill_all(tag)                     # the allocation is gone: backends too
        lost_nodes = {"none": [], "node": [cycle.lost_node], "all": cycle.nodes}[cycle.loss]
        jobs.lose(paths["scratch"], lost_nodes)
        journals = jobs.journal(paths["journal_first"])
        required = checks.required_version(journals, cycle.nranks) if must_survive(cycle) else None
        notes["journal"] = {r: v[-3:] for r, v in sorted(journals.items())}
        notes["required"] = required
        rc2 = run_restart(cycle, paths, tag, timeout, notes)
        out2 = read(f"{paths['log_restart']}.out") + read(f"{paths['log_restart']}.err")
        results = checks.read_results(paths["result_restart"], cycle.nranks)
        torn, lost, restored, why = checks.judge_restore(results, cycle.nranks, required)
        notes["restored"] = restored
        notes["levels"] = [results[r].get("level") for r in sorted(results)]
        if torn:
            verdict["torn"] = why
        if lost:
            verdict["lost"] = why
        if rc2 is None:
            verdict["hang"] = verdict["hang"] or f"restart run did not end within {timeout:g} s"
        elif rc2 != 0 or (why and not torn and not lost):
            verdict["error"] = verdict["error"] or (f"restart run exited {rc2}: " + checks.first_error_line(out2)
                                                    if rc2 else why)
        deadline = time.monotonic() + 10
        procs = jobs.cycle_processes(tag)
        while procs and time.monotonic() < deadline:
            time.sleep(0.1)
            procs = jobs.cycle_processes(tag)
        if procs:
            verdict["leftover"] = "; ".join(f"{kind} pid {pid}: {cmd[:120]}" for pid, kind, _, cmd in procs)
            jobs.kill_all(tag)
        if rc2 is not None:
            debris = checks.find_debris([paths["scratch"], paths["persistent"]])
            if debris:
                verdict["debris"] = f"{len(debris)}: " + ", ".join(d.split(f'chaos-{tag}', 1)[-1] for d in debris[:6])
    finally:
        jobs.kill_all(tag)
        if mounted is not None:
            jobs.unmount(mounted)
        if any(verdict.values()) and keep_dir is not None:
            dest = Path(keep_dir) / f"cycle-{cycle.index}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True, exist_ok=True)
            for p in paths["base"].glob("*.out"):
                shutil.copy(p, dest / p.name)
            for p in paths["base"].glob("*.err"):
                shutil.copy(p, dest / p.name)
            shutil.copy(paths["cfg"], dest / "cycle.ini")
            for log in paths["scratch"].glob("veloc-backend-*"):
                shutil.copy(log, dest / log.name)
        shutil.rmtree(paths["shm"], ignore_errors=True)
        shutil.rmtree(paths["base"], ignore_errors=True)
    return {"cycle": cycle.to_json(), "verdict": verdict, "notes": notes,
            "seconds": round(time.monotonic() - t0, 2)}


def repro(args, index):
    cmd = f"{sys.executable} scripts/chaos.py --seed {args.seed} --first-cycle {index} --cycles 1"
    if args.configs:
        cmd += " --configs " + " ".join(args.configs)
    if args.targets:
        cmd += " --targets " + " ".join(args.targets)
    return cmd


def note_finding(path, args, rec):
    c, v = rec["cycle"], rec["verdict"]
    what = "; ".join(f"{k}: {x}" for k, x in v.items() if x)
    point = f"{c['point']}:{c['nth']}:{c['where']}" if c["point"] else "-"
    with open(path, "a") as f:
        f.write(f"- chaos cycle: config `{c['config']}` (nodes {len(c['nodes'])}x{c['per_node']}, "
                f"sv={c['scratch_versions']} mv={c['max_versions']}), target `{c['target']}`, point `{point}`, "
                f"loss `{c['loss']}`, seed {c['seed']} cycle {c['index']}; repro: `{repro(args, c['index'])}`; "
                f"journal {rec['notes'].get('journal')}, required v{rec['notes'].get('required')}, restored "
                f"v{rec['notes'].get('restored')}; {what}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--first-cycle", type=int, default=0, help="index of the first cycle (replay one)")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None)
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=None)
    p.add_argument("--out", default="chaos-out", help="folder for chaos.json and failing cycles' logs")
    p.add_argument("--jobs", type=int, default=1, choices=(1,), help="cycles at a time (1)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a run may take before it is a hang")
    p.add_argument("--strict-debris", action=argparse.BooleanOptionalAction, default=True,
                   help="count crash debris as a failure (default: yes)")
    p.add_argument("--findings", default=None, help="append every failing cycle to this markdown file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = args.targets
    if (targets is None or "fill_disk" in targets) and not jobs.can_mount():
        print("chaos: cannot mount a small tmpfs here (needs root): no fill_disk cycles", file=sys.stderr)
        targets = [t for t in (targets or TARGETS) if t != "fill_disk"]
    run_id = uuid.uuid4().hex[:8]
    meta = {"seed": args.seed, "first_cycle": args.first_cycle, "configs": args.configs, "targets": targets,
            "timeout": args.timeout, "strict_debris": args.strict_debris, "run": run_id}
    records = []
    t0 = time.monotonic()
    for index in range(args.first_cycle, args.first_cycle + args.cycles):
        cycle = plan_cycle(args.seed, index, args.configs, targets)
        rec = run_cycle(cycle, run_id, args.timeout, out / "failures")
        records.append(rec)
        bad = {k: x for k, x in rec["verdict"].items() if x}
        if not args.quiet:
            print(f"{cycle.describe()}: {rec['notes'].get('acted') or 'rc ' + str(rec['notes'].get('first_rc'))}; "
                  f"restored v{rec['notes'].get('restored')} "
                  f"(required v{rec['notes'].get('required')}) {rec['seconds']:.1f}s "
                  + ("OK" if not bad else "FAIL " + "; ".join(f"{k}: {x}" for k, x in bad.items())), flush=True)
        if args.findings and any(k != "debris" for k in bad):
            note_finding(args.findings, args, rec)
        report.write_json(out / "chaos.json", {**meta, "seconds": round(time.monotonic() - t0, 1)}, records)
    totals, by_config, by_target = report.write_json(
        out / "chaos.json", {**meta, "seconds": round(time.monotonic() - t0, 1)}, records)
    print(report.table(totals, by_config, by_target))
    print(f"{len(records)} cycles in {time.monotonic() - t0:.0f} s; JSON: {out / 'chaos.json'}")
    return 1 if report.failed(totals, args.strict_debris) else 0


if __name__ == "__main__":
    sys.exit(main())
