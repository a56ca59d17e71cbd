"""The backend's journaled work queue and its worker pool (inside ``veloc-backend`` only).

Clients (application ranks) submit *items* (:class:`veloc.work_item.WorkItem`, checked
by the socket handler); each is journaled before it is acknowledged. Items naming the
same ``group`` (e.g. one checkpoint version) are held until ``group_size`` of them have
arrived, so collective work runs once per node per version with every local rank's
command at hand; they then form one :class:`Batch` for the executor. Batches with the
same ``order`` key run one at a time in arrival order; different keys run in parallel on
up to ``workers`` threads.

The executor is anything with ``run(batch) -> dict | None`` (a dict may carry
``"timings": {module: seconds}``; raising marks the batch failed) and optionally
``close()``. Results are kept per group for ``wait``/``status``; failures are also kept
in order so a client can raise the first one. An executor that raises :class:`Deferred`
did not start the batch (the backend is stopping): it gets no result and stays in the
journal for the next backend.

:meth:`WorkQueue.progress` tells a waiting client how far the queue is: versions and
bytes pending and the rate at which bytes were finished lately. An item's bytes are its
``nbytes`` field, else what the executor's optional ``item_bytes(item)`` says (0 if it
has none).
"""
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from veloc.work_item import WorkItem

log = logging.getLogger("veloc.backend.queue")
RATE_WINDOW = 30.0     # s: the progress rate counts bytes finished this recently


class Deferred(Exception):
    """Raised by an executor that did not start a batch; the batch stays journaled."""


@dataclass
class Batch:
    """Items (:class:`WorkItem`) of one group, handed to the executor together."""
    group: str
    ids: list
    items: list
    complete: bool = True      # False: released before all group_size members arrived


class WorkQueue:
    """Journal-backed queue; call :meth:`start` to run workers, :meth:`stop` to end them."""

    def __init__(self, journal, executor, workers=1, keep_results=4096):
        self.journal = journal
        self.executor = executor
        self.nworkers = max(1, int(workers))
        self.keep_results = keep_results
        self._cond = threading.Condition()
        self._groups = OrderedDict()   # group -> {"ids", "items", "size", "since"}
        self._ready = []               # Batches waiting for a worker
        self._running = {}             # group -> (order key, started at)
        self._busy_orders = set()
        self._keys = OrderedDict()     # client dedup key -> group
        self.results = OrderedDict()   # group -> result dict
        self.failures = []             # result dicts of failed groups, in finishing order
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "replayed": 0}
        self._stopping = False
        self._threads = []
        self._bytes = {}               # item id -> bytes it covers (progress)
        self._finished = deque()       # (monotonic time, bytes) of recently finished batches
        self._since = time.monotonic()
        self._sizer = getattr(executor, "item_bytes", None)
        with self._cond:
            for rid, item in journal.pending():
                self._enqueue(rid, item.replace(replayed=True))   # an earlier backend took it
                self.counts["replayed"] += 1
        if self.counts["replayed"]:
            log.info("resuming %d unfinished item(s) from journal %s",
                     self.counts["replayed"], journal.path)

    # ------------------------------------------------------------ submission
    def submit(self, item: WorkItem):
        """Journal ``item`` and queue it; returns ``(id or None, group)``.

        A repeated ``key`` (a client retrying after a broken connection) is accepted
        without queueing the item twice.
        """
        with self._cond:
            if self._stopping:
                raise RuntimeError("backend is stopping; submit refused")
            key = item.key
            if key in self._keys:
                return None, self._keys[key]
            rid = self.journal.add(item)
            group = self._enqueue(rid, item)
            self.counts["submitted"] += 1
            self._keys[key] = group
            while len(self._keys) > self.keep_results:
                self._keys.popitem(last=False)
            return rid, group

    def _item_bytes(self, item):
        if item.nbytes is not None:
            return item.nbytes
        if self._sizer is None:
            return 0
        try:
            return max(0, int(self._sizer(item)))
        except Exception as exc:       # progress only: never fail a submission for it
            log.debug("cannot size item %r: %s", item.group, exc)
            return 0

    def _enqueue(self, rid, item):
        self._bytes[rid] = self._item_bytes(item)
        group, size = item.group, item.group_size
        self.results.pop(group, None)      # a resubmitted group starts over
        g = self._groups.setdefault(group, {"ids": [], "items": [], "size": size,
                                            "since": time.monotonic()})
        g["ids"].append(rid)
        g["items"].append(item)
        if len(g["items"]) >= g["size"]:
            self._release(group, complete=True)
        return group

    def _release(self, group, complete):
        g = self._groups.pop(group)
        self._ready.append(Batch(group, g["ids"], g["items"], complete))
        self._cond.notify_all()

    def release_incomplete(self, older_than=0.0, reason=""):
        """Hand groups still missing members to the executor as incomplete batches
        (their ranks died, or waited ``older_than`` seconds). Returns how many."""
        now = time.monotonic()
        with self._cond:
            stale = [k for k, g in self._groups.items() if now - g["since"] >= older_than]
            for group in stale:
                g = self._groups[group]
                log.warning("group %s: releasing with %d of %d item(s)%s", group,
                            len(g["items"]), g["size"], f" ({reason})" if reason else "")
                self._release(group, complete=False)
            return len(stale)

    def waiting_pids(self):
        """``{group: {submitter pids}}`` of groups still missing members."""
        with self._cond:
            return {g: {it.pid for it in v["items"] if it.pid is not None}
                    for g, v in self._groups.items()}

    def release_groups(self, groups, reason):
        """Release the named waiting groups as incomplete batches."""
        with self._cond:
            for group in groups:
                g = self._groups.get(group)
                if g is not None:
                    log.warning("group %s: releasing with %d of %d item(s) (%s)", group,
                                len(g["items"]), g["size"], reason)
                    self._release(group, complete=False)

    # ------------------------------------------------------------ workers
    def start(self):
        """Start the worker threads; returns self."""
        for i in range(self.nworkers):
            t = threading.Thread(target=self._work, name=f"veloc-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _next_batch(self):
        for i, batch in enumerate(self._ready):
            order = batch.items[0].order
            if order not in self._busy_orders:
                del self._ready[i]
                return batch, order
        return None, None

    def _work(self):
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    batch, order = self._next_batch()
                    if batch is not None:
                        break
                    self._cond.wait()
                self._running[batch.group] = (order, time.monotonic(), batch)
                self._busy_orders.add(order)
            self._run(batch, order)

    def _run(self, batch, order):
        start = time.perf_counter()
        ok, error, info = True, None, {}
        try:
            info = self.executor.run(batch) or {}
        except Deferred as exc:
            log.info("group %s not started (%s); it stays in the journal", batch.group, exc)
            with self._cond:
                self._running.pop(batch.group, None)
                self._busy_orders.discard(order)
                self._cond.notify_all()
            return
        except Exception as exc:          # reported to clients, never kills the worker
            ok, error = False, f"{type(exc).__name__}: {exc}"
            info = dict(getattr(exc, "veloc_info", None) or {})
            log.error("group %s failed after %.3f s: %s", batch.group,
                      time.perf_counter() - start, error,
                      exc_info=not isinstance(exc, (OSError, RuntimeError)) or None)
        elapsed = time.perf_counter() - start
        timings = info.get("timings") or {}
        if ok:
            log.info("group %s done: %d item(s) in %.3f s%s%s", batch.group, len(batch.items),
                     elapsed, "" if batch.complete else " (incomplete)",
                     "".join(f" {m}={s:.3f}s" for m, s in timings.items()))
        result = {"group": batch.group, "ok": ok, "error": error, "seconds": round(elapsed, 6),
                  "items": len(batch.items), "complete": batch.complete, "timings": timings,
                  "finished": time.time()}
        first = batch.items[0]
        for k in ("node", "module", "name", "version", "value"):
            if k in info:
                result[k] = info[k]
            elif k in ("name", "version"):
                result[k] = getattr(first, k)
        try:
            self.journal.done(batch.ids, ok=ok, error=error)
        except OSError as exc:         # scratch gone: the work is done, only the record is lost
            log.error("cannot journal completion of %s: %s", batch.group, exc)
        with self._cond:
            self._running.pop(batch.group, None)
            self._busy_orders.discard(order)
            self._finished.append((time.monotonic(), sum(self._bytes.pop(i, 0) for i in batch.ids)))
            self.results[batch.group] = result
            while len(self.results) > self.keep_results:
                self.results.popitem(last=False)
            self.counts["done" if ok else "failed"] += 1
            if not ok:
                self.failures = (self.failures + [result])[-self.keep_results:]
            self._cond.notify_all()

    # ------------------------------------------------------------ queries
    def busy(self):
        """Number of groups not finished yet (waiting for members, queued or running)."""
        with self._cond:
            return self._busy_locked()

    def _pending_locked(self, group):
        return (group in self._groups or group in self._running
                or any(b.group == group for b in self._ready))

    def _busy_locked(self):
        return len(self._groups) + len(self._ready) + len(self._running)

    def wait_groups(self, groups, timeout=None):
        """Block until every group in ``groups`` that is pending has a result; returns
        ``({group: result} of the finished ones, [groups this backend never saw or has
        forgotten])``; unknown groups are not waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                missing = [g for g in groups if g not in self.results and self._pending_locked(g)]
                if not missing or self._stopping:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            done = {g: self.results[g] for g in groups if g in self.results}
            unknown = [g for g in groups if g not in done and not self._pending_locked(g)]
            return done, unknown

    def drain(self, timeout=None):
        """Block until nothing is pending; True if drained, False on timeout/stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy_locked():
                left = None if deadline is None else deadline - time.monotonic()
                if self._stopping or (left is not None and left <= 0):
                    return False
                self._cond.wait(left)
            return True

    def status(self):
        """JSON-ready snapshot of the queue for ``veloc status``."""
        now = time.monotonic()
        with self._cond:
            return {
                "waiting": {g: {"have": len(v["items"]), "need": v["size"],
                                "age": round(now - v["since"], 3)} for g, v in self._groups.items()},
                "queued": [b.group for b in self._ready],
                "running": {g: round(now - t, 3) for g, (_, t, _) in self._running.items()},
                "pending": self._busy_locked(),
                "journaled": len(self.journal),
                "counts": dict(self.counts),
                "failures": self.failures[-16:],
                "progress": self._progress_locked(now),
            }

    def progress(self):
        """``{"groups", "versions", "bytes", "rate"}``: groups and distinct checkpoint
        versions not finished yet, the bytes they cover, and bytes finished per second
        over the last ``RATE_WINDOW`` seconds (for drain progress)."""
        with self._cond:
            return self._progress_locked(time.monotonic())

    def _progress_locked(self, now):
        pending = [(rid, it) for g in self._groups.values() for rid, it in zip(g["ids"], g["items"])]
        pending += [(rid, it) for b in self._ready for rid, it in zip(b.ids, b.items)]
        pending += [(rid, it) for _, _, b in self._running.values() for rid, it in zip(b.ids, b.items)]
        while self._finished and now - self._finished[0][0] > RATE_WINDOW:
            self._finished.popleft()
        window = max(1e-3, min(RATE_WINDOW, now - self._since))
        return {"groups": self._busy_locked(),
                "versions": len({(it.name, it.version) for _, it in pending if it.version is not None}),
                "bytes": sum(self._bytes.get(rid, 0) for rid, _ in pending),
                "rate": round(sum(n for _, n in self._finished) / window, 1)}

    # ------------------------------------------------------------ shutdown
    def stop(self, timeout=None):
        """Stop after the batches now running; queued items stay in the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

