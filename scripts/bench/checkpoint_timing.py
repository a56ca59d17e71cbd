"""The per-rank timing state of bench_checkpoint.py: every measurement is paired with an
``np.copyto`` of the same bytes timed right before it, on every rank at once (see that
script's docstring for what the ratios mean). Used by each rank of its MPI job."""
import time
import zlib

import numpy as np


def fingerprint(arr):
    try:
        import xxhash
        return xxhash.xxh3_128_hexdigest(arr.view("u1"))
    except ImportError:
        return zlib.crc32(arr.view("u1"))


# -- timing ---------------------------------------------------------------------------
class Bench:
    """Per-rank state: communicator, options, work folders, and the raw times.

    ``times[key]`` lists this rank's seconds per repetition; ``pair[key]`` names the
    copyto reference timed right before each repetition of ``key``.
    """

    def __init__(self, comm, args, shm, disk):
        self.comm, self.args = comm, args
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.shm, self.disk = shm, disk
        self.times, self.pair = {}, {}
        self.src = self.ref = None

    def record(self, key, seconds, pair=None):
        self.times.setdefault(key, []).append(seconds)
        if pair is not None:
            self.pair[key] = pair

    def reference(self, pair):
        """Time one np.copyto of the array on every rank at once, as the reference of ``pair``."""
        self.comm.Barrier()
        t0 = time.perf_counter()
        np.copyto(self.ref, self.src)
        self.record(pair, time.perf_counter() - t0)

    def timed(self, key, fn, before=None, after=None, settle=False):
        """``before()``, [settle], copyto reference, barrier, time ``fn()``, ``after()``."""
        if before is not None:
            before()
        if settle:
            self.comm.Barrier()
            time.sleep(self.args.settle)
        self.reference(key + "#ref")
        self.comm.Barrier()
        t0 = time.perf_counter()
        result = fn()
        self.record(key, time.perf_counter() - t0, key + "#ref")
        if after is not None:
            after()
        return result

    def repeat(self, key, fn, reps=None, **kw):
        for _ in range(reps or self.args.reps):
            self.timed(key, fn, **kw)
