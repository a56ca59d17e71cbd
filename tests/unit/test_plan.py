"""``veloc plan``: measured level costs and the modelled intervals, and its errors."""
import json
import os
from pathlib import Path

import pytest

from veloc.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def levels(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    monkeypatch.setenv("VELOC_SCRATCH", f"{dirs['scratch']}/{{node}}")
    monkeypatch.setenv("VELOC_PERSISTENT", str(dirs["persistent"]))
    return dirs


def test_plan_on_sync_ini(levels, capsys):
    assert main(["plan", str(REPO / "configs" / "sync.ini"), "--size", "1M", "--reps", "2",
                 "--mtbf-process", "6h", "--mtbf-system", "7d"]) == 0
    out = capsys.readouterr().out
    assert "1048576 bytes per rank" in out and "np.copyto" in out
    scratch = next(line for line in out.splitlines() if line.startswith("scratch"))
    persistent = next(line for line in out.splitlines() if line.startswith("persistent"))
    assert "6 h" in scratch and "measured" in scratch and "168 h" in persistent and "x" in persistent
    assert "predicted overhead, all modelled levels" in out
    assert list((levels["scratch"] / "n0").iterdir()) == [] and list(levels["persistent"].iterdir()) == []


def test_plan_json_multilevel_estimates_partner_and_erasure(levels, capsys):
    assert main(["plan", str(REPO / "configs" / "multilevel.ini"), "--size", "256K", "--reps", "1",
                 "--mtbf-process", "3600", "--mtbf-node", "1d", "--mtbf-system", "30d", "--net-gbps", "10",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["level"]: r for r in report["levels"]}
    assert list(rows) == ["scratch", "partner", "erasure", "persistent"]
    assert rows["partner"]["how"].startswith("estimated: network at 10 GB/s")
    assert rows["scratch"]["how"].startswith("measured") and rows["persistent"]["how"].startswith("measured")
    assert all(r["cost_s"] > 0 and r["period_s"] >= r["young_s"] * 0.5 for r in rows.values())
    periods = [rows[n]["period_s"] for n in rows]
    assert all(b / a == pytest.approx(round(b / a)) for a, b in zip(periods, periods[1:]))
    assert report["total_overhead"] == pytest.approx(sum(r["overhead"] for r in rows.values()))


def test_plan_without_failure_rates_says_what_to_give(levels, capsys):
    assert main(["plan", str(REPO / "configs" / "sync.ini"), "--size", "64K", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "no failure rate for scratch, persistent: give --mtbf-process" in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "lots"], "bad size 'lots'"),
    (["--size", "0"], "bad size '0'"),
    (["--mtbf-node=-3h"], "bad duration '-3h'"),
    (["--mtbf-system", "soon"], "bad duration 'soon'"),
    (["--net-gbps", "0"], "expected a positive number"),
    (["--reps", "0"], "invalid choice"),
])
def test_bad_arguments(levels, capsys, argv, message):
    assert main(["plan", str(REPO / "configs" / "sync.ini"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_and_unwritable_level(levels, capsys, tmp_path):
    assert main(["plan", str(tmp_path / "missing.ini")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    bad = tmp_path / "bad.ini"
    bad.write_text(f"scratch = {levels['scratch']}\n[policy]\nmtbf = soon\n")
    assert main(["plan", str(bad)]) == 2
    assert "policy.mtbf" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    os.environ["VELOC_PERSISTENT"] = str(blocker / "persistent")   # restored by monkeypatch
    assert main(["plan", str(REPO / "configs" / "sync.ini"), "--size", "4K", "--reps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"persistent folder {blocker / 'persistent'} (config key 'persistent') cannot be created" in err
