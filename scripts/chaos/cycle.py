"""One chaos cycle end to end: the faulty run, the scratch loss, the restart run, and
the verdict (torn, lost, hang, leftover, debris, error).

Called by the driver (``scripts/chaos.py``) and by the deterministic regression tests
(``tests/e2e/test_trust_regressions.py``, which build a :class:`~chaos.plan.Cycle` by
hand), in a plain process, never under MPI.
"""
import shutil
import time
from pathlib import Path

from . import checks, jobs
from .plan import config_text, must_survive


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
    acted, filler, delayed = None, None, False
    while True:
        rc = jobs.wait(proc, 0.02)
        if rc is not None:
            break
        if time.monotonic() >= deadline:
            break
        if acted is None and cycle.point is None and jobs.progress(paths["journal_first"]) >= cycle.kill_after:
            if not delayed:
                time.sleep(cycle.kill_delay)
                delayed = True
            if cycle.target == "fill_disk":
                filler = jobs.fill(paths["scratch"] / cycle.nodes[cycle.victim])
                acted = f"filled {cycle.nodes[cycle.victim]}"
            else:       # until the victim exists (a rank or backend still starting)
                killed = jobs.kill_target(cycle, tag)
                acted = "killed " + ",".join(killed) if killed else None
    if rc is None:
        notes["hung_first"] = jobs.dump_stacks(tag)
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
        notes["hung_restart"] = jobs.dump_stacks(tag)
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


def leftovers(tag, grace=10.0):
    """Processes of the cycle still alive ``grace`` seconds after its last run (killed
    then); ``""`` if none."""
    deadline = time.monotonic() + grace
    procs = jobs.cycle_processes(tag)
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = jobs.cycle_processes(tag)
    if not procs:
        return ""
    jobs.kill_all(tag)
    return "; ".join(f"{kind} pid {pid}: {cmd[:120]}" for pid, kind, _, cmd in procs)


def keep_logs(paths, dest):
    """Copy a failing cycle's job output, config and backend logs to ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.out", "*.err"):
        for path in paths["base"].glob(pattern):
            shutil.copy(path, dest / path.name)
    shutil.copy(paths["cfg"], dest / "cycle.ini")
    for log in paths["scratch"].glob("veloc-backend-*"):
        shutil.copy(log, dest / log.name)


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
            fault = acted or (f"VELOC_FAULT={cycle.fault_env()}" if cycle.point else "no fault acted yet")
            verdict["hang"] = f"first run did not end within {timeout:g} s ({fault})"
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
        verdict["leftover"] = leftovers(tag)
        if rc2 is not None:
            debris = checks.find_debris([paths["scratch"], paths["persistent"]])
            if debris:
                verdict["debris"] = f"{len(debris)}: " + ", ".join(d.split(f'chaos-{tag}', 1)[-1] for d in debris[:6])
    finally:
        jobs.kill_all(tag)
        if mounted is not None:
            jobs.unmount(mounted)
        if any(verdict.values()) and keep_dir is not None:
            keep_logs(paths, Path(keep_dir) / f"cycle-{cycle.index}")
        shutil.rmtree(paths["shm"], ignore_errors=True)
        shutil.rmtree(paths["base"], ignore_errors=True)
    return {"cycle": cycle.to_json(), "verdict": verdict, "notes": notes,
            "seconds": round(time.monotonic() - t0, 2)}
