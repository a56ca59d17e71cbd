"""Shared fixtures: per-test scratch/persistent folders and an ``mpiexec`` runner.

Every MPI or e2e test runs real processes under the ``mpiexec`` that the ``mpich``
wheel installs next to the test interpreter, with a hard timeout so nothing hangs.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def mpiexec_path():
    """The mpiexec next to this interpreter (the mpich wheel's), else the one on PATH."""
    local = BIN / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec: pip install mpich")
    return found


def run_mpi(args, n=2, env=None, timeout=120, nodes=None, check=True, cwd=None):
    """Run ``python ARGS`` under mpiexec and return the CompletedProcess.

    ``nodes``: a list of virtual node ids, one rank each in order (MPMD form with
    ``-env VELOC_NODE_ID``); otherwise ``n`` ranks share this machine's node id.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    cmd = [mpiexec_path()]
    if nodes:
        for i, node in enumerate(nodes):
            if i:
                cmd.append(":")
            cmd += ["-n", "1", "-env", "VELOC_NODE_ID", node, sys.executable, *map(str, args)]
    else:
        cmd += ["-n", str(n), sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, env=full_env, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def flip_bytes(path):
    """Corrupt a file in place (same size): invert 16 bytes in the middle of it."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_mpich_segments():
    """A SIGKILLed rank leaves MPICH's shared-memory segment in /dev/shm; remove the ones
    this session created once every job has ended."""
    start = time.time() - 1
    yield
    if os.environ.get("VELOC_MPI_CASES") == "1":
        return     # a rank of a running job: its own segment is still in use
    for seg in Path("/dev/shm").glob("mpich_shm_*"):
        try:
            if seg.stat().st_mtime >= start and seg.stat().st_uid == os.getuid():
                seg.unlink()
        except OSError:
            pass


@pytest.fixture
def dirs(tmp_path):
    """Fresh scratch (on tmpfs when available) and persistent folders for one test."""
    shm = Path("/dev/shm")
    base = shm / f"veloc-test-{uuid.uuid4().hex[:10]}" if shm.is_dir() else tmp_path / "shm"
    scratch = base / "scratch"
    persistent = tmp_path / "persistent"
    scratch.mkdir(parents=True)
    persistent.mkdir()
    yield {"scratch": scratch, "persistent": persistent, "base": base, "tmp": tmp_path}
    shutil.rmtree(base, ignore_errors=True)


def pytest_runtest_logreport(report):
    """Under mpiexec (tests/mpi), a test failing on one rank aborts the whole job instead of
    leaving the other ranks waiting in a collective; its report is printed first."""
    if os.environ.get("VELOC_MPI_CASES") != "1" or not report.failed:
        return
    from mpi4py import MPI
    sys.stdout.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] FAILED {report.nodeid}\n{report.longreprtext}\n")
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(1)


def kill_job_backends(cfg, env):
    """SIGKILL every backend of the job configured by ``cfg`` (a test's cleanup)."""
    from veloc_backend import control
    for _ep, status in control.job_backends(cfg, env):
        try:
            os.kill(status["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def node_cfg(dirs):
    """A config mapping: scratch per node (``{node}``), one persistent folder."""
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


def rank0_file(dirs, name, version, level):
    """Rank 0's ``.vck`` of ``version`` at ``level`` (scratch: the one node folder) for a
    :func:`node_cfg` job."""
    root = dirs["persistent"] if level == "persistent" else next(dirs["scratch"].iterdir())
    return root / name / f"v{version}" / "r0.vck"


def two_versions_newest_corrupt(client, a, dirs):
    """Protect ``a`` as "a", checkpoint "h" v1, then v2 with ``a + 1``, flip bytes in v2's
    scratch and persistent copies, and set ``a`` to -1 (nothing restored yet)."""
    client.protect("a", a)
    client.checkpoint("h", 1)
    a += 1
    client.checkpoint("h", 2)
    for level in ("scratch", "persistent"):
        flip_bytes(rank0_file(dirs, "h", 2, level))
    a[:] = -1


def persistent_ranks(vdir):
    """Ranks whose copy in persistent version folder ``vdir`` is committed (listed by a
    node's commit record, or an old per-rank manifest)."""
    from veloc.storage.levels import LevelStore
    vdir = Path(vdir)
    return LevelStore("persistent", vdir.parent.parent).version_ranks(vdir.parent.name, int(vdir.name[1:]))


def write_vck(path, regions, name="t", version=1, rank=0):
    """Write the ``veloc.regions.Region`` objects ``regions`` as a native rank file at
    ``path`` (what a rank's local write produces), for reader tests."""
    from veloc.storage.rankfile import build_header, write_rank_file
    snaps = [r.snapshot() for r in regions]
    header, infos, total = build_header(name, version, rank, [d for d, _ in snaps])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_rank_file(fd, header, infos, [b for _, b in snaps], total)
    finally:
        os.close(fd)
