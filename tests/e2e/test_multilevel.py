"""End-to-end: partner copies and XOR / Reed-Solomon erasure coding save a job whose
nodes lost their scratch, with no persistent level to fall back on.

Each test runs ``tests/e2e/apps/multilevel_app.py`` on 4 virtual nodes ``n0..n3`` (one
rank each, ``VELOC_NODE_ID`` per rank; scratch ``<scratch>/{node}``) in sync mode: a
first job checkpoints versions 1..3 and exits; the test deletes nodes' scratch folders
(a lost node) or corrupts files; a second job restarts and rank 0 prints the version,
the level each rank read it from, and whether every array came back bit for bit.
"""
import re
import shutil

import numpy as np
import pytest

from conftest import REPO, flip_bytes, run_mpi

pytestmark = pytest.mark.e2e

APP = REPO / "tests" / "e2e" / "apps" / "multilevel_app.py"
HEAT = REPO / "examples" / "heat.py"
NODES = ["n0", "n1", "n2", "n3"]
LINE = re.compile(r"^ml: restarted version (\S+)(?: levels \[([^\]]*)\] exact (\w+))?$", re.M)
TIMEOUT = 60

PARTNER = {"partner": {"enabled": "true"}}
XOR = {"erasure": {"enabled": "true", "scheme": "xor", "group_size": 4}}
RS2 = {"erasure": {"enabled": "true", "scheme": "rs", "parity": 2, "group_size": 4}}


def write_config(dirs, sections, name="ml.ini", **top):
    lines = [f"scratch = {dirs['scratch']}/{{node}}", "mode = sync"]
    lines += [f"{k} = {v}" for k, v in top.items()]
    for section, keys in sections.items():
        lines += [f"[{section}]"] + [f"{k} = {v}" for k, v in keys.items()]
    path = dirs["tmp"] / name
    path.write_text("\n".join(lines) + "\n")
    return path


def app(cfg, phase, *extra, nodes=NODES, env=None):
    return run_mpi([APP, "--config", cfg, "--phase", phase, *extra], nodes=nodes, timeout=TIMEOUT, env=env)


def restart(cfg, *extra, env=None):
    """Run the restart job; ``(version or None, [level per rank], proc)``."""
    proc = app(cfg, "restart", *extra, env=env)
    match = LINE.search(proc.stdout)
    assert match, f"no restart line:\n{proc.stdout}\n{proc.stderr}"
    if match.group(1) == "None":
        return None, [], proc
    assert match.group(3) == "True", f"restored arrays differ:\n{proc.stdout}\n{proc.stderr}"
    return int(match.group(1)), [x.strip(" '") for x in match.group(2).split(",")], proc


def lose(dirs, *nodes):
    for node in nodes:
        shutil.rmtree(dirs["scratch"] / node)


@pytest.mark.timeout(120)
def test_partner_copy_survives_a_lost_node_and_is_rebuilt(dirs):
    cfg = write_config(dirs, PARTNER)
    app(cfg, "checkpoint")
    held = dirs["scratch"] / "n1" / ".partner" / "n0" / "ml" / "v3"     # n0's partner is n1
    assert (held / "r0.manifest.json").is_file() and (held / "r0.vck").is_file()
    lose(dirs, "n1")
    version, levels, _ = restart(cfg, "--then", 4)
    assert (version, levels) == (3, ["scratch", "partner", "scratch", "scratch"])
    assert (held / "r0.manifest.json").is_file(), "n0's copy was not re-protected on the rebuilt n1"
    assert (dirs["scratch"] / "n2" / ".partner" / "n1" / "ml" / "v4" / "r1.manifest.json").is_file()
    # the re-protected copy is good enough to lose n0 next
    lose(dirs, "n0")
    shutil.rmtree(dirs["scratch"] / "n1" / ".partner" / "n0" / "ml" / "v4")
    version, levels, _ = restart(cfg)
    assert (version, levels) == (3, ["partner", "scratch", "scratch", "scratch"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chksum,piece", [("true", None), ("false", 4093)], ids=["digests", "nodigest-pieces"])
def test_xor_rebuilds_a_lost_node_and_reprotects_it(dirs, chksum, piece):
    """Also without per-file digests (the group record's block digest checks the rebuild),
    and with every MPI message cut into odd 4093-byte pieces."""
    env = {"ML_MPI_PIECE": str(piece)} if piece else None
    cfg = write_config(dirs, XOR, chksum=chksum)
    app(cfg, "checkpoint", env=env)
    lose(dirs, "n2")
    version, levels, _ = restart(cfg, env=env)
    assert (version, levels) == (3, ["scratch", "scratch", "erasure", "scratch"])
    assert (dirs["scratch"] / "n2" / ".erasure" / "ml" / "v3" / "group.json").is_file()
    lose(dirs, "n1")                  # a second failure: the parity was rebuilt with the data
    version, levels, _ = restart(cfg, env=env)
    assert (version, levels) == (3, ["scratch", "erasure", "scratch", "scratch"])


@pytest.mark.timeout(120)
def test_reed_solomon_rebuilds_two_lost_nodes(dirs):
    cfg = write_config(dirs, RS2)
    app(cfg, "checkpoint")
    lose(dirs, "n0", "n3")
    version, levels, _ = restart(cfg, "--then", 4)
    assert (version, levels) == (3, ["erasure", "scratch", "scratch", "erasure"])


@pytest.mark.timeout(120)
def test_too_many_losses_fall_back_to_an_older_version(dirs):
    """XOR: n1 is gone and n2 lost v3 too, so v3 misses 2 blocks; v2 misses only n1's."""
    cfg = write_config(dirs, XOR)
    app(cfg, "checkpoint")
    lose(dirs, "n1")
    shutil.rmtree(dirs["scratch"] / "n2" / "ml" / "v3")
    version, levels, proc = restart(cfg)
    assert (version, levels) == (2, ["scratch", "erasure", "scratch", "scratch"])
    assert "v3" in proc.stderr and "cannot rebuild" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_too_many_lost_nodes_give_none_with_the_reason(dirs):
    cfg = write_config(dirs, XOR)
    app(cfg, "checkpoint")
    lose(dirs, "n1", "n2")
    version, _, proc = restart(cfg)
    assert version is None
    # the default rotation (scratch_versions = 2) keeps versions 2 and 3
    assert re.search(r"erasure: node n[12] cannot rebuild ml version\(s\) \[2, 3\]", proc.stderr), proc.stderr


@pytest.mark.timeout(120)
def test_corrupt_parity_block(dirs):
    """XOR: n0 lost and the parity n1 holds for v3 corrupt: v3 is gone, v2 is rebuilt.
    The same damage with RS parity 2 still rebuilds v3."""
    parity = dirs["scratch"] / "n1" / ".erasure" / "ml" / "v3" / "s1.p0.par"
    cfg = write_config(dirs, XOR)
    app(cfg, "checkpoint")
    lose(dirs, "n0")
    flip_bytes(parity)
    version, levels, proc = restart(cfg)
    assert (version, levels) == (2, ["erasure", "scratch", "scratch", "scratch"])
    assert "cannot rebuild node n0" in proc.stderr, proc.stderr

    shutil.rmtree(dirs["scratch"])
    cfg = write_config(dirs, RS2, name="rs.ini")
    app(cfg, "checkpoint")
    lose(dirs, "n0")
    flip_bytes(parity)
    version, levels, _ = restart(cfg)
    assert (version, levels) == (3, ["erasure", "scratch", "scratch", "scratch"])


@pytest.mark.timeout(120)
def test_partner_and_xor_together_reprotect_both_levels(dirs):
    """n1 and n3 lost: too many for XOR, but their partners (n2, n0) hold copies. The
    restart restores both from there and rebuilds the lost parity too, so a later loss
    of n2 is rebuilt by XOR even with n2's partner copy gone."""
    cfg = write_config(dirs, {**PARTNER, **XOR})
    app(cfg, "checkpoint")
    lose(dirs, "n1", "n3")
    version, levels, _ = restart(cfg)
    assert (version, levels) == (3, ["scratch", "partner", "scratch", "partner"])
    for node in ("n1", "n3"):
        assert (dirs["scratch"] / node / ".erasure" / "ml" / "v3" / "group.json").is_file(), node
    lose(dirs, "n2")
    shutil.rmtree(dirs["scratch"] / "n3" / ".partner")
    version, levels, _ = restart(cfg)
    assert (version, levels) == (3, ["scratch", "scratch", "erasure", "scratch"])


@pytest.mark.timeout(120)
def test_heat_restarts_bit_exact_after_losing_a_node(dirs, tmp_path):
    """examples/heat.py on 4 nodes with partner + XOR: crash, lose n3, finish bit-exact."""
    if not HEAT.exists():
        pytest.skip("examples/heat.py not present")
    grid = ["--rows", 40, "--cols", 32, "--steps", 30]
    reference = tmp_path / "reference.npy"
    run_mpi([HEAT, *grid, "--no-checkpoint", "--out", reference], n=4, timeout=TIMEOUT)
    cfg = write_config(dirs, {**PARTNER, **XOR}, name="heat.ini")
    out = tmp_path / "out.npy"
    run = [HEAT, *grid, "--config", cfg, "--every", 10]
    crashed = run_mpi(run + ["--fail-at", 20, "--fail-rank", 3, "--out", out], nodes=NODES,
                      timeout=TIMEOUT, check=False)
    assert crashed.returncode != 0 and not out.exists(), crashed.stderr
    lose(dirs, "n3")
    proc = run_mpi(run + ["--out", out], nodes=NODES, timeout=TIMEOUT)
    assert "veloc: restarted from version 20 (levels: scratch=3, partner=1)" in proc.stdout, proc.stdout
    got, want = np.load(out), np.load(reference)
    assert got.tobytes() == want.tobytes()


@pytest.fixture
def backends(dirs):
    """Async mode: start the 4 nodes' backends as one MPI job (``mpiexec`` MPMD, one per
    virtual node), so partner and erasure work between them; ``start()``/``stop()``."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from conftest import mpiexec_path
    from veloc_backend import control
    runtime = Path(tempfile.mkdtemp(prefix="vml-", dir="/tmp"))
    env = dict(os.environ, VELOC_RUNTIME_DIR=str(runtime), PYTHONPATH=str(REPO))
    state = {"proc": None, "env": {"VELOC_RUNTIME_DIR": str(runtime)}}

    def start(cfg):
        cmd = [mpiexec_path()]
        for i, node in enumerate(NODES):
            cmd += ([":"] if i else []) + ["-n", "1", "-env", "VELOC_NODE_ID", node, sys.executable,
                                           "-m", "veloc_backend.main", str(cfg), "--idle-exit", "120"]
        state["proc"] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(control.job_backends(cfg, env)) < len(NODES):
            assert state["proc"].poll() is None, state["proc"].stderr.read().decode()
            assert time.monotonic() < deadline, "backends did not come up"
            time.sleep(0.2)

    def stop():
        proc, state["proc"] = state["proc"], None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    state.update(start=start, stop=stop, control=control, runtime_env=env)
    yield state
    stop()
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.timeout(150)
def test_async_mode_backends_rebuild_a_lost_node(dirs, backends):
    """mode = async: the backends (one MPI world) copy and encode in the background; a
    node is lost with its backend; new backends rebuild it from the erasure group."""
    cfg = write_config(dirs, {**PARTNER, **XOR}, mode="async")
    cfg.write_text(cfg.read_text().replace("mode = sync\n", ""))
    backends["start"](cfg)
    app(cfg, "checkpoint", env=backends["env"])
    backends["stop"]()
    assert (dirs["scratch"] / "n3" / ".erasure" / "ml" / "v3" / "group.json").is_file()
    assert (dirs["scratch"] / "n3" / ".partner" / "n2" / "ml" / "v3" / "r2.manifest.json").is_file()
    lose(dirs, "n2")
    shutil.rmtree(dirs["scratch"] / "n3" / ".partner")       # n2's partner copy is gone too
    backends["start"](cfg)
    version, levels, _ = restart(cfg, "--then", 4, env=backends["env"])
    assert (version, levels) == (3, ["scratch", "scratch", "erasure", "scratch"])
