"""Operator side of the backends of a job: ``veloc drain CFG``, ``veloc status CFG``,
and the shutdown that ``veloc-run`` sends when the application is done.

Called in ordinary processes (the ``veloc`` command-line tool, the launcher), never in
application ranks. :func:`drain` and :func:`status` are what ``veloc.cli.commands`` calls.
"""
import os
import time

from veloc import ipc
from veloc.errors import BackendError
from veloc.progress import format_progress

from . import lifecycle
from .journal import read_pending

SLICE = 5.0          # s: one server-side wait; a hung backend shows up within a slice
ANSWER = 15.0        # s: any answer from a live backend


def _conn(ep):
    return ipc.BackendConnection(ep.socket, ANSWER)


def job_backends(cfg, env=None):
    """``[(endpoint, status reply)]`` of every live backend on this machine serving the
    job configured by ``cfg`` (one per node or virtual node)."""
    env = dict(os.environ if env is None else env)
    config, _node, here = lifecycle.resolve(cfg, env)
    out = []
    base = here.dir.parent
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        sock = d / ipc.SOCKET_NAME
        if not sock.exists():
            continue
        try:
            with ipc.BackendConnection(sock, ANSWER) as c:
                st = c.request({"op": "status"})
        except BackendError:
            continue
        node = st.get("node")
        if not isinstance(node, str):
            continue
        key = ipc.endpoint_key(lifecycle.scratch_base(config, node), node)
        if key == st.get("key") == d.name:
            out.append((ipc.endpoint_for(lifecycle.scratch_base(config, node), node, env=env), st))
    return out


def status(cfg, env=None):
    """Status of each backend of this job on this machine: a list of dicts with ``node``,
    ``pid``, ``pending``, ``waiting``, ``queued``, ``running``, ``counts``, ``failures``,
    ``log``; plus, for this node, an entry with ``running: False`` and the number of
    journaled items if no backend runs."""
    env = dict(os.environ if env is None else env)
    found = [st for _ep, st in job_backends(cfg, env)]
    config, node, ep = lifecycle.resolve(cfg, env)
    if not any(st.get("node") == node for st in found):
        found.append({"node": node, "alive": False, "socket": str(ep.socket),
                      "journaled": _journaled(config, node)})
    for st in found:
        st.setdefault("alive", True)
    return sorted(found, key=lambda st: st["node"])


def format_status(entries):
    """Human-readable lines for :func:`status` output."""
    lines = []
    for st in entries:
        if not st["alive"]:
            lines.append(f"node {st['node']}: no backend running; {st['journaled']} unfinished "
                         "item(s) in its journal" + (" (veloc drain CFG finishes them)"
                                                       if st["journaled"] else ""))
            continue
        c = st.get("counts", {})
        lines.append(f"node {st['node']}: backend pid {st['pid']}, up {st['uptime']:.0f} s, "
                     f"{st['pending']} pending, {c.get('done', 0)} done, {c.get('failed', 0)} "
                     f"failed, {st.get('clients', 0)} client(s); log {st.get('log')}")
        if st.get("pending") and st.get("progress"):
            lines.append("  " + format_progress(st["progress"], st.get("uptime", 0)).rsplit(";", 1)[0])
        for group, age in st.get("running", {}).items():
            lines.append(f"  running  {group} ({age:.1f} s)")
        for group in st.get("queued", []):
            lines.append(f"  queued   {group}")
        for group, w in st.get("waiting", {}).items():
            lines.append(f"  waiting  {group}: {w['have']}/{w['need']} ranks ({w['age']:.1f} s)")
        for f in st.get("failures", [])[-3:]:
            lines.append(f"  failed   {f['group']}: {f['error']}")
    return "\n".join(lines)


def _journaled(config, node):
    try:
        return len(read_pending(lifecycle.journal_path(config, node)))
    except OSError:
        return 0


def drain(cfg, env=None, timeout=None, extra_args=(), progress=None):
    """Wait until this node's backend has nothing pending; returns ``{"drained", "pending",
    "failures"}``. With no backend running but unfinished items journaled, starts one
    (with ``extra_args``) to finish them. Raises BackendError if the backend dies or stops
    answering. ``progress``: a :class:`veloc.progress.ProgressReporter` fed every slice."""
    env = dict(os.environ if env is None else env)
    config, node, ep = lifecycle.resolve(cfg, env)
    if lifecycle.ping(ep) is None:
        if not _journaled(config, node):
            return {"drained": True, "pending": 0, "failures": [], "backend": None}
        ep = lifecycle.ensure_backend(cfg, env, extra_args=("--idle-exit", "30", *extra_args))
    return wait_drained(ep, timeout, progress)


def wait_drained(ep, timeout=None, progress=None):
    """Drain the backend at endpoint ``ep`` (see :func:`drain`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    piece = SLICE if progress is None else max(0.05, min(SLICE, progress.every))
    with _conn(ep) as c:
        while True:
            left = piece if deadline is None else max(0.0, min(piece, deadline - time.monotonic()))
            reply = c.request({"op": "drain", "timeout": left}, timeout=left + ANSWER)
            if progress is not None and not reply["drained"]:
                progress.update(reply.get("progress"))
            if reply["drained"] or (deadline is not None and time.monotonic() >= deadline):
                return {"drained": reply["drained"], "pending": reply["pending"],
                        "failures": reply.get("failures", []), "backend": str(ep.socket)}


def shutdown(ep, drain_first=True):
    """Ask the backend at ``ep`` to stop (after draining its queue by default); returns
    False if it was not running."""
    try:
        with _conn(ep) as c:
            c.request({"op": "shutdown", "drain": bool(drain_first)})
        return True
    except BackendError:
        return False
