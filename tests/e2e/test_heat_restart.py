"""End-to-end: crash ``examples/heat.py``, damage its checkpoints, restart, compare.

Every test drives real ``mpiexec`` runs (4 ranks on 2 virtual nodes, ``n0`` = ranks 0-1
and ``n1`` = ranks 2-3, told apart by ``VELOC_NODE_ID``) of the heat-diffusion example
in sync mode. A run that checkpoints every ``EVERY`` iterations is killed after
iteration ``FAIL_AT`` (rank 3 SIGKILLs itself once every rank has finished that
iteration and its checkpoint), the test then removes or corrupts files the way a lost
node or a bad disk would, restarts the job, and checks

* which version the job restarted from and from which level each rank read it (the
  ``veloc: restarted from version V (levels: ...)`` line printed by rank 0), and
* that the final grid equals the one of an uninterrupted run bit for bit.

On-disk layout relied on (docs/ARCHITECTURE.md): ``{scratch}/{name}/v{version}/r{rank}.vck``
plus ``r{rank}.manifest.json`` next to it; below ``{persistent}`` the rank files and one
``n<first>-<last>.commit.json`` record per node and version.
"""
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, flip_bytes, kill_job_backends, persistent_ranks, run_mpi

pytestmark = pytest.mark.e2e

HEAT = REPO / "examples" / "heat.py"
NODES = ["n0", "n0", "n1", "n1"]          # rank -> virtual node
STEPS, EVERY, FAIL_AT, FAIL_RANK = 40, 10, 30, 3
GRID = ["--rows", 50, "--cols", 40, "--steps", STEPS]
RESTART_LINE = re.compile(r"^veloc: restarted from version (\d+) \(levels: ([^)]*)\)$", re.M)
TIMEOUT = 90                              # seconds per mpiexec run


# --------------------------------------------------------------------------- helpers

def write_config(dirs, persistent=True, mode="sync", **extra):
    """An INI (sync mode unless told) in the test's tmp folder; scratch is per virtual node."""
    lines = [f"scratch = {dirs['scratch']}/{{node}}", f"mode = {mode}"]
    if persistent:
        lines += [f"persistent = {dirs['persistent']}", "persistent_interval = 0"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path = dirs["tmp"] / "veloc.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def heat(cfg, *args, check=True, env=None):
    """One checkpointing run of heat.py on the 4 ranks / 2 virtual nodes."""
    return run_mpi([HEAT, *GRID, "--config", cfg, "--every", EVERY, *args], nodes=NODES,
                   check=check, timeout=TIMEOUT, env=env)


def crash(cfg, out, env=None):
    """Run until rank FAIL_RANK dies after iteration FAIL_AT; assert it really died."""
    proc = heat(cfg, "--fail-at", FAIL_AT, "--fail-rank", FAIL_RANK, "--out", out, check=False, env=env)
    assert proc.returncode != 0, f"the run was supposed to crash:\n{proc.stdout}\n{proc.stderr}"
    assert f"rank {FAIL_RANK} failing after iteration {FAIL_AT}" in proc.stderr, proc.stderr
    assert not Path(out).exists(), "the crashed run must not reach the end"
    return proc


def restart(cfg, out, env=None):
    """Run to completion; return ``(version, {level: count})`` from the restart line."""
    proc = heat(cfg, "--out", out, env=env)
    match = RESTART_LINE.search(proc.stdout)
    assert match, f"no restart line in:\n{proc.stdout}\n{proc.stderr}"
    assert len(RESTART_LINE.findall(proc.stdout)) == 1, proc.stdout
    levels = {}
    for item in match.group(2).split(", "):
        level, count = item.split("=")
        levels[level] = int(count)
    assert sum(levels.values()) == len(NODES), match.group(0)
    assert f"heat: done at iteration {STEPS} " in proc.stdout, proc.stdout
    return int(match.group(1)), levels


def assert_bit_exact(out, reference):
    """The final grid equals the uninterrupted run's, bit for bit."""
    got, want = np.load(out), np.load(reference)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes(), f"max abs diff {np.abs(got - want).max()}"


def version_dir(root, version):
    """``{root}/heat/v{version}``: a level's folder for one version."""
    return Path(root) / "heat" / f"v{version}"


def rank_files(root, version, rank):
    """The files of ``rank`` for ``version`` below a level's root (data and manifest)."""
    return sorted(version_dir(root, version).glob(f"r{rank}.*"))


def scratch_of(dirs, rank):
    """Scratch root of the virtual node that ``rank`` runs on."""
    return dirs["scratch"] / NODES[rank]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final grid of an uninterrupted run without checkpoints (same ranks and grid)."""
    out = tmp_path_factory.mktemp("reference") / "reference.npy"
    run_mpi([HEAT, *GRID, "--no-checkpoint", "--out", out], n=len(NODES), timeout=TIMEOUT)
    return out


# --------------------------------------------------------------------------- tests

@pytest.mark.timeout(240)
def test_reference_does_not_depend_on_rank_count(reference, tmp_path):
    """Sanity of the example itself: 1 rank and 4 ranks compute the same grid."""
    out = tmp_path / "one.npy"
    run_mpi([HEAT, *GRID, "--no-checkpoint", "--out", out], n=1, timeout=TIMEOUT)
    assert_bit_exact(out, reference)


@pytest.mark.timeout(240)
def test_no_checkpoint_starts_fresh_then_restarts_at_the_end(dirs, reference):
    """Without any checkpoint the job starts from the initial state; a second run of a
    finished job restores the last version and has nothing left to compute."""
    cfg = write_config(dirs)
    out = dirs["tmp"] / "fresh.npy"
    proc = heat(cfg, "--out", out)
    assert "heat: no checkpoint found, starting from the initial state" in proc.stdout
    assert not RESTART_LINE.search(proc.stdout), proc.stdout
    assert f"heat: done at iteration {STEPS} ({STEPS} iterations in this run" in proc.stdout
    assert_bit_exact(out, reference)
    for rank in range(len(NODES)):
        assert rank_files(scratch_of(dirs, rank), STEPS, rank), f"rank {rank}: no scratch copy"

    out.unlink()
    version, levels = restart(cfg, out)
    assert (version, levels) == (STEPS, {"scratch": 4})
    assert_bit_exact(out, reference)


def newest_of_rank0(dirs, suffix):
    path = version_dir(scratch_of(dirs, 0), FAIL_AT) / f"r0.{suffix}"
    assert path.is_file(), f"layout changed? {sorted(path.parent.parent.rglob('*'))}"
    return path


def lose_all_scratch(dirs):
    for node in set(NODES):
        shutil.rmtree(dirs["scratch"] / node)


def lose_rank1_newest_everywhere(dirs):
    doomed = rank_files(scratch_of(dirs, 1), FAIL_AT, 1) + rank_files(dirs["persistent"], FAIL_AT, 1)
    assert len(doomed) >= 2, f"layout changed? {sorted(dirs['persistent'].rglob('*'))}"
    for path in doomed:
        path.unlink()


def lose_scratch_and_node_record(torn):
    """Every scratch lost, and node n1's persistent commit record of the newest version
    gone (its engine died before the commit) or torn (half written by a bad disk)."""
    def damage(dirs):
        lose_all_scratch(dirs)
        record = version_dir(dirs["persistent"], FAIL_AT) / "n2-3.commit.json"
        assert record.is_file(), f"layout changed? {sorted(record.parent.iterdir())}"
        if torn:
            record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
        else:
            record.unlink()
    return damage


# name: (persistent level?, damage done after the crash, expected (version, levels), why)
SCENARIOS = {
    "scratch_only": (False, lambda dirs: None, (FAIL_AT, {"scratch": 4}),
                     "no persistent level at all: every rank restores the newest version from scratch"),
    "all_scratch_lost": (True, lose_all_scratch, (FAIL_AT, {"persistent": 4}),
                         "every node lost its scratch: every rank restores from persistent storage"),
    "one_node_lost": (True, lambda dirs: shutil.rmtree(dirs["scratch"] / "n1"),
                      (FAIL_AT, {"scratch": 2, "persistent": 2}),
                      "node n1 lost its scratch: its 2 ranks read persistent, n0's ranks read scratch"),
    "corrupt_file_with_persistent": (True, lambda dirs: flip_bytes(newest_of_rank0(dirs, "vck")),
                                     (FAIL_AT, {"scratch": 3, "persistent": 1}),
                                     "rank 0's newest scratch file is corrupt: rank 0 reads the persistent "
                                     "copy of the same version, the others still read scratch"),
    "corrupt_file_scratch_only": (False, lambda dirs: flip_bytes(newest_of_rank0(dirs, "vck")),
                                  (FAIL_AT - EVERY, {"scratch": 4}),
                                  "rank 0's newest file is corrupt and there is no other copy: everybody "
                                  "agrees on the previous version, still on scratch"),
    "corrupt_manifest": (False, lambda dirs: newest_of_rank0(dirs, "manifest.json").write_text("{ not json"),
                         (FAIL_AT - EVERY, {"scratch": 4}),
                         "rank 0's newest manifest is garbage (a torn write on a bad disk): the job restarts "
                         "from the previous version, and checkpointing the newest version number again "
                         "overwrites the bad copy instead of failing"),
    "node_record_missing": (True, lose_scratch_and_node_record(torn=False), (FAIL_AT - EVERY, {"persistent": 4}),
                            "no scratch left and n1's record of the newest version was never committed: "
                            "ranks 2-3 have no persistent copy of it, so all ranks read the previous one"),
    "node_record_torn": (True, lose_scratch_and_node_record(torn=True), (FAIL_AT - EVERY, {"persistent": 4}),
                         "no scratch left and n1's record of the newest version is torn: its ranks' copies "
                         "are refused with the record's error, so all ranks read the previous one"),
    "newest_missing_for_one_rank": (True, lose_rank1_newest_everywhere, (FAIL_AT - EVERY, {"scratch": 4}),
                                    "rank 1 lost the newest version on every level: all ranks agree on the "
                                    "older one"),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_crash_damage_restart_is_bit_exact(dirs, reference, scenario):
    """Crash after a checkpoint, damage what the scenario says, restart: the job resumes
    from the expected version and levels and ends bit-for-bit equal to an uninterrupted run."""
    persistent, damage, expected, _why = SCENARIOS[scenario]
    cfg = write_config(dirs, persistent=persistent)
    out = dirs["tmp"] / "out.npy"
    crash(cfg, out)
    damage(dirs)
    assert restart(cfg, out) == expected
    assert_bit_exact(out, reference)


@pytest.mark.timeout(240)
def test_async_restart_from_node_records_after_losing_all_scratch(dirs, reference):
    """Async mode: the two node backends flush in the background, each committing one
    record per version for its two ranks; after the crash and the loss of every scratch
    the job restarts from those records."""
    runtime = Path(tempfile.mkdtemp(prefix="vheat-", dir="/tmp"))
    env = {"VELOC_RUNTIME_DIR": str(runtime)}
    cfg = write_config(dirs, mode="async")
    try:
        out = dirs["tmp"] / "out.npy"
        crash(cfg, out, env=env)
        newest = version_dir(dirs["persistent"], FAIL_AT)
        deadline = time.monotonic() + 60
        while persistent_ranks(newest) != [0, 1, 2, 3]:
            assert time.monotonic() < deadline, "the backends did not commit the version at persistent"
            time.sleep(0.1)
        kill_job_backends(cfg, dict(os.environ, **env))        # a lost job's backends are gone too
        assert sorted(p.name for p in newest.glob("*.json")) == ["n0-1.commit.json", "n2-3.commit.json"]
        lose_all_scratch(dirs)
        assert restart(cfg, out, env=env) == (FAIL_AT, {"persistent": 4})
        assert_bit_exact(out, reference)
    finally:
        kill_job_backends(cfg, dict(os.environ, **env))
        shutil.rmtree(runtime, ignore_errors=True)
