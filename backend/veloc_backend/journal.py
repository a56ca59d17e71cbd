"""Crash-safe journal of the backend's queue (used only inside the ``veloc-backend``).

An append-only JSON-lines file on the node's scratch. Every accepted work item is
written (and fsynced) as ``{"op": "add", "id": N, "item": {...}}`` before the client is
told it was accepted; when the item's work has finished, ``{"op": "done", "id": N, ...}``
follows. A backend started later on the same scratch replays the file and gets back
every item without a ``done`` record, in acceptance order. A torn last line (crash in
the middle of a write) is cut off; compaction rewrites the file with only the pending
items (temporary name, fsync, rename, fsync of the folder).
"""
import json
import logging
import os
import threading
from pathlib import Path

from veloc.storage.fileio import atomic_write_bytes

log = logging.getLogger("veloc.backend.journal")


def _scan(data, path):
    """Parse journal bytes: ``(pending {id: item}, next id, number of done records)``."""
    pending, next_id, dones = {}, 1, 0
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            op, rid = rec["op"], int(rec["id"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("journal %s line %d unreadable, skipped: %s", path, lineno, exc)
            continue
        next_id = max(next_id, rid + 1)
        if op == "add" and isinstance(rec.get("item"), dict):
            pending[rid] = rec["item"]
        elif op == "done":
            pending.pop(rid, None)
            dones += 1
        else:
            log.warning("journal %s line %d has unknown record %r, skipped", path, lineno, op)
    return pending, next_id, dones


def read_pending(path):
    """Read-only: ``[(id, item)]`` unfinished in the journal at ``path`` (for status tools;
    never use it while deciding to start a backend, which owns the file)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return list(_scan(data[:data.rfind(b"\n") + 1], path)[0].items())


class Journal:
    """The journal at ``path``; opening it replays what an earlier backend left.

    Thread-safe. ``compact_every``: rewrite the file after that many ``done`` records.
    """

    def __init__(self, path, compact_every=512):
        self.path = Path(path)
        self.compact_every = max(1, int(compact_every))
        self._lock = threading.Lock()
        self._pending = {}          # id -> item, insertion (= id) order
        self._next_id = 1
        self._dones_since_compact = 0
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._pending or self._dones_since_compact:
            self._compact_locked()

    # ------------------------------------------------------------ replay
    def _load(self):
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("journal %s: dropping a torn last record of %d bytes (crash during "
                        "a write)", self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        self._pending, self._next_id, self._dones_since_compact = _scan(data[:end], self.path)

    def pending(self):
        """``[(id, item), ...]`` of every item without a ``done`` record, oldest first."""
        with self._lock:
            return list(self._pending.items())

    def __len__(self):
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------ appends
    def _write(self, records):
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)

    def add(self, item):
        """Durably record a new work item; returns its id."""
        if not isinstance(item, dict):
            raise TypeError(f"journal items are dicts, got {type(item).__name__}")
        with self._lock:
            rid = self._next_id
            self._write([{"op": "add", "id": rid, "item": item}])
            self._next_id += 1
            self._pending[rid] = item
            return rid

    def done(self, ids, ok=True, error=None):
        """Durably mark items finished (successfully or not); they will not be replayed."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        with self._lock:
            live = [i for i in ids if i in self._pending]
            if not live:
                return
            self._write([{"op": "done", "id": i, "ok": bool(ok), "error": error} for i in live])
            for i in live:
                del self._pending[i]
            self._dones_since_compact += len(live)
            if self._dones_since_compact >= self.compact_every:
                self._compact_locked()

    # ------------------------------------------------------------ compaction
    def compact(self):
        """Rewrite the file with only the pending items."""
        with self._lock:
            self._compact_locked()

    def _compact_locked(self):
        lines = [json.dumps({"op": "add", "id": i, "item": it}, separators=(",", ":")) + "\n"
                 for i, it in self._pending.items()]
        atomic_write_bytes(self.path, "".join(lines).encode())
        old = getattr(self, "_fd", None)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if old is not None:
            os.close(old)
        self._dones_since_compact = 0

    def close(self):
        """Close the file (compacting it first); pending items stay for the next backend."""
        with self._lock:
            if self._fd is None:
                return
            try:
                self._compact_locked()
            finally:
                os.close(self._fd)
                self._fd = None
