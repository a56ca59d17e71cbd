"""Progress of long waits for background work (async mode drains).

Used by an application rank waiting in ``checkpoint_wait()``/``finalize(drain=True)``
(``veloc.hosts.async_host``) and by ``veloc drain`` (``veloc_backend.control``). The backend
answers each wait with its queue's progress (``veloc_backend.workqueue``): versions and
bytes pending and the rate at which bytes were finished lately; :class:`ProgressReporter`
turns those answers into one line every ``every`` seconds once a wait lasts that long.
"""
import logging
import sys
import time

EVERY = 5.0     # s: first report after this long a wait, then one per interval


def human_bytes(n):
    """``1536`` -> ``'1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_progress(progress, waited, where=""):
    """One line: versions and bytes pending, rate, estimated time left, time waited."""
    progress = progress or {}
    versions, nbytes, rate = progress.get("versions", 0), progress.get("bytes", 0), progress.get("rate", 0)
    line = (f"{where}{versions} version(s) pending ({progress.get('groups', 0)} work item(s)), "
            f"{human_bytes(nbytes)} to go")
    if rate:
        line += f", {human_bytes(rate)}/s, about {nbytes / rate:.0f} s left"
    else:
        line += ", no bytes finished in the last 30 s"
    return line + f"; waited {waited:.0f} s"


class ProgressReporter:
    """Reports a wait's progress every ``every`` seconds once it lasts that long.

    ``emit(line)`` receives each line; by default it goes to ``logger`` at INFO when the
    logger would show it, else to stderr (so a drain is never silent)."""

    def __init__(self, every=None, emit=None, logger=None, where=""):
        every = EVERY if every is None else every
        self.every, self.where = every, where
        self.start = time.monotonic()
        self.next_at = self.start + every
        self.emit = emit or self._default_emit
        self.logger = logger or logging.getLogger("veloc.progress")
        self.lines = 0

    def _default_emit(self, line):
        if self.logger.isEnabledFor(logging.INFO) and self.logger.hasHandlers():
            self.logger.info("%s", line)
        else:
            print(f"veloc: {line}", file=sys.stderr, flush=True)

    def update(self, progress):
        """Called after each partial wait with the backend's progress (``None``: unknown)."""
        now = time.monotonic()
        if now < self.next_at or progress is None:
            return False
        self.next_at = now + self.every
        self.lines += 1
        self.emit(format_progress(progress, now - self.start, self.where))
        return True
