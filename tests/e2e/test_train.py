"""End-to-end: kill ``examples/train.py`` mid-epoch, restart it, compare bit for bit.

Each case runs the example on 2 ranks under real ``mpiexec``: once without veloc (the
reference), once checkpointed with two-phase snapshots and the auto interval policy until
the last rank SIGKILLs itself after step ``CRASH_AT`` (mid-epoch), and once more to
resume. The resumed run must restart from a checkpoint and end with the reference's
weights and loss history (sha256 of both, printed by rank 0).
"""
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, kill_job_backends, run_mpi

pytestmark = pytest.mark.e2e

TRAIN = REPO / "examples" / "train.py"
SMALL = ["--samples", "384", "--features", "16", "--hidden", "32", "--batch", "8", "--epochs", "3"]
CRASH_AT = 60                      # of 72 steps (24 per epoch on 2 ranks): mid-epoch 3
DONE = re.compile(r"^train: done at step (\d+) .*$", re.M)
RESTARTED = re.compile(r"^train: restarted from version (\d+) \(level (\w+)\)$", re.M)


def _torch_importable():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


BACKENDS = ["numpy", pytest.param("torch", marks=pytest.mark.skipif(not _torch_importable(),
                                                                   reason="torch is not installed"))]
_references = {}


def reference(backend):
    """The uninterrupted run's last line, without its checkpoint count (computed once)."""
    if backend not in _references:
        proc = run_mpi([TRAIN, *SMALL, "--backend", backend, "--no-checkpoint"], n=2, timeout=300)
        _references[backend] = _done_line(proc.stdout)
    return _references[backend]


def _done_line(stdout):
    match = DONE.search(stdout)
    assert match, stdout
    return re.sub(r" checkpoints=\d+", "", match.group(0))


@pytest.fixture
def job(dirs):
    runtime = Path(tempfile.mkdtemp(prefix="vtrain-", dir="/tmp"))
    env = {"VELOC_RUNTIME_DIR": str(runtime)}
    yield dirs, env
    kill_job_backends(dirs["tmp"] / "veloc.ini", dict(os.environ, **env))
    shutil.rmtree(runtime, ignore_errors=True)


def write_config(dirs, mode):
    path = dirs["tmp"] / "veloc.ini"
    path.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\nmode = {mode}\n"
                    "scratch_versions = 2\nmax_versions = 2\n\n[policy]\nmode = auto\noverhead = 0.05\nwarmup = 3\n")
    return path


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_mid_epoch_and_restart_bit_for_bit(job, backend, mode):
    dirs, env = job
    cfg = write_config(dirs, mode)
    args = [TRAIN, *SMALL, "--backend", backend, "--config", cfg]
    crashed = run_mpi([*args, "--crash-at", CRASH_AT], n=2, env=env, timeout=300, check=False)
    assert crashed.returncode != 0 and not DONE.search(crashed.stdout), crashed.stdout + crashed.stderr
    resumed = run_mpi(args, n=2, env=env, timeout=300)
    restart = RESTARTED.search(resumed.stdout)
    assert restart, resumed.stdout + resumed.stderr
    assert 0 < int(restart.group(1)) <= CRASH_AT
    assert _done_line(resumed.stdout) == reference(backend)


def test_bad_config_is_a_clear_error(dirs):
    cfg = dirs["tmp"] / "bad.ini"
    cfg.write_text(f"scratch = {dirs['scratch']}\n[policy]\nmode = fixed\n")
    proc = run_mpi([TRAIN, *SMALL, "--backend", "numpy", "--config", cfg], n=2, timeout=120, check=False)
    assert proc.returncode != 0
    assert "[policy] mode = fixed needs 'interval'" in proc.stderr + proc.stdout
