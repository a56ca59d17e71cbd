"""Async mode end to end: application ranks under mpiexec, the node backends they start
(or ``veloc-run`` starts), the engine in the backend, crashes, failures, drain/status.

Each test gets its own runtime folder (``VELOC_RUNTIME_DIR``) and stops every backend
it started.
"""
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, run_mpi

PKG = "veloc_backend" if importlib.util.find_spec("veloc_backend") else "backend"
control = importlib.import_module(f"{PKG}.control")
lifecycle = importlib.import_module(f"{PKG}.lifecycle")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

APP = textwrap.dedent("""
    import os, sys, numpy as np, veloc
    from mpi4py import MPI
    cfg, first, last, crash = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    comm = MPI.COMM_WORLD
    ck = veloc.init(cfg, comm)
    a = np.full(200_000, -1.0)
    ck.protect("a", a)
    v = ck.restart_test("job")
    print(f"rank {comm.rank} restart_test {v}", flush=True)
    if v is not None:
        ck.restart("job", v)
        assert (a == v * 10 + comm.rank).all(), "restored data is wrong"
    for i in range(first, last + 1):
        a[:] = i * 10 + comm.rank
        try:
            ck.checkpoint("job", i)
        except veloc.VelocError as exc:
            print(f"rank {comm.rank} ERROR {type(exc).__name__}: {exc}", flush=True)
            sys.exit(5)
    if crash == "crash":
        os._exit(1)                 # no finalize, no drain: the backend must finish alone
    ck.finalize()
    print(f"rank {comm.rank} done", flush=True)
    sys.exit(int(crash) if crash.isdigit() else 0)
""")


@pytest.fixture
def ajob(dirs):
    runtime = Path(tempfile.mkdtemp(prefix="vas-", dir="/tmp"))
    app = dirs["tmp"] / "app.py"
    app.write_text(APP)
    cfg = dirs["tmp"] / "async.ini"
    cfg.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n"
                   "mode = async\n")
    env = {"VELOC_RUNTIME_DIR": str(runtime)}
    full_env = dict(os.environ, **env)
    yield {"cfg": cfg, "app": app, "env": env, "full_env": full_env, **dirs}
    for ep, st in control.job_backends(cfg, full_env):
        try:
            os.kill(st["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(runtime, ignore_errors=True)


def persisted(ajob, version):
    vdir = Path(ajob["persistent"]) / "job" / f"v{version}"
    return sorted(p.name for p in vdir.glob("r*.manifest.json")) if vdir.is_dir() else []


def test_async_checkpoint_then_restart(ajob):
    t0 = time.monotonic()
    out = run_mpi([ajob["app"], ajob["cfg"], 1, 3, "ok"], n=2, env=ajob["env"]).stdout
    first_run = time.monotonic() - t0
    assert "rank 0 restart_test None" in out and "rank 1 done" in out
    for v in (1, 2, 3):
        assert persisted(ajob, v) == ["r0.manifest.json", "r1.manifest.json"]
    (entry,) = control.status(ajob["cfg"], ajob["full_env"])
    assert entry["alive"] and entry["pending"] == 0 and entry["counts"]["done"] >= 3
    log = Path(entry["log"]).read_text()
    assert "CHECKPOINT" in log and "flush=" in log and "checksum=" in log
    out = run_mpi([ajob["app"], ajob["cfg"], 4, 4, "ok"], n=2, env=ajob["env"]).stdout
    assert "rank 1 restart_test 3" in out and "rank 0 done" in out
    assert persisted(ajob, 4)
    print(f"first async run (incl. backend start): {first_run:.2f} s")


def test_backend_finishes_work_after_app_crash(ajob):
    proc = run_mpi([ajob["app"], ajob["cfg"], 1, 2, "crash"], n=2, env=ajob["env"], check=False)
    assert proc.returncode != 0
    res = control.drain(ajob["cfg"], ajob["full_env"], timeout=60)
    assert res["drained"] and not res["failures"]
    assert persisted(ajob, 2) == ["r0.manifest.json", "r1.manifest.json"]
    text = control.format_status(control.status(ajob["cfg"], ajob["full_env"]))
    assert "0 pending" in text


def test_background_failure_reaches_checkpoint_wait(ajob):
    blocker = Path(ajob["tmp"]) / "not-a-dir"
    blocker.write_text("x")
    ajob["cfg"].write_text(ajob["cfg"].read_text().replace(
        f"persistent = {ajob['persistent']}", f"persistent = {blocker}/sub"))
    proc = run_mpi([ajob["app"], ajob["cfg"], 1, 2, "ok"], n=2, env=ajob["env"], check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert errors, proc.stdout + proc.stderr
    assert "BackendError" in errors[0] and "flush" in errors[0] and "v1" in errors[0]


def test_launcher_virtual_nodes_exit_code_and_drain(ajob):
    cmd = [sys.executable, "-m", f"{PKG}.launcher", "-n", "4", "--virtual-nodes", "2",
           "--config", str(ajob["cfg"]), "--wait", "--",
           sys.executable, str(ajob["app"]), str(ajob["cfg"]), "1", "2", "3"]
    env = dict(ajob["full_env"], PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "backend for node vnode0" in proc.stderr and "vnode1" in proc.stderr
    assert persisted(ajob, 2) == [f"r{r}.manifest.json" for r in range(4)]
    deadline = time.monotonic() + 30
    while control.job_backends(ajob["cfg"], ajob["full_env"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert control.job_backends(ajob["cfg"], ajob["full_env"]) == []   # stopped once drained
    assert set(os.listdir(Path(ajob["scratch"]))) >= {"vnode0", "vnode1"}


SINGLE = textwrap.dedent("""
    import sys, numpy as np, veloc
    cfg = {"scratch": sys.argv[1], "persistent": sys.argv[2], "mode": "async"}
    ck = veloc.init_single(7, cfg)
    x = np.arange(1000.0)
    ck.protect(0, x)
    ck.checkpoint("single", 1)
    ck.checkpoint_wait()
    assert ck.checkpoint_finished()
    x[:] = 0
    assert ck.restart_test("single") == 1
    ck.restart("single", 1)
    assert x[5] == 5.0
    ck.finalize()
    print("single ok")
""")


def test_init_single_with_mapping_config(ajob):
    script = Path(ajob["tmp"]) / "single.py"
    script.write_text(SINGLE)
    env = dict(ajob["full_env"], PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), VELOC_NODE_ID="solo")
    proc = subprocess.run([sys.executable, str(script), f"{ajob['scratch']}/{{node}}",
                           str(ajob["persistent"])], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "single ok" in proc.stdout, proc.stdout + proc.stderr
    assert (Path(ajob["persistent"]) / "single" / "v1" / "r7.manifest.json").exists()
    cfg_map = {"scratch": f"{ajob['scratch']}/{{node}}", "mode": "async"}
    backends = control.job_backends(cfg_map, env)
    assert len(backends) == 1 and (backends[0][0].dir / "config.ini").exists()
