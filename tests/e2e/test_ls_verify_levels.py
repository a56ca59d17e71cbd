"""End-to-end: ``veloc ls``/``verify`` see every level of a real multi-level job.

``tests/e2e/apps/multilevel_app.py`` runs under ``mpiexec`` on 4 virtual nodes (one
rank each) with the shipped ``configs/multilevel.ini`` (partner + XOR + persistent) and
``configs/rs.ini`` (Reed-Solomon), their paths redirected with ``VELOC_SCRATCH`` and
``VELOC_PERSISTENT``. The tool then lists and verifies the scratch, partner, erasure
and persistent copies, reports a truncated partner copy as ``truncated`` and a damaged
parity block as ``FAIL``.
"""
import json
import os

import pytest

from conftest import REPO, flip_bytes, run_mpi
from veloc.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
APP = REPO / "tests" / "e2e" / "apps" / "multilevel_app.py"
NODES = ["n0", "n1", "n2", "n3"]


def job(dirs, config, **extra_env):
    env = {"VELOC_SCRATCH": f"{dirs['scratch']}/{{node}}", "VELOC_PERSISTENT": str(dirs["persistent"]),
           **extra_env}
    cfg = REPO / "configs" / config
    run_mpi([APP, "--config", cfg, "--phase", "checkpoint", "--scale", "5"], nodes=NODES, env=env, timeout=120)
    return cfg, env


def tool(capsys, monkeypatch, env, *argv):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def states(out):
    return {(s["level"], s["version"]): s for s in json.loads(out)}


def test_ls_and_verify_see_partner_and_xor_copies(dirs, capsys, monkeypatch):
    cfg, env = job(dirs, "multilevel.ini")
    code, out, err = tool(capsys, monkeypatch, env, "ls", cfg, "ml", "--all-nodes", "--json")
    assert code == 0, err
    got = states(out)
    # scratch_versions = 2: versions 2 and 3 on scratch, partner and erasure; persistent
    # (every 600 s) holds the first version flushed.
    for level in ("scratch", "partner", "erasure"):
        for version in (2, 3):
            s = got[(level, version)]
            assert (s["state"], s["ranks"], s["nranks"]) == ("complete", [0, 1, 2, 3], 4), (level, s)
        assert (level, 1) not in got
    assert got[("persistent", 1)]["state"] == "complete"
    code, out, _ = tool(capsys, monkeypatch, env, "ls", cfg, "--all-nodes")
    assert code == 0 and "  ml v3: scratch partner erasure" in out and "  ml v1: persistent" in out
    # one node's view: its own ranks on scratch, the copies it holds for others
    env1 = dict(env, VELOC_NODE_ID="n1")
    code, out, _ = tool(capsys, monkeypatch, env1, "ls", cfg, "ml", "--json")
    got = states(out)
    assert got[("scratch", 3)]["ranks"] == [1] and got[("partner", 3)]["ranks"] == [0]
    assert got[("erasure", 3)]["ranks"] == [0, 1, 2, 3] and got[("erasure", 3)]["state"] == "complete"
    code, out, err = tool(capsys, monkeypatch, env, "verify", cfg, "ml", "3", "--all-nodes")
    assert code == 0, out + err
    lines = out.splitlines()
    assert sum(line.startswith("OK      scratch") for line in lines) == 4
    assert sum(line.startswith("OK      partner") for line in lines) == 4
    assert sum(line.startswith("OK      erasure") for line in lines) == 4     # one parity block per node
    assert "ml: 12 OK, 0 FAIL, 0 missing" in out

    # damage: truncate n0's partner copy (held on n1), flip bytes in n2's parity block
    held = dirs["scratch"] / "n1" / ".partner" / "n0" / "ml" / "v3" / "r0.vck"
    os.truncate(held, held.stat().st_size - 100)
    parity = sorted((dirs["scratch"] / "n2" / ".erasure" / "ml" / "v3").glob("*.par"))[0]
    flip_bytes(parity)
    code, out, _ = tool(capsys, monkeypatch, env, "ls", cfg, "ml", "--all-nodes", "--json")
    got = states(out)
    assert got[("partner", 3)]["state"] == "truncated" and str(held) in got[("partner", 3)]["problems"][0]
    assert got[("partner", 2)]["state"] == "complete"
    assert got[("erasure", 3)]["state"] == "complete"     # same size: only verify sees the flip
    code, out, _ = tool(capsys, monkeypatch, env, "ls", cfg, "--all-nodes")
    assert "  ml v3: scratch erasure" in out and "truncated" in out
    code, out, _ = tool(capsys, monkeypatch, env, "verify", cfg, "ml", "3", "--all-nodes")
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and len(fails) == 2, out
    assert any("partner" in f and "rank 0" in f and str(held) in f and "size" in f for f in fails)
    assert any("erasure" in f and "node n2" in f and str(parity) in f and "checksum mismatch" in f
               for f in fails)
    parity.unlink()
    code, out, _ = tool(capsys, monkeypatch, env, "verify", cfg, "ml", "3", "--all-nodes")
    assert "MISSING erasure    ml v3 node n2" in out and "1 missing" in out
    code, out, _ = tool(capsys, monkeypatch, env, "ls", cfg, "ml", "--all-nodes", "--json")
    assert states(out)[("erasure", 3)]["state"] == "partial"


def test_ls_and_verify_see_reed_solomon_parity(dirs, capsys, monkeypatch):
    cfg, env = job(dirs, "rs.ini", VELOC_ERASURE_GROUP_SIZE="4")
    code, out, err = tool(capsys, monkeypatch, env, "ls", cfg, "ml", "--all-nodes", "--json")
    got = states(out)
    assert code == 0 and got[("erasure", 3)]["state"] == "complete" and ("partner", 3) not in got
    code, out, _ = tool(capsys, monkeypatch, env, "verify", cfg, "ml", "3", "--all-nodes")
    assert code == 0 and sum(line.startswith("OK      erasure") for line in out.splitlines()) == 8  # 2 per node


def test_all_nodes_needs_node_in_the_scratch_path(dirs, capsys):
    ini = dirs["tmp"] / "flat.ini"
    ini.write_text(f"scratch = {dirs['scratch']}/flat\n")
    code = main(["ls", str(ini), "--all-nodes"])
    err = capsys.readouterr().err
    assert code == 2 and "--all-nodes needs {node} in the scratch path" in err
    ini.write_text(f"scratch = {dirs['scratch']}/none/{{node}}\n")
    code = main(["ls", str(ini), "--all-nodes"])
    assert code == 2 and "no node's scratch folder matches" in capsys.readouterr().err
    code = main(["ls", str(ini), "--all-nodes", "--node", "n0"])
    assert code == 2 and "not allowed with argument" in capsys.readouterr().err
