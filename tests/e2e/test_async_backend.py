"""Async mode end to end: application ranks under mpiexec, the node backends they start
(or ``veloc-run`` starts), the engine in the backend, crashes, failures, drain/status.

Each test gets its own runtime folder (``VELOC_RUNTIME_DIR``) and stops every backend
it started.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, kill_job_backends, persistent_ranks, run_mpi
from veloc import ipc

PKG = "veloc_backend"
from veloc_backend import control
from veloc_backend import lifecycle
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
    kill_job_backends(cfg, full_env)
    shutil.rmtree(runtime, ignore_errors=True)


def persisted(ajob, version):
    """Ranks with a committed persistent copy of ``version``."""
    return persistent_ranks(Path(ajob["persistent"]) / "job" / f"v{version}")


def test_async_checkpoint_then_restart(ajob):
    t0 = time.monotonic()
    out = run_mpi([ajob["app"], ajob["cfg"], 1, 3, "ok"], n=2, env=ajob["env"]).stdout
    first_run = time.monotonic() - t0
    assert "rank 0 restart_test None" in out and "rank 1 done" in out
    for v in (1, 2, 3):
        assert persisted(ajob, v) == [0, 1]
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
    assert persisted(ajob, 2) == [0, 1]
    text = control.format_status(control.status(ajob["cfg"], ajob["full_env"]))
    assert "0 pending" in text


def test_background_failure_reaches_checkpoint_wait(ajob):
    blocker = Path(ajob["tmp"]) / "not-a-dir"
    blocker.write_text("x")
    ajob["cfg"].write_text(ajob["cfg"].read_text().replace(
        f"persistent = {ajob['persistent']}", f"persistent = {blocker}/sub"))
    # v1's failure is raised by the first checkpoint that waits for v1: v3 at the latest
    # (v2 waits for it only when no recycled or prepared scratch file is ready)
    proc = run_mpi([ajob["app"], ajob["cfg"], 1, 3, "ok"], n=2, env=ajob["env"], check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert errors, proc.stdout + proc.stderr
    # the rank that learns of it first raises the BackendError itself; when that is v2 on
    # one rank (the other had a prepared scratch file), the others raise the agreement's
    # CheckpointError naming it: every rank names v1, one raises BackendError about flush
    assert all("v1" in line for line in errors), errors
    assert any("BackendError" in line and "flush" in line and "v1" in line for line in errors), errors


def test_launcher_virtual_nodes_exit_code_and_drain(ajob):
    cmd = [sys.executable, "-m", f"{PKG}.launcher", "-n", "4", "--virtual-nodes", "2",
           "--config", str(ajob["cfg"]), "--wait", "--",
           sys.executable, str(ajob["app"]), str(ajob["cfg"]), "1", "2", "3"]
    env = dict(ajob["full_env"], PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "backend for node vnode0" in proc.stderr and "vnode1" in proc.stderr
    assert persisted(ajob, 2) == [0, 1, 2, 3]
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
    assert persistent_ranks(Path(ajob["persistent"]) / "single" / "v1") == [7]
    cfg_map = {"scratch": f"{ajob['scratch']}/{{node}}", "mode": "async"}
    backends = control.job_backends(cfg_map, env)
    assert len(backends) == 1 and (backends[0][0].dir / "config.ini").exists()


# --------------------------------------------------------------------------- backend world

from veloc_backend import launcher
VNODES = ["vnode0", "vnode1"]

WORLD_APP = textwrap.dedent("""
    import os, sys, time, numpy as np, veloc
    from mpi4py import MPI
    from veloc.config import node_id
    cfg, last, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    comm = MPI.COMM_WORLD
    ck = veloc.init(cfg, comm)
    a = np.full(100_000 + comm.rank, -1.0)
    ck.protect("a", a)
    v = ck.restart_test("job")
    if v is not None:
        ck.restart("job", v)
        assert (a == v * 10 + comm.rank).all(), "restored data is wrong"
    levels = comm.gather(ck.last_restart.level if v is not None else None, root=0)
    if comm.rank == 0:
        print(f"restarted {v} levels {levels}", flush=True)
    for i in range((v or 0) + 1, last + 1):
        a[:] = i * 10 + comm.rank
        if how == f"vnode1-dies-at-{i}" and node_id() == "vnode1":
            def die(name, version):         # dies before submitting (after the others did)
                time.sleep(0.5)
                os._exit(1)
            ck.host.checkpoint = die
        ck.checkpoint("job", i)
        if how == f"vnode1-dies-at-{i}":
            os._exit(1)
    if how == "crash":
        comm.Barrier()      # every rank's checkpoint() returned (submitted), then all die
        os._exit(1)
    ck.finalize()
""")


def veloc_run(ajob, np_, *app_args, extra=(), timeout=90):
    """``veloc-run -n NP --virtual-nodes 2 --wait`` of WORLD_APP; the CompletedProcess."""
    app = Path(ajob["tmp"]) / "world_app.py"
    app.write_text(WORLD_APP)
    cmd = [sys.executable, "-m", f"{PKG}.launcher", "-n", str(np_), "--virtual-nodes", "2",
           "--config", str(ajob["cfg"]), "--wait", *extra, "--",
           sys.executable, str(app), str(ajob["cfg"]), *map(str, app_args)]
    env = dict(ajob["full_env"], PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def node_env(ajob, node):
    return dict(ajob["full_env"], VELOC_NODE_ID=node)


def drain_and_stop(cfg, ajob, node):
    """Let ``node``'s backend finish every pending version (no failure), then stop it."""
    res = control.drain(cfg, node_env(ajob, node), timeout=60)
    assert res["drained"] and not res["failures"], res
    assert control.shutdown(lifecycle.resolve(cfg, node_env(ajob, node))[2])


def backend_log(ajob, node):
    config, node, ep = lifecycle.resolve(ajob["cfg"], node_env(ajob, node))
    return lifecycle.log_path(config, node, ep).read_text()


def use_partner(ajob, persistent=False):
    text = ajob["cfg"].read_text()
    if not persistent:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("persistent"))
    ajob["cfg"].write_text(text + "\n[partner]\nenabled = true\n")


def test_launcher_backend_world_partner_rebuilds_a_lost_node(ajob):
    """(d) veloc-run, 2 virtual nodes, partner on, no persistent level: crash, lose
    vnode1's scratch, restart: vnode1's ranks come back from their partner copies."""
    use_partner(ajob)
    t0 = time.monotonic()
    proc = veloc_run(ajob, 4, 3, "crash")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "backend world of 2 node(s) started" in proc.stderr
    for node in VNODES:
        assert "backend world ready: 2 node(s)" in backend_log(ajob, node)
        assert "skipped" not in backend_log(ajob, node)
    assert (Path(ajob["scratch"]) / "vnode0" / ".partner" / "vnode1" / "job" / "v3"
            / "r3.manifest.json").is_file()
    shutil.rmtree(Path(ajob["scratch"]) / "vnode1")          # the node is lost
    proc = veloc_run(ajob, 4, 4, "ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restarted 3 levels ['scratch', 'scratch', 'partner', 'partner']" in proc.stdout
    assert (Path(ajob["scratch"]) / "vnode1" / "job" / "v4" / "r3.manifest.json").is_file()
    print(f"two launcher runs with a node loss: {time.monotonic() - t0:.1f} s")


def test_version_missing_on_one_node_skips_collective_levels(ajob):
    """vnode1's ranks die after committing v2 to scratch but before submitting it,
    vnode0's submit it: vnode0's backend does not wait for vnode1 in the partner module;
    after the deadline v2 runs there alone (logged). The next job restarts from v2 (on
    every scratch) and its versions get partner copies again."""
    use_partner(ajob)
    t0 = time.monotonic()
    proc = veloc_run(ajob, 4, 3, "vnode1-dies-at-2", extra=("--collective-deadline", "1.5"))
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    log0 = backend_log(ajob, "vnode0")
    assert re.search(r"job v2: collective levels \(partner\) skipped on node vnode0: node\(s\) "
                     r"vnode1 did not submit it within 1.5 s", log0), log0
    held = Path(ajob["scratch"]) / "vnode1" / ".partner" / "vnode0" / "job"
    assert (held / "v1" / "r0.manifest.json").is_file() and not (held / "v2").exists()
    assert (Path(ajob["scratch"]) / "vnode0" / "job" / "v2" / "r1.manifest.json").is_file()
    proc = veloc_run(ajob, 4, 3, "ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restarted 2 levels ['scratch', 'scratch', 'scratch', 'scratch']" in proc.stdout
    assert (held / "v3" / "r1.manifest.json").is_file()     # full collective work again
    assert elapsed < 30
    print(f"crashed run with the missing version: {elapsed:.1f} s")


@pytest.fixture
def world_of_two(ajob):
    """A backend world of vnode0 and vnode1 started the way veloc-run starts it, with a
    1 s peer timeout; yields ``{node: pid}``; stops everything at the end."""
    use_partner(ajob, persistent=True)
    proc, eps, _out = launcher.start_world(ajob["cfg"], launcher.mpiexec_path(), VNODES,
                                           extra_args=("--peer-timeout", "1", "--idle-exit", "60"),
                                           env=ajob["full_env"])
    pids = {ep.node_id: lifecycle.read_pid(ep) for ep in eps}
    yield {"proc": proc, "pids": pids, "eps": dict(zip(VNODES, eps))}
    for pid in pids.values():
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)


def wait_log(ajob, node, pattern, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = backend_log(ajob, node)
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the log of {node}:\n{backend_log(ajob, node)}")


@pytest.mark.parametrize("hung", VNODES)
def test_hung_world_member_breaks_the_world_not_the_node(ajob, world_of_two, hung):
    """One backend of the world stops answering (SIGSTOP): the other logs a clear error
    within the peer timeout and goes on serving its node alone: its application still
    checkpoints to persistent, and its checkpoint_wait() says that the configured partner
    level was not reached for that version (never a silent success); nothing waits
    forever, and everything exits."""
    other = "vnode1" if hung == "vnode0" else "vnode0"
    os.kill(world_of_two["pids"][hung], signal.SIGSTOP)
    t0 = time.monotonic()
    why = ("node\\(s\\) vnode1 did not answer within 1 s" if hung == "vnode1"
           else "the coordinator, node vnode0, did not answer within 3 s")
    wait_log(ajob, other, f"ERROR .*backend world broken: {why}")
    detected = time.monotonic() - t0
    assert detected < 10
    proc = run_mpi([ajob["app"], ajob["cfg"], 1, 3, "ok"], n=2, env={**ajob["env"], "VELOC_NODE_ID": other},
                   check=False)        # v3 waits for v1 (v2 may not: a prepared scratch file is ready)
    assert proc.returncode != 0 and "rank 1 done" not in proc.stdout
    assert re.search(r"rank 1 ERROR BackendError: .*job v1 failed: .*the partner level is configured "
                     r"\(\[partner\]\) but job v1 cannot reach it", proc.stdout), proc.stdout
    assert persisted(ajob, 1) == [0, 1]   # its local levels are done
    with ipc.BackendConnection(world_of_two["eps"][other].socket, 10) as conn:
        assert conn.request({"op": "status"})["world"]["broken"]
    os.kill(world_of_two["pids"][hung], signal.SIGCONT)      # it finds itself alone too
    wait_log(ajob, hung, "ERROR .*backend world broken")
    world_of_two["proc"].send_signal(signal.SIGTERM)         # mpiexec forwards it
    world_of_two["proc"].wait(timeout=20)
    print(f"lost member detected after {detected:.1f} s")


def test_member_leaving_the_world_leaves_the_others_serving(ajob, world_of_two):
    os.kill(world_of_two["pids"]["vnode1"], signal.SIGTERM)
    wait_log(ajob, "vnode0", r"node\(s\) vnode1 left the backend world")
    assert "backend stopped" in wait_log(ajob, "vnode1", "backend stopped")
    assert lifecycle.ping(world_of_two["eps"]["vnode0"]) is not None
    control.shutdown(world_of_two["eps"]["vnode0"])
    assert world_of_two["proc"].wait(timeout=20) == 0


PEERS_APP = textwrap.dedent("""
    import time
    from mpi4py import MPI
    from veloc.engine.module import Peers
    from veloc.errors import BackendError
    comm = MPI.COMM_WORLD
    comms = [comm.Dup(), comm.Dup()]
    if comm.rank == 1:                  # never reaches the collectives
        time.sleep(1.5)
    else:
        for peers in (Peers(comms[0], timeout=0.5), Peers(comms[1], abort=lambda: "world broken")):
            t0 = time.monotonic()
            try:
                peers.allgather(1)
            except BackendError as exc:
                assert time.monotonic() - t0 < 2, "no bounded wait"
                print("raised:", exc, flush=True)
            try:
                peers.agree(1)
            except BackendError:
                print("still broken", flush=True)
""")


def test_peers_barrier_gives_up_after_its_timeout_or_on_abort(ajob):
    script = Path(ajob["tmp"]) / "peers.py"
    script.write_text(PEERS_APP)
    out = run_mpi([script], n=2, timeout=60).stdout
    assert "did not reach the same step within 0.5 s" in out and "world broken" in out
    assert out.count("still broken") == 2


# --------------------------------------------------------------------------- async e2e

import test_heat_restart as heat_e2e                                  # noqa: E402
from test_heat_restart import reference                               # noqa: E402,F401 (fixture)


def test_heat_async_crash_drain_lose_all_scratch_restart_from_persistent(ajob, reference,
                                                                         monkeypatch):
    """(a) examples/heat.py in async mode on 2 virtual nodes: crash after a checkpoint,
    let the backends finish (veloc drain), lose ALL scratch, restart from persistent:
    the final grid equals the uninterrupted run's bit for bit."""
    monkeypatch.setenv("VELOC_RUNTIME_DIR", ajob["env"]["VELOC_RUNTIME_DIR"])
    cfg = heat_e2e.write_config(ajob)
    cfg.write_text(cfg.read_text().replace("mode = sync", "mode = async"))
    out = Path(ajob["tmp"]) / "heat.npy"
    heat_e2e.crash(cfg, out)
    for node in sorted(set(heat_e2e.NODES)):
        drain_and_stop(cfg, ajob, node)
        shutil.rmtree(Path(ajob["scratch"]) / node)
    for rank in range(len(heat_e2e.NODES)):
        assert heat_e2e.rank_files(ajob["persistent"], heat_e2e.FAIL_AT, rank), rank
    version, levels = heat_e2e.restart(cfg, out)
    assert (version, levels) == (heat_e2e.FAIL_AT, {"persistent": 4})
    heat_e2e.assert_bit_exact(out, reference)


BIG_APP = textwrap.dedent("""
    import os, sys, numpy as np, veloc
    from mpi4py import MPI
    cfg, mib = sys.argv[1], int(sys.argv[2])
    comm = MPI.COMM_WORLD
    ck = veloc.init(cfg, comm)
    a = np.full(mib << 17, float(comm.rank + 1))       # mib MiB of float64
    ck.protect("a", a)
    ck.checkpoint("job", 1)
    comm.Barrier()
    print(f"rank {comm.rank} submitted", flush=True)
    os._exit(0)                       # crash: the backend goes on with the flush alone
""")


def big_app(ajob, mib):
    script = Path(ajob["tmp"]) / "big.py"
    script.write_text(BIG_APP)
    return run_mpi([script, ajob["cfg"], mib], n=2, env=ajob["env"], check=False, timeout=120)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pred()
        if found:
            return found
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def veloc_cli(ajob, *args):
    env = dict(ajob["full_env"], PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "veloc.cli.commands", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_backend_killed_in_the_middle_of_a_flush_then_resumed(ajob):
    """(b) SIGKILL the backend while it copies a 200 MiB-per-rank version to persistent
    (on /tmp): nothing torn is committed (the rank files are staged under their names,
    the node's record is missing); ``veloc drain`` resumes the journal, the flush
    completes, checksums verify, and no temporary file is left behind."""
    persistent = Path(tempfile.mkdtemp(prefix="veloc-pers-", dir="/tmp"))
    try:
        ajob["cfg"].write_text(ajob["cfg"].read_text().replace(
            f"persistent = {ajob['persistent']}", f"persistent = {persistent}"))
        proc = big_app(ajob, 200)
        assert proc.stdout.count("submitted") == 2, proc.stdout + proc.stderr
        vdir = persistent / "job" / "v1"
        staged = wait_for(lambda: list(vdir.glob("r*.vck")) if vdir.is_dir() else [], 60,
                          "the flush to start")
        (entry,) = control.status(ajob["cfg"], ajob["full_env"])
        os.kill(entry["pid"], signal.SIGKILL)
        wait_for(lambda: not lifecycle.backend_alive(lifecycle.resolve(ajob["cfg"], ajob["full_env"])[2]),
                 30, "the backend to die")
        assert not list(vdir.glob("n*.commit.json")), "killed too late"     # the node's record
        assert persistent_ranks(vdir) == [] and any(p.exists() for p in staged)
        (entry,) = control.status(ajob["cfg"], ajob["full_env"])
        assert not entry["alive"] and entry["journaled"] == 2
        t0 = time.monotonic()
        drained = veloc_cli(ajob, "drain", ajob["cfg"], "--timeout", 90)
        assert drained.returncode == 0 and "drained" in drained.stdout, drained.stdout + drained.stderr
        resumed = time.monotonic() - t0
        assert persistent_ranks(vdir) == [0, 1]
        assert not list(vdir.glob(".*")), f"left behind: {list(vdir.glob('.*'))}"
        verify = veloc_cli(ajob, "verify", ajob["cfg"], "job", 1)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert re.search(r"OK +persistent +job v1 rank 0", verify.stdout), verify.stdout
        assert re.search(r"OK +persistent +job v1 rank 1", verify.stdout), verify.stdout
        log = Path(control.status(ajob["cfg"], ajob["full_env"])[0]["log"]).read_text()
        assert "resuming 2 unfinished item(s)" in log     # the staged files were rewritten, then committed
        print(f"killed during the flush; veloc drain finished it in {resumed:.2f} s")
    finally:
        shutil.rmtree(persistent, ignore_errors=True)


FSIZE_LIMIT = 4 << 20


def test_full_persistent_disk_fails_the_flush_not_the_scratch_copy(ajob):
    """(c) The backend may not write files above 4 MiB (RLIMIT_FSIZE, a stand-in for a
    full persistent file system): the flush of an 8 MiB-per-rank version fails with a
    clear error in the backend log and at the next checkpoint_wait() (BackendError
    naming node, module and version); the scratch copies stay restorable."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    config, node, ep = lifecycle.resolve(ajob["cfg"], ajob["full_env"])
    backend = subprocess.Popen(lifecycle.backend_command(ajob["cfg"], ("--idle-exit", "60")),
                               env=lifecycle.backend_env(ajob["full_env"]), preexec_fn=limit,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lifecycle.wait_ready(ep, time.monotonic() + 30)
        app = Path(ajob["tmp"]) / "fsize.py"
        app.write_text(textwrap.dedent("""
            import sys, numpy as np, veloc
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
            ck = veloc.init(sys.argv[1], comm)
            a = np.full(1 << 20, float(comm.rank + 1))        # 8 MiB per rank
            ck.protect("a", a)
            v = ck.restart_test("job")
            if v is not None:
                ck.restart("job", v)
                assert (a == comm.rank + 1).all()
                print(f"rank {comm.rank} restored v{v} from {ck.last_restart.level}", flush=True)
                sys.exit(0)
            ck.checkpoint("job", 1)
            try:
                ck.checkpoint_wait()
            except veloc.BackendError as exc:
                print(f"rank {comm.rank} ERROR {exc}", flush=True)
            ck.finalize(drain=False)
        """))
        out = run_mpi([app, ajob["cfg"]], n=2, env=ajob["env"]).stdout
        errors = re.findall(rf"rank \d ERROR node {node}: background checkpoint of job v1 failed: "
                            rf"CheckpointError: node {node}: module flush failed on job v1: .*?File too large",
                            out)
        assert len(errors) == 2, out
        log = lifecycle.log_path(config, node, ep).read_text()
        assert re.search(r"ERROR .*module flush failed on job v1: .*File too large", log), log
        assert persisted(ajob, 1) == []                     # nothing half-written committed
        assert not list((Path(ajob["persistent"]) / "job" / "v1").glob(".*"))
        out = run_mpi([app, ajob["cfg"]], n=2, env=ajob["env"]).stdout
        assert "rank 0 restored v1 from scratch" in out and "rank 1 restored v1 from scratch" in out
    finally:
        backend.kill()
        backend.wait()


def test_partner_without_a_backend_world_is_an_error_not_a_silent_success(ajob):
    """Bug: async partner run with plain mpiexec (no veloc-run, so every node's rank starts
    a standalone backend) went without the partner level and exited 0; a later node loss
    lost everything. Now the version is reported as missing the level it was configured
    for, naming the level and the version, and its local levels are still done."""
    use_partner(ajob, persistent=True)
    proc = run_mpi([ajob["app"], ajob["cfg"], 1, 3, "ok"], nodes=VNODES, env=ajob["env"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "done" not in proc.stdout, out
    assert re.search(r"BackendError: node vnode\d: background checkpoint of job v1 failed: .*the partner "
                     r"level is configured \(\[partner\]\) but job v1 cannot reach it", out), out
    assert persisted(ajob, 1) == [0, 1]
