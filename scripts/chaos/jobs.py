"""Running one cycle's jobs: launch under ``mpiexec`` or ``veloc-run``, find the
cycle's processes, kill them, lose scratch, fill a disk.

Called by the driver (``scripts/chaos.py``) in its own process, never under MPI. Every
process of a cycle carries ``VELOC_CHAOS_TAG=<run>-<cycle>`` in its environment (the
backends inherit it), which is how :func:`cycle_processes` finds them all, whatever
process tree or session they ended up in.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "e2e" / "apps" / "chaos_app.py"
TAG = "VELOC_CHAOS_TAG"


def mpiexec_path():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def app_args(cycle, paths, phase):
    args = [sys.executable, str(APP), "--config", str(paths["cfg"]), "--journal",
            str(paths[f"journal_{phase}"]), "--result", str(paths[f"result_{phase}"]),
            "--iterations", str(cycle.iterations), "--every", str(cycle.every),
            "--wait-every", str(cycle.wait_every), "--sleep", "0.08"]
    if phase == "restart":
        args += ["--extra", "2"]
    return args


def job_command(cycle, paths, phase):
    """argv of one run of the cycle's job."""
    app = app_args(cycle, paths, phase)
    if cycle.launcher == "veloc-run":
        return [sys.executable, "-m", "veloc_backend.launcher", "-n", str(cycle.nranks), "--virtual-nodes",
                str(len(cycle.nodes)), "--config", str(paths["cfg"]), "--wait", "--mpiexec", mpiexec_path(),
                "--peer-timeout", "10", "--collective-deadline", "10", "--", *app]
    cmd = [mpiexec_path()]
    for i, node in enumerate(cycle.nodes):
        cmd += ([":"] if i else []) + ["-n", str(cycle.per_node), "-env", "VELOC_NODE_ID", node, *app]
    return cmd


def job_env(tag, paths, fault=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VELOC_", "PMI_", "HYDRA_"))}
    env.update({TAG: tag, "VELOC_RUNTIME_DIR": str(paths["runtime"]), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if fault:
        env["VELOC_FAULT"] = fault
    return env


def start(cmd, env, log_base):
    out = open(f"{log_base}.out", "wb")
    err = open(f"{log_base}.err", "wb")
    try:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    finally:
        out.close()
        err.close()


def wait(proc, timeout):
    """Exit code, or ``None`` if it is still running after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        return None


# ------------------------------------------------------------------ processes
def _environ(pid):
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def cycle_processes(tag):
    """``[(pid, kind, env, cmdline)]`` of live (not zombie) processes of cycle ``tag``;
    kind is ``rank``, ``backend`` or ``launcher``."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        env = _environ(pid)
        if not env or env.get(TAG) != tag or _state(pid) in ("Z", "X"):
            continue
        cmd = _cmdline(pid)
        program = os.path.basename(cmd.split(" ", 1)[0])
        kind = ("launcher" if program.startswith(("mpiexec", "mpirun", "hydra")) or "veloc_backend.launcher" in cmd else
                "rank" if str(APP) in cmd else
                "backend" if "veloc_backend.main" in cmd or "veloc-backend" in cmd else "launcher")
        out.append((pid, kind, env, cmd))
    return out


def kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def dump_stacks(tag, wait_s=1.0):
    """Before a hung run is killed: ask its application ranks to print their stacks
    (SIGUSR1) and return what every process of the cycle was doing
    (``["kind pid state wchan: cmdline"]``)."""
    procs = cycle_processes(tag)
    for pid in (p[0] for p in procs if p[1] == "rank"):
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if procs:
        time.sleep(wait_s)
    out = []
    for pid, kind, _env, cmd in procs:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        except OSError:
            wchan = "?"
        out.append(f"{kind} {pid} {_state(pid)} {wchan}: {cmd[:160]}")
    return out


def kill_all(tag, timeout=10.0):
    """SIGKILL every process of the cycle until none is left; the ones that were there."""
    seen = cycle_processes(tag)
    deadline = time.monotonic() + timeout
    procs = seen
    while procs and time.monotonic() < deadline:
        kill(p[0] for p in procs)
        time.sleep(0.05)
        procs = cycle_processes(tag)
    return seen


def kill_target(cycle, tag):
    """SIGKILL the cycle's random-time target; a description of what was killed."""
    procs = cycle_processes(tag)
    if cycle.target == "rank":
        victims = [p for p in procs if p[1] == "rank" and p[2].get("PMI_RANK") == str(cycle.victim)]
    elif cycle.target == "job":
        victims = [p for p in procs if p[1] in ("rank", "launcher")]
    elif cycle.target == "backend":
        node = cycle.nodes[cycle.victim]
        victims = [p for p in procs if p[1] == "backend" and p[2].get("VELOC_NODE_ID", node) == node]
    else:
        raise ValueError(cycle.target)
    kill(p[0] for p in victims)
    return [f"{p[1]}:{p[0]}" for p in victims]


def stop_backends(cfg, env, timeout=10.0):
    """Ask the backends of a finished job to stop (they would idle on otherwise)."""
    from veloc_backend import control
    try:
        for ep, _status in control.job_backends(cfg, env):
            control.shutdown(ep, drain_first=True)
    except Exception as exc:          # a broken backend is reported as a leftover process
        return f"stop: {exc}"
    return None


# ------------------------------------------------------------------ journals
def journal(folder):
    """``{rank: [versions]}`` from a run's journal folder."""
    out = {}
    for path in Path(folder).glob("r*.log"):
        try:
            out[int(path.stem[1:])] = [int(x) for x in path.read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def progress(folder):
    """Versions journaled so far by the most advanced rank."""
    return max((len(v) for v in journal(folder).values()), default=0)


# ------------------------------------------------------------------ storage faults
def lose(scratch, nodes):
    """Node loss: everything in the nodes' scratch folders disappears."""
    for node in nodes:
        root = Path(scratch) / node
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def mount_small(path, size="4m"):
    """A small tmpfs at ``path`` (as root); True if mounted."""
    Path(path).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path):
    """Fill the file system of ``path`` up to ENOSPC with a filler file; its path."""
    filler = Path(path) / "chaos-filler"
    chunk = b"\xa5" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) <= 512:
                    break
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


def can_mount():
    """Whether small tmpfs mounts work here (root, and the kernel allows it)."""
    probe = Path(f"/tmp/chaos-mount-probe-{os.getpid()}")
    ok = mount_small(probe, "64k")
    if ok:
        unmount(probe)
    shutil.rmtree(probe, ignore_errors=True)
    return ok
