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
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import jobs, report  # noqa: E402
from chaos.cycle import run_cycle  # noqa: E402
from chaos.plan import CONFIGS, TARGETS, plan_cycle  # noqa: E402


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
    p.add_argument("--budget", type=float, default=None, metavar="S",
                   help="start no new cycle after S seconds (the JSON says how many ran)")
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
        if args.budget is not None and time.monotonic() - t0 > args.budget:
            print(f"chaos: time budget of {args.budget:g} s spent after {len(records)} cycle(s)", file=sys.stderr)
            break
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
