"""``veloc ls`` checks sizes (a truncated copy is ``truncated``, not ``complete``), lists
the levels holding each version, and ``--all-nodes`` finds every virtual node's scratch.
Checkpoints come from ``veloc.init_single`` (no mpiexec); the partner and erasure levels
of a real 4-node job are covered in tests/e2e/test_ls_verify_levels.py."""
import json
import os

import numpy as np

import veloc
from veloc.cli import main
from veloc.cli.levels import nodes_on_disk, values_on_disk


def checkpoint(cfg, node, rank, versions, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", node)
    with veloc.init_single(rank, cfg) as client:
        client.protect("a", np.arange(1000.0) + rank)
        for version in versions:
            client.checkpoint("t", version)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_truncated_copy_and_levels_per_version(dirs, capsys, monkeypatch):
    ini = dirs["tmp"] / "c.ini"
    ini.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n")
    for rank in (0, 1):
        checkpoint(str(ini), "n0", rank, (1, 2), monkeypatch)
    vck = dirs["scratch"] / "n0" / "t" / "v2" / "r1.vck"
    os.truncate(vck, vck.stat().st_size - 1)
    code, out, err = run(capsys, "ls", ini, "t", "--json")
    states = {(s["level"], s["version"]): s for s in json.loads(out)}
    assert code == 0, err
    assert states[("scratch", 2)]["state"] == "truncated" and str(vck) in states[("scratch", 2)]["problems"][0]
    assert states[("scratch", 1)]["state"] == "complete" and states[("persistent", 2)]["state"] == "complete"
    code, out, _ = run(capsys, "ls", ini)
    assert "  t v2: persistent" in out and "  t v1: scratch persistent" in out
    assert f"t v2 scratch: {vck}: size" in out
    (dirs["persistent"] / "t" / "v2" / "r0.vck").unlink()
    code, out, _ = run(capsys, "ls", ini)
    assert "  t v2: no complete copy at any level" in out and "missing" in out


def test_all_nodes_finds_every_virtual_node(dirs, capsys, monkeypatch):
    ini = dirs["tmp"] / "c.ini"
    ini.write_text(f"scratch = {dirs['scratch']}/{{node}}/r{{rank}}\n")
    for rank, node in enumerate(("n0", "n1", "n2")):
        checkpoint(str(ini), node, rank, (5,), monkeypatch)
    (dirs["scratch"] / "not a node!").mkdir()
    cfg = veloc.load_config(ini, environ={})
    assert nodes_on_disk(cfg) == ["n0", "n1", "n2"]
    assert values_on_disk(cfg.scratch, "rank", node="n1") == {"1"}
    monkeypatch.setenv("VELOC_NODE_ID", "n1")
    code, out, _ = run(capsys, "ls", ini, "--json")
    assert [s["ranks"] for s in json.loads(out)] == [[1]]
    code, out, _ = run(capsys, "ls", ini, "--all-nodes", "--json")
    assert code == 0 and [s["ranks"] for s in json.loads(out)] == [[0, 1, 2]]
    code, out, _ = run(capsys, "verify", ini, "t", "--all-nodes")
    assert code == 0 and "t: 3 OK, 0 FAIL, 0 missing" in out
