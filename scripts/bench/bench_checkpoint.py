#!/usr/bin/env python
"""Per-rank blocking bandwidth of veloc's checkpoint() and restart, as ratios to this machine's limits.

Every rank protects a random float64 array of each size and, in one run, measures with
all ranks at once (barrier before every timed repetition):

  limits     np.copyto into a preallocated buffer (memcpy, the reference of every ratio);
             np.save and os.write into a fresh tmpfs file; os.pwrite over an
             already-allocated tmpfs file (what recycling scratch files buys);
             os.write + fsync into a fresh file on the persistent disk, and the same
             with O_DIRECT (the flush's limit); preadv of a tmpfs file into the array
             (the limit of restart)
  checkpoint veloc.init with scratch on tmpfs, persistent on disk, scratch_versions = 2,
             max_versions = 2. Per version: checkpoint_wait, then begin + mem (the local
             write: all that async mode blocks for) and checkpoint_end (sync mode: commit,
             checksum, flush, garbage collection) timed apart. v1 is the first
             checkpoint, v2-v3 still write fresh tmpfs pages, later versions reuse the
             recycled files of old ones (steady state). Then whole checkpoint() calls.
  restart    restart_test and restart from scratch, with restart_test hashing every copy
             and with ``verify_on_read`` (the read checks the digest: one pass); then, as a new job after a node
             loss (finalize, delete the scratch folders, new veloc.init), from
             persistent with its files in the page cache (warm) and evicted (cold)

Ratios: before every timed repetition of anything, the same ranks time one np.copyto of
the same bytes; "x memcpy" is the median over repetitions of copyto time / operation
time (so drift and other load on the machine hit both sides), "x limit" the same against
the limit named next to it. GB/s (1e9 bytes/s) is bytes per rank / the slowest rank's
time, median over repetitions (best and worst repetitions too): per-rank bandwidth.
Absolute GB/s drift between runs on a shared VM; compare ratios.

Fresh pages: on a VM with a free-page-reporting balloon (this one), memory freed more
than ~1 s ago has gone back to the host and costs a host fault on first touch, several
times slower than reusing pages freed just before; memory the guest never touched is the
slowest. Fresh-file limits are therefore taken "cold" (after --settle seconds idle, as a
checkpoint after a compute phase sees them) and "hot" (right after deleting the previous
file); the worst cold repetition is usually the one that met never-touched memory.

    mpiexec -n 2 python scripts/bench/bench_checkpoint.py [--sizes 256M,1G] [--reps 5]
        [--mode sync|async] [--json OUT]
    python scripts/bench/bench_checkpoint.py ...     # re-launches itself under mpiexec -n 2

Memory per rank: the array, the copyto reference buffer, and at most four
checkpoint-sized tmpfs files (two scratch versions, the recycle pool, the one being
written); sizes that would not fit in MemAvailable are refused (--force overrides).
Every file is removed at the end, also on error.
"""
import argparse
import json
import mmap
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from benchlib import (GIB, clear_dir, evict_tree, find_mpiexec, human, mem_available, parse_size,
                      read_file_into, unlink, write_file, write_file_direct)
from checkpoint_report import report, summarize
from checkpoint_timing import Bench, fingerprint

ENV_SHM, ENV_DISK = "VELOC_BENCH_SHM_DIR", "VELOC_BENCH_DISK_DIR"
MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
CKPT = "bench"


# -- command line and launcher ----------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G", help="bytes per rank, comma list (default 256M,1G)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (default 5)")
    ap.add_argument("--mode", choices=("sync", "async"), default="sync", help="veloc mode (default sync)")
    ap.add_argument("--json", metavar="OUT", help="also write every raw per-rank time to OUT")
    ap.add_argument("--np", type=int, default=2, help="ranks when the script launches itself (default 2)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs parent for scratch and limits (default /dev/shm)")
    ap.add_argument("--disk-dir", default="/tmp", help="disk parent for persistent (default /tmp)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds idle before a 'cold' fresh-page measurement (default 2)")
    ap.add_argument("--persistent-cache", choices=("warm", "cold", "both"), default="both",
                    help="restart from persistent with its files in the page cache, evicted, or both")
    ap.add_argument("--engine-timings", action="store_true",
                    help="diagnostic, sync mode: also print the engine's per-module times (reads a "
                         "private attribute of the client; not part of the measurement)")
    ap.add_argument("--force", action="store_true", help="run sizes even if they may not fit in memory")
    args = ap.parse_args(argv)
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error(f"--sizes: {exc}")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    return args


def under_mpi():
    return any(key in os.environ for key in MPI_ENV)


def _raise_on_sigterm():
    """Turn SIGTERM into an exception so that the cleanup in ``finally`` blocks runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def launch(args, argv):
    """Wrapper mode: own the work folders, run ourselves under mpiexec, always clean up."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        sys.exit("bench_checkpoint: no mpiexec next to this python or on PATH; run it under mpiexec -n 2")
    shm = tempfile.mkdtemp(prefix="veloc-bench-", dir=args.shm_dir)
    disk = tempfile.mkdtemp(prefix="veloc-bench-", dir=args.disk_dir)
    env = dict(os.environ, **{ENV_SHM: shm, ENV_DISK: disk})
    cmd = [mpiexec, "-n", str(args.np), sys.executable, os.path.abspath(__file__)] + list(argv)
    print("# " + " ".join(cmd), flush=True)
    _raise_on_sigterm()
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=env)
        return proc.wait()
    except KeyboardInterrupt:
        if proc is not None and proc.poll() is None:
            proc.terminate()            # mpiexec forwards it to the ranks
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return 130
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


# -- the measurements -----------------------------------------------------------------
def bench_limits(b, base, disk_dir):
    a = b.src
    b.repeat("memcpy", lambda: np.copyto(b.ref, a))
    shm_file = os.path.join(base, f"limit.r{b.rank}")
    disk_file = os.path.join(disk_dir, f"limit.r{b.rank}")
    for heat, settle in (("cold", True), ("hot", False)):
        b.repeat(f"np_save_{heat}", lambda: np.save(shm_file + ".npy", a),
                 before=lambda: unlink(shm_file + ".npy"), settle=settle)
        b.repeat(f"write_fresh_{heat}", lambda: write_file(shm_file, a), before=lambda: unlink(shm_file),
                 settle=settle)
    unlink(shm_file + ".npy")
    # shm_file exists and is fully allocated: overwrite it in place, then read it back
    b.repeat("pwrite_allocated", lambda: write_file(shm_file, a, fresh=False))
    b.repeat("preadv_tmpfs", lambda: read_file_into(shm_file, b.ref))
    unlink(shm_file)
    for heat, settle in (("cold", True), ("hot", False)):
        b.repeat(f"disk_write_{heat}", lambda: write_file(disk_file, a, fsync=True), reps=min(b.args.reps, 3),
                 before=lambda: unlink(disk_file), settle=settle)
    aligned = mmap.mmap(-1, a.nbytes - a.nbytes % 4096)
    aligned[:] = memoryview(a).cast("B")[:len(aligned)]
    b.repeat("disk_write_direct", lambda: write_file_direct(disk_file + ".direct", aligned),
             reps=min(b.args.reps, 3), before=lambda: unlink(disk_file + ".direct"), settle=True)
    unlink(disk_file + ".direct")
    aligned.close()
    b.repeat("disk_read_warm", lambda: read_file_into(disk_file, b.ref))
    b.repeat("disk_read_cold", lambda: read_file_into(disk_file, b.ref), reps=min(b.args.reps, 3),
             before=lambda: evict_tree(disk_dir))
    unlink(disk_file)


def bench_checkpoints(b, client):
    """Versions 1 .. 3 + reps, phases timed apart; then ``reps`` whole checkpoint() calls."""
    versions = 3 + b.args.reps
    for version in range(1, versions + 1):
        kind = "first" if version == 1 else ("fresh" if version <= 3 else "steady")
        pair = f"ckpt_{kind}#ref"
        b.timed(f"ckpt_wait_{kind}", client.checkpoint_wait)
        b.reference(pair)
        b.comm.Barrier()
        t0 = time.perf_counter()
        client.checkpoint_begin(CKPT, version)
        t1 = time.perf_counter()
        client.checkpoint_mem()
        t2 = time.perf_counter()
        client.checkpoint_end(True)
        t3 = time.perf_counter()
        for key, seconds in (("begin", t1 - t0), ("mem", t2 - t1), ("local", t2 - t0), ("end", t3 - t2),
                             ("total", t3 - t0)):
            b.record(f"ckpt_{key}_{kind}", seconds, pair)
    for version in range(versions + 1, versions + 1 + b.args.reps):
        b.timed("call_wait", client.checkpoint_wait)
        b.timed("checkpoint_call", lambda: client.checkpoint(CKPT, version))
    b.timed("drain", client.checkpoint_wait)
    return versions + b.args.reps


def timed_restart(b, client, key, version, level, expect):
    """restart_test + restart, timed apart; check the version, the level and the data."""
    b.src.fill(0)
    b.reference(f"restart_{key}#ref")
    b.comm.Barrier()
    t0 = time.perf_counter()
    found = client.restart_test(CKPT)
    t1 = time.perf_counter()
    if found is not None:
        client.restart(CKPT, found)
    t2 = time.perf_counter()
    for part, seconds in (("test", t1 - t0), ("read", t2 - t1), ("total", t2 - t0)):
        b.record(f"restart_{part}_{key}", seconds, f"restart_{key}#ref")
    got = client.last_restart
    if found != version or got is None or got.level != level:
        raise RuntimeError(f"rank {b.rank}: restart_test found v{found} restored from "
                           f"{got.level if got else None}; expected v{version} from {level}")
    if fingerprint(b.src) != expect:
        raise RuntimeError(f"rank {b.rank}: the restored array differs from the checkpointed one")


def cold_read_same_file(b, path):
    """The limit of a restart from persistent, evicted: ``preadv`` of this rank's own
    persistent rank file, evicted from the page cache, into the reference buffer, after
    the same ``--settle`` idle time as the restart (so the page cache's new pages come
    from memory in the same state: see "Fresh pages" above)."""
    b.timed("disk_read_cold_same", lambda: read_file_into(path, b.ref),
            before=lambda: evict_tree(os.path.dirname(path)) if b.rank == 0 else None, settle=True)


def stop_backends(b, cfg):
    """Async mode, rank 0: shut down the backends this run started and remove their sockets."""
    if b.args.mode != "async" or b.rank != 0:
        return
    try:
        from veloc_backend import control, lifecycle
    except ImportError:
        return
    for ep, _ in control.job_backends(cfg):
        control.shutdown(ep, drain_first=True)
        deadline = time.monotonic() + 60
        while lifecycle.ping(ep, timeout=1.0) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(ep.dir, ignore_errors=True)


def engine_timings(client):
    engine = getattr(getattr(client, "host", None), "engine", None)
    return [list(t) for t in getattr(engine, "timings", None) or []]


def run_size(b, nbytes):
    import veloc
    tag = f"s{nbytes}"
    base = os.path.join(b.shm, tag)
    scratch_root = os.path.join(base, "scratch")
    persistent_root = os.path.join(b.disk, tag, "persistent")
    disk_limits = os.path.join(b.disk, tag, "limits")
    if b.rank == 0:
        for d in (scratch_root, persistent_root, disk_limits):
            os.makedirs(d, mode=0o700, exist_ok=True)
    b.comm.Barrier()
    cfg = {"scratch": os.path.join(scratch_root, "{node}"), "persistent": persistent_root,
           "mode": b.args.mode, "scratch_versions": 2, "max_versions": 2}
    extra = {}
    b.src = np.random.default_rng(1000 + b.rank).random(nbytes // 8)
    b.ref = np.empty_like(b.src)
    np.copyto(b.ref, b.src)                       # allocate the reference buffer's pages
    expect = fingerprint(b.src)
    try:
        bench_limits(b, base, disk_limits)
        client = veloc.init(cfg, comm=b.comm)
        try:
            client.protect("a", b.src)
            last = bench_checkpoints(b, client)
            if b.args.engine_timings:
                extra["engine_timings"] = engine_timings(client)
            for _ in range(b.args.reps):
                timed_restart(b, client, "scratch", last, "scratch", expect)
            client.verify_on_read = True          # the digest checked by the read (one pass)
            for _ in range(b.args.reps):
                timed_restart(b, client, "scratch_onread", last, "scratch", expect)
            client.verify_on_read = False
        finally:
            client.finalize()
        caches = ("warm", "cold") if b.args.persistent_cache == "both" else (b.args.persistent_cache,)
        own = os.path.join(persistent_root, CKPT, f"v{last}", f"r{b.rank}.vck")
        for cache in caches:
            for rep in range(b.args.reps):
                # cold: the limit is a cold read of this very file, timed in the same
                # repetition, before the restart in even ones and after it in odd ones
                # (the virtual disk's speed moves from one second to the next)
                if cache == "cold" and rep % 2 == 0:
                    cold_read_same_file(b, own)
                stop_backends(b, cfg)
                b.comm.Barrier()
                if b.rank == 0:                   # every node lost its scratch
                    clear_dir(scratch_root)
                    if cache == "cold":
                        evict_tree(persistent_root)
                b.comm.Barrier()
                time.sleep(b.args.settle)         # the new job starts a while later
                client = veloc.init(cfg, comm=b.comm)
                try:
                    client.protect("a", b.src)
                    timed_restart(b, client, f"persistent_{cache}", last, "persistent", expect)
                finally:
                    client.finalize()
                if cache == "cold" and rep % 2 == 1:
                    cold_read_same_file(b, own)
    finally:
        stop_backends(b, cfg)
        b.src = b.ref = None
        b.comm.Barrier()
        if b.rank == 0:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(os.path.join(b.disk, tag), ignore_errors=True)
    return extra


# -- main -----------------------------------------------------------------------------
def memory_refusal(args, local):
    if args.force:
        return None
    avail = mem_available()
    for nbytes in args.size_list:
        need = local * nbytes * 6
        if avail is not None and need > avail * 0.9:
            return (f"# {human(nbytes)}/rank needs about {need / GIB:.1f} GiB of RAM + tmpfs for {local} ranks "
                    f"on this node, {avail / GIB:.1f} GiB available: refusing (--force to try anyway)")
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not under_mpi() and not os.environ.get(ENV_SHM):
        return launch(args, argv)

    _raise_on_sigterm()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    shm, disk = os.environ.get(ENV_SHM), os.environ.get(ENV_DISK)
    owned = not (shm and disk)            # started under mpiexec by hand: we own the folders
    if owned:
        dirs = None
        if rank == 0:
            dirs = (tempfile.mkdtemp(prefix="veloc-bench-", dir=args.shm_dir),
                    tempfile.mkdtemp(prefix="veloc-bench-", dir=args.disk_dir))
        shm, disk = comm.bcast(dirs, root=0)
    b = Bench(comm, args, shm, disk)
    try:
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node_comm.Get_size()
        node_comm.Free()
        refusal = comm.bcast(memory_refusal(args, local) if rank == 0 else None, root=0)
        if refusal:
            if rank == 0:
                print(refusal, flush=True)
            code = 2
        else:
            results = {}
            for nbytes in args.size_list:
                load0 = os.getloadavg()[0]
                b.times, b.pair = {}, {}
                extra = run_size(b, nbytes)
                load = (load0, os.getloadavg()[0])
                raw = {key: comm.allgather(mine) for key, mine in sorted(b.times.items())}
                summary = summarize(raw, b.pair)
                results[nbytes] = {"summary": summary, "raw": raw, "load_average": load, **extra}
                if rank == 0:
                    print(report(args, comm.Get_size(), nbytes, summary, extra, load), flush=True)
            if rank == 0 and args.json:
                doc = {"command": " ".join([sys.executable] + sys.argv), "mode": args.mode,
                       "ranks": comm.Get_size(), "reps": args.reps, "settle_s": args.settle,
                       "host": platform.node(), "cpus": os.cpu_count(),
                       "note": "seconds; raw[key][rank][rep]; summary uses the slowest rank per rep; "
                               "key#ref = the np.copyto timed right before each rep of key",
                       "sizes": {str(n): r for n, r in results.items()}}
                with open(args.json, "w") as f:
                    json.dump(doc, f, indent=1)
                print(f"# wrote {args.json}")
            code = 0
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if owned:                       # (a wrapper, when there is one, removes its own folders)
            shutil.rmtree(shm, ignore_errors=True)
            shutil.rmtree(disk, ignore_errors=True)
        if comm.Get_size() > 1:
            comm.Abort(1)               # the other ranks may be waiting in a collective
        return 1
    comm.Barrier()
    if owned and rank == 0:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
