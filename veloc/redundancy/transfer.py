"""Moving checkpoint data between the engines of different nodes over MPI.

Who calls what: the ``[partner]`` and ``[erasure]`` modules, in every node's engine (the
sync-mode node leader or the node's active backend), on ``ctx.peers.comm`` (one process
per node). Everything here is either local (``local``, ``IncomingFile``, ``OutgoingFile``)
or collective over all engines (``settle``), or point-to-point with nonblocking
uppercase mpi4py calls on raw buffers (``Exchange``): data is never pickled, and
messages are cut into pieces of at most ``PIECE`` bytes (MPI counts are 32-bit).

Failure discipline: a collective operation is a sequence of *local* steps and
*communication* steps. A local step never raises; it returns its error (``local``), and
the next ``settle`` shares every node's error, so either every engine raises the same
exception or none does, and no engine is left waiting in a collective.
"""
import mmap
import os
import time

import numpy as np

from veloc.errors import CorruptCheckpointError, VelocError
from veloc.storage.fileio import commit_temp, make_dirs, open_temp, remove_quietly
from veloc.storage.hashing import digest_buffer

PIECE = 1 << 30          # bytes per MPI message (well below the 2 GiB count limit)
TAG_PARTNER = 7301
TAG_ERASURE = 7302


def local(step, *args, **kwargs):
    """Run a local step; ``(value, None)`` or ``(None, "error text")`` — never raises for
    VelocError/OSError (a bug still raises, and the host reports it)."""
    try:
        return step(*args, **kwargs), None
    except (VelocError, OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def settle(peers, node, error, error_cls, what):
    """Collective: share ``error`` (None = fine); raise the first one on every engine."""
    errors = peers.allgather(None if error is None else f"node {node}: {error}")
    failed = [e for e in errors if e]
    if failed:
        extra = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
        raise error_cls(f"{what}: {failed[0]}{extra}")


def gather(peers, node, value, error, error_cls, what):
    """Collective allgather of ``value`` that also shares ``error``: every engine gets the
    list of values by peer index, or every engine raises the first error."""
    table = peers.allgather((value, None if error is None else f"node {node}: {error}"))
    failed = [e for _, e in table if e]
    if failed:
        extra = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
        raise error_cls(f"{what}: {failed[0]}{extra}")
    return [v for v, _ in table]


class Exchange:
    """Nonblocking point-to-point sends and receives of raw buffers, completed together.

    Messages between one pair of engines match in posting order (MPI's non-overtaking
    rule), so both sides only need to post their buffers in the same order.
    """

    def __init__(self, comm, tag):
        self.comm, self.tag, self.requests = comm, tag, []

    def send(self, buf, dest):
        view = _bytes(buf)
        for start in range(0, view.size, PIECE):
            self.requests.append(self.comm.Isend(view[start:start + PIECE], dest=dest, tag=self.tag))

    def recv(self, buf, source):
        view = _bytes(buf)
        for start in range(0, view.size, PIECE):
            self.requests.append(self.comm.Irecv(view[start:start + PIECE], source=source, tag=self.tag))

    def wait(self):
        """Complete every posted operation. Polls politely (yield, then short sleeps)
        instead of spinning in ``Waitall``: an engine waiting for a slower node must not
        take a core from the application (sync mode) or from the other local work."""
        from mpi4py import MPI
        reqs, self.requests = self.requests, []
        polls = 0
        while reqs and not MPI.Request.Testall(reqs):
            polls += 1
            if polls < 50:
                os.sched_yield()
            else:
                time.sleep(min(1e-3, 1e-5 * (polls - 49)))


def _bytes(buf):
    a = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    return a.reshape(-1).view(np.uint8)


class OutgoingFile:
    """A read-only mapping of a file to send (no copy); ``close`` when the exchange is done."""

    def __init__(self, path, size):
        self.path = path
        with open(path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise CorruptCheckpointError(f"{path}: size {actual} != {size} recorded in its manifest")
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
        self.view = np.frombuffer(self._map, np.uint8) if size else np.empty(0, np.uint8)

    def close(self):
        self.view = None
        if self._map is not None:
            self._map.close()
            self._map = None


class IncomingFile:
    """A file being received: a temporary file next to ``path``, preallocated and mapped
    (so a full disk fails here with ENOSPC, never later with SIGBUS), filled by MPI,
    then checked and renamed into place by :meth:`commit`. ``recycle``: an old,
    uncommitted file to reuse (writing over allocated tmpfs pages is ~2x faster than
    allocating fresh ones; docs/ARCHITECTURE.md)."""

    def __init__(self, path, size, durable=True, recycle=None):
        self.path, self.size, self.durable = path, size, durable
        make_dirs(path.parent)
        # an uncommitted old file: its pages are already allocated
        self._fd, self.tmp = open_temp(path, reuse=recycle)
        populate = getattr(mmap, "MAP_POPULATE", 0) if os.fstat(self._fd).st_size else 0
        self._map = None
        try:
            os.ftruncate(self._fd, size)
            if size:
                os.posix_fallocate(self._fd, 0, size)
                self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | populate)
        except BaseException:
            self.abort()
            raise
        self.view = np.frombuffer(self._map, np.uint8) if size else np.empty(0, np.uint8)

    def digest(self, algorithm):
        return digest_buffer(self._map if self._map is not None else b"", algorithm)

    def commit(self, algorithm=None, expected=None):
        """Check the digest (when given), make the file durable and rename it into place."""
        if algorithm and expected and self.digest(algorithm) != expected:
            self.abort()
            raise CorruptCheckpointError(f"{self.path}: {algorithm} mismatch after transfer; not committed")
        self._release()
        fd, self._fd = self._fd, None
        commit_temp(fd, self.tmp, self.path, self.durable)

    def _release(self):
        self.view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def abort(self):
        self._release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        remove_quietly(self.tmp)


def close_all(files):
    """Close outgoing mappings and drop uncommitted incoming files (cleanup paths)."""
    for f in files:
        try:
            f.abort() if isinstance(f, IncomingFile) else f.close()
        except (OSError, BufferError):
            pass


def node_scratch(config, node):
    """The node's own scratch folder (see :meth:`veloc.config.Config.node_scratch`)."""
    return config.node_scratch(node)
