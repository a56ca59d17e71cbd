"""The fault-injection suite (``scripts/chaos.py``): its parts, then a bounded, seeded
campaign of real jobs under ``mpiexec``/``veloc-run`` that must come out clean.

The campaign (``test_chaos_sample``) runs ``CHAOS_CYCLES`` cycles (default 50) with
seed ``CHAOS_SEED`` (default 7) and fails with the table of counts if any cycle
restored a torn state, lost a version it had to keep, hung, left a process or (while
``--strict-debris`` is the default) left crash debris behind.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from chaos import checks, report  # noqa: E402
from chaos.plan import CONFIGS, TARGETS, must_survive, plan_cycle  # noqa: E402

SCRIPT = REPO / "scripts" / "chaos.py"


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("VELOC_")}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("spec,fires", [("flush:2", True), ("flush:3", False), ("flush", True),
                                        ("flush:2:n1", True), ("flush:2:n0", False), ("versioning", False)])
def test_fault_point_kills_on_the_armed_pass_only(spec, fires):
    proc = _python("from veloc.faults import fault_point\n"
                   "fault_point('flush'); fault_point('flush'); print('survived', flush=True)",
                   VELOC_FAULT=spec, VELOC_NODE_ID="n1")
    assert (proc.returncode == -9) == fires, (proc.returncode, proc.stderr)
    assert ("survived" in proc.stdout) != fires


def test_fault_point_matches_a_rank():
    code = "from veloc.faults import fault_point\nfault_point('checksum'); print('survived')"
    assert _python(code, VELOC_FAULT="checksum:1:3", PMI_RANK="3").returncode == -9
    assert _python(code, VELOC_FAULT="checksum:1:3", PMI_RANK="2").returncode == 0


@pytest.mark.parametrize("bad", ["nowhere", "flush:0", "flush:x", "flush:1:n0:extra", ":1"])
def test_bad_fault_spec_is_a_config_error(bad):
    proc = _python("import veloc.faults", VELOC_FAULT=bad)
    assert proc.returncode == 1 and "ConfigError" in proc.stderr and "VELOC_FAULT" in proc.stderr, proc.stderr


def test_fault_point_is_a_no_op_when_unset():
    proc = _python("import veloc.faults as f\nf.fault_point('flush')\nprint(f.fault_point.__name__)")
    assert proc.returncode == 0 and proc.stdout.strip() == "_disarmed", proc.stderr


def test_plan_is_seeded_and_covers_every_config_and_target():
    cycles = [plan_cycle(11, i) for i in range(400)]
    assert [c.to_json() for c in cycles[:20]] == [plan_cycle(11, i).to_json() for i in range(20)]
    assert {c.config for c in cycles} == set(CONFIGS)
    assert {c.target for c in cycles} == set(TARGETS)
    assert {c.point for c in cycles if c.target == "point"} >= {"local_write", "manifest_commit", "checksum",
                                                               "partner_transfer", "erasure_encode", "flush",
                                                               "versioning"}
    for c in cycles:
        assert 1 <= c.scratch_versions <= 2 and 1 <= c.max_versions <= 3
        if c.config == "rs":
            assert 4 <= len(c.nodes) <= 6 and c.sections["erasure"]["group_size"] == str(len(c.nodes))
        if c.point == "partner_transfer":
            assert "partner" in c.sections
        if c.mode == "sync":
            assert c.target not in ("backend", "backend_flush")
    only = [plan_cycle(3, i, configs=["xor"], targets=["job"]) for i in range(10)]
    assert {(c.config, c.target) for c in only} == {("xor", "job")}


def test_what_must_survive_follows_the_levels():
    def survive(config, loss):
        c = plan_cycle(0, 0, configs=[config])
        c.loss = loss
        return must_survive(c)
    assert survive("scratch_only", "none") and not survive("scratch_only", "node")
    assert survive("xor", "node") and not survive("xor", "all") and not survive("sync_partner", "all")
    assert survive("sync_persistent", "all") and survive("async_persistent", "node")


def test_required_version_and_restore_verdicts():
    assert checks.required_version({0: [1, 2, 3], 1: [1, 2]}, 2) == 2
    assert checks.required_version({0: [1, 2]}, 2) is None
    ok = {0: {"version": 2, "exact": True}, 1: {"version": 2, "exact": True}}
    assert checks.judge_restore(ok, 2, 2)[:3] == (False, False, 2)
    assert checks.judge_restore(ok, 2, 3)[:2] == (False, True)
    assert checks.judge_restore({**ok, 1: {"version": 2, "exact": False}}, 2, 1)[0]
    assert checks.judge_restore({**ok, 1: {"version": 1, "exact": True}}, 2, None)[0]
    assert checks.judge_restore({0: {"version": None, "exact": True}}, 1, 1)[:2] == (False, True)
    assert "missing" in checks.judge_restore({0: ok[0]}, 2, None)[3]


def test_debris_finder(tmp_path):
    v = tmp_path / "scratch" / "n0" / "chaos" / "v3"
    v.mkdir(parents=True)
    (v / "r0.vck").write_bytes(b"x")
    (v / "r0.manifest.json").write_text("{}")
    (v / "r1.vck").write_bytes(b"x")                              # no manifest
    (v / ".r2.vck.1234abcd.tmp").write_bytes(b"x")                # killed write
    e = tmp_path / "scratch" / "n1" / ".erasure" / "chaos"
    (e / "v2").mkdir(parents=True)
    (e / "v2" / "s0.p0.par").write_bytes(b"p")                    # parity, no record
    (e / "v3").mkdir()
    (e / "v3" / "s0.p0.par").write_bytes(b"p")
    (e / "v3" / "group.json").write_text("{}")
    pool = tmp_path / "scratch" / "n0" / ".recycle"
    pool.mkdir()
    (pool / "r0.abcdef.vck").write_bytes(b"x")                    # the recycle pool is not debris
    found = checks.find_debris([tmp_path / "scratch", tmp_path / "missing"])
    assert found == sorted([str(v / "r1.vck"), str(v / ".r2.vck.1234abcd.tmp"),
                            f"{e / 'v2'} (parity without group record)"])


def test_report_counts_and_exit_rule():
    def rec(config, target, **bad):
        verdict = dict.fromkeys(("torn", "lost", "hang", "leftover", "debris", "error"), "")
        verdict.update(bad)
        return {"cycle": {"config": config, "target": target, "point": "flush"}, "verdict": verdict}
    records = [rec("xor", "job"), rec("xor", "point", debris="1: x"), rec("rs", "rank", lost="v2")]
    totals, by_config, by_target = report.tally(records)
    assert totals == {"cycles": 3, "torn": 0, "lost": 1, "hang": 0, "leftover": 0, "debris": 1, "error": 0}
    assert by_config["xor"]["debris"] == 1 and by_target["point:flush"]["cycles"] == 1
    assert report.failed(totals, strict_debris=False)
    only_debris = report.tally(records[:2])[0]
    assert report.failed(only_debris, True) and not report.failed(only_debris, False)
    assert "point:flush" in report.table(totals, by_config, by_target)


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_chaos_sample(tmp_path):
    """A seeded sample of real cycles (every config and kill target) comes out clean.
    No cycle starts after 270 s; one cycle takes at most 2 x 30 s runs plus cleanup."""
    cycles = int(os.environ.get("CHAOS_CYCLES", "50"))
    seed = int(os.environ.get("CHAOS_SEED", "7"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cycles", str(cycles), "--seed", str(seed),
                           "--out", str(tmp_path), "--timeout", "30", "--budget", "270", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    doc = json.loads((tmp_path / "chaos.json").read_text())
    assert doc["totals"]["cycles"] == cycles, f"only {doc['totals']['cycles']} cycles in the time budget"
    bad = [f"cycle {r['cycle']['index']} {r['cycle']['config']} {r['cycle']['target']}: "
           + "; ".join(f"{k}: {v}" for k, v in r["verdict"].items() if v)
           for r in doc["cycles"] if any(r["verdict"].values())]
    assert proc.returncode == 0, proc.stdout + "\n" + "\n".join(bad)
