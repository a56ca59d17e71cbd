"""Starting, finding and cleaning up the node's backend: exactly one per (job, node).

Called from two sides. Application ranks (async mode), ``veloc drain``/``veloc status``
and ``veloc-run`` call :func:`ensure_backend` / :func:`connect`; the backend itself
(``veloc_backend.main``) calls :func:`acquire_lock` on its lock file and
:func:`cleanup_stale` before binding its socket.

Liveness is the backend's ``flock`` on ``backend.lock``, held for its whole life and
dropped by the kernel however it dies, so a leftover socket, pid or lock file never
blocks the next job. Clients that find no live backend serialize on ``spawn.lock``;
the winner starts one, the others find it answering. Lock files are unlinked by their
holder; :func:`try_lock` re-checks the inode after locking so an unlink never lets two
processes hold "the" lock.
"""
import errno
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from veloc import ipc
from veloc.storage.fileio import atomic_write_bytes
from veloc.errors import BackendError

EXIT_ALREADY_RUNNING = 3   # exit code of a backend that found another one holding the lock
EXIT_SCRATCH_BUSY = 4      # ... that found the scratch's journal used by another backend

# Variables a rank inherits from its MPI launcher: a backend started by a rank must not
# believe it is part of the application's MPI job.
_MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_INTERFACE", "OMPI_",
                     "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "I_MPI_", "SLURM_STEP", "PALS_")


# ---------------------------------------------------------------- locks

def try_lock(path):
    """Exclusively ``flock`` the file at ``path`` without blocking; fd or ``None``."""
    path = Path(path)
    for attempt in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:       # a stopping backend removed the empty folder
            if attempt == 99:
                raise
            ipc.ensure_private_dir(path.parent)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)       # its holder unlinked it between our open and our lock: retry
    return None


def acquire_lock(path, timeout):
    """``flock`` ``path``, polling up to ``timeout`` seconds; fd or ``None``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        fd = try_lock(path)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def release_lock(fd, path, unlink=True):
    """Drop a lock taken with :func:`try_lock`, unlinking its file first by default."""
    if unlink:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    os.close(fd)


def backend_alive(ep):
    """True if some process holds the backend lock of endpoint ``ep``."""
    if not ep.lock.exists():
        return False
    fd = try_lock(ep.lock)
    if fd is None:
        return True
    release_lock(fd, ep.lock, unlink=True)   # stale lock file: nobody holds it
    return False


def cleanup_stale(ep):
    """Remove the socket and pid files of a dead backend. Caller ensured none is alive
    (holds ``ep.lock``, or found it free while holding ``ep.spawn_lock``)."""
    for path in (ep.socket, ep.pid):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def read_pid(ep):
    """The pid in the backend's pid file, or ``None``."""
    try:
        return int(ep.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_pid(ep):
    """Atomically write this process's pid (called by the backend once it listens)."""
    atomic_write_bytes(ep.pid, f"{os.getpid()}\n".encode(), durable=False)


# ---------------------------------------------------------------- configuration

def resolve(cfg, env=None):
    """``(config, node, endpoint)`` of this process's node backend for config ``cfg``."""
    from veloc.config import load_config, node_id
    env = os.environ if env is None else env
    config = load_config(cfg, env)
    node = node_id(env)
    return config, node, ipc.endpoint_for(scratch_base(config, node), node, env=env)


def scratch_base(config, node):
    """The node's scratch folder for the whole job (:meth:`veloc.config.Config.node_scratch`)."""
    return config.node_scratch(node)


def log_path(config, node, ep):
    """The backend's log file: in ``log_prefix`` if set, else next to scratch."""
    from veloc.logfile import log_folder
    folder = log_folder(config, node) or scratch_base(config, node).resolve().parent
    return folder / f"veloc-backend-{node}-{ep.key[:8]}.log"


def journal_path(config, node):
    """The queue journal, on the node's scratch."""
    return scratch_base(config, node) / ".veloc-backend" / f"{node}.journal"


# ---------------------------------------------------------------- client side

def ping(ep, timeout=2.0):
    """The backend's ping reply, or ``None`` if it does not answer within ``timeout``."""
    if not ep.socket.exists():
        return None
    try:
        with ipc.BackendConnection(ep.socket, timeout) as conn:
            return conn.request({"op": "ping"})
    except BackendError:
        return None


def backend_env(env):
    """The environment for a spawned backend: ``env`` without MPI launcher variables,
    with the source tree importable when running from a checkout."""
    out = {k: v for k, v in env.items() if not k.startswith(_MPI_ENV_PREFIXES)}
    if __package__ != "veloc_backend":        # running from a source checkout
        root = str(Path(__file__).resolve().parent.parent)
        out["PYTHONPATH"] = os.pathsep.join(filter(None, [root, out.get("PYTHONPATH")]))
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


def backend_command(cfg_path, extra_args=()):
    """argv that starts a backend for ``cfg_path`` with this interpreter."""
    return [sys.executable, "-m", f"{__package__}.main", os.path.abspath(cfg_path), *extra_args]


def spawn(cfg_path, env, log_file, extra_args=()):
    """Start a detached backend (own session, stdio to its log); returns the Popen."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:       # cwd inherited: relative paths in the config mean the same in the backend
        return subprocess.Popen(backend_command(cfg_path, extra_args), env=backend_env(env),
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)


def _log_tail(path, n=20):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def wait_ready(ep, deadline, start=None, log_file=None, hung_after=None, silent_since=None):
    """Poll until the backend at ``ep`` answers a ping; BackendError at ``deadline``.

    With ``start`` (a callable returning the ``Popen`` of a new backend), a backend is
    started whenever none holds the lock — also when the one waited for dies meanwhile
    (a killed multi-threaded process may keep its lock a moment after its main thread
    is gone). A started backend that exits is an error, unless it exited because another
    backend holds the lock (then that one is waited for).

    ``hung_after`` (seconds): a backend that serves already (it holds the lock, its pid
    file names a live process — written once it listens — and its socket exists) but
    answers no ping for that long is hung or stopped: BackendError at once, instead of
    at ``deadline`` (which is meant for one that is still starting). ``silent_since``: when
    the caller's own first ping went unanswered.
    """
    proc = None
    while True:
        if proc is None and start is not None and not backend_alive(ep):
            cleanup_stale(ep)
            proc = start()
        limit = 2.0 if hung_after is None else max(0.2, min(2.0, hung_after / 2))
        reply = ping(ep, timeout=max(0.2, min(limit, deadline - time.monotonic())))
        if reply is not None:
            return reply
        if hung_after is not None and _serving(ep):
            silent_since = time.monotonic() if silent_since is None else silent_since
            if time.monotonic() - silent_since >= hung_after:
                raise BackendError(
                    f"veloc backend for node {ep.node_id} (pid {read_pid(ep)}) serves {ep.socket} but "
                    f"answered nothing for {hung_after:g} s ([backend] heartbeat_timeout): it is hung or "
                    f"stopped; check {log_file or 'its log'}, kill it (its journal keeps unfinished work "
                    "for the next backend), and start the job again")
        else:
            silent_since = None
        if proc is not None and proc.poll() is not None:
            if proc.returncode != EXIT_ALREADY_RUNNING:
                raise BackendError(
                    f"veloc backend for node {ep.node_id} exited with code {proc.returncode} "
                    f"during start-up; log {log_file}:\n{_log_tail(log_file)}")
            proc = None
        if time.monotonic() >= deadline:
            raise BackendError(
                f"veloc backend for node {ep.node_id} (pid {read_pid(ep)}) does not answer on "
                f"{ep.socket} within the start-up timeout: it is hung or still starting; "
                f"check {log_file or 'its log'}, kill it, and try again")
        time.sleep(0.05)


def _serving(ep):
    """Whether a backend is past its start-up at ``ep``: lock held, socket bound, and a pid
    file (written once it listens) naming a live process."""
    pid = read_pid(ep)
    return pid is not None and ep.socket.exists() and backend_alive(ep) and pid_alive(pid)


def pid_alive(pid):
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):       # no usable /proc: existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def config_file(cfg, config, ep):
    """An INI path a spawned backend can read: ``cfg`` itself, or (for a mapping or a
    ``Config``) its keys written to ``config.ini`` in the private endpoint folder."""
    if isinstance(cfg, (str, os.PathLike)):
        return cfg
    lines = []
    for section, keys in sorted(config.raw.items(), key=lambda kv: kv[0] != "__top__"):
        if section != "__top__":
            lines.append(f"[{section}]")
        lines += [f"{k} = {_ini_value(v)}" for k, v in keys.items()]
    path = ep.dir / "config.ini"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode(), durable=False)
    return path


def _ini_value(value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" in text:
        raise BackendError(f"config value {text!r} cannot be passed to the backend (newline)")
    return text


def ensure_backend(cfg_path, env=None, timeout=30.0, extra_args=(), hung_after=None):
    """Return the :class:`~veloc.ipc.Endpoint` of a live backend for this node, starting
    one if there is none. Called by every rank in async mode; however many race, one
    backend starts. ``cfg_path``: an INI path, a mapping or a ``veloc.Config``. Raises
    :class:`BackendError` within about ``timeout`` seconds, or about ``hung_after``
    seconds for a backend that serves but does not answer (see :func:`wait_ready`)."""
    env = dict(os.environ if env is None else env)
    config, node, ep = resolve(cfg_path, env)
    first = 2.0 if hung_after is None else max(0.2, min(2.0, hung_after / 2))
    asked = time.monotonic()
    if ping(ep, timeout=first) is not None:
        return ep
    deadline = time.monotonic() + timeout
    fd = acquire_lock(ep.spawn_lock, timeout)
    if fd is None:
        raise BackendError(f"could not take {ep.spawn_lock} within {timeout:g} s: another "
                           "process is stuck starting the backend; remove the file if not")
    try:
        if ping(ep, timeout=first) is not None:
            return ep
        log_file = log_path(config, node, ep)
        cfg_file = config_file(cfg_path, config, ep)
        wait_ready(ep, deadline, lambda: spawn(cfg_file, env, log_file, extra_args), log_file, hung_after,
                   asked)
        return ep
    finally:
        release_lock(fd, ep.spawn_lock, unlink=True)


def connect(cfg_path, env=None, timeout=30.0, start=True):
    """A :class:`~veloc.ipc.BackendConnection` to this node's backend (started if needed
    and ``start``); raises BackendError if there is none."""
    if start:
        ep = ensure_backend(cfg_path, env, timeout)
    else:
        ep = resolve(cfg_path, env)[2]
        if ping(ep) is None:
            raise BackendError(f"no veloc backend answers for node {ep.node_id} at {ep.socket}; "
                               "start one with veloc-backend CFG or veloc-run")
    return ipc.BackendConnection(ep.socket, timeout)
