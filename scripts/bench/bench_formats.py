#!/usr/bin/env python3
"""Persistent formats: the flush of a version in the native format vs HDF5, the time of
the HDF5 version file (``global.h5``, virtual datasets), and the restart read of N ranks'
files on M ranks through it vs a same-size native restart.

One process plays the flush module of a node holding ``--writers`` ranks (each rank's
scratch file on tmpfs holds one slab of a heat-equation grid and a replicated counter)
and then the ``--readers`` ranks of a restarting job. Everything is timed in the same
run, in alternation, against this machine's own limits:

* flush: ``NativeWriter.write_rank`` and ``Hdf5Writer.write_rank`` for every rank
  (digests fresh, as after the checksum module), against a raw ``O_DIRECT`` write + fsync
  of the same bytes; target HDF5 >= 0.9x native;
* ``global.h5``: ``Hdf5Writer.finish_version`` (all manifests present), in ms per version
  (target < 10 ms), for the writers' count and for ``--many`` ranks;
* restart read, persistent pages evicted before each ("cold") and again from the page
  cache ("cached"): native same-size (each writer rank's ``r<rank>.vck`` into its array
  through a mapping, as restart reads a persistent copy in place) vs HDF5 on M ranks
  (each reader's rows as a hyperslab through ``global.h5``), against ``np.copyto`` of
  the same bytes; target >= 0.8x native.

Usage: .venv/bin/python scripts/bench/bench_formats.py [--size 256M] [--reps 3]
"""
import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import evict_tree, human, parse_size, write_file_direct  # noqa: E402

from veloc.storage.formats import Hdf5Writer, NativeWriter  # noqa: E402
from veloc.storage.hashing import digest_file  # noqa: E402
from veloc.storage.hdf5_format import GlobalFile  # noqa: E402
from veloc.storage.levels import LevelStore  # noqa: E402
from veloc.storage.manifest import FileEntry, Manifest  # noqa: E402
from veloc.storage.rankfile import RankFile, build_header, write_rank_file  # noqa: E402

COLS = 1024
NAME = "bench"


def rows_of(rows, size, rank):
    base, extra = divmod(rows, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def heat_rows(lo, hi):
    """Rows of a smooth heat-like field (what a simulation checkpoints)."""
    y = np.arange(lo, hi, dtype=np.float64)[:, None]
    x = np.linspace(0.0, 1.0, COLS)[None, :]
    return 100.0 * np.exp(-y / 500.0) * np.sin(np.pi * x) + 1e-3 * y


def make_scratch(scratch, rows, writers, version):
    """Each writer rank's committed scratch copy; returns ``{rank: Manifest}``."""
    manifests = {}
    for rank in range(writers):
        lo, hi = rows_of(rows, writers, rank)
        grid, it = heat_rows(lo, hi), np.array([version], np.int64)
        regions = [{"id": "grid", "kind": "array", "dtype": "<f8", "shape": [hi - lo, COLS], "order": "C",
                    "nbytes": grid.nbytes, "global_shape": [rows, COLS], "global_offset": [lo, 0]},
                   {"id": "it", "kind": "array", "dtype": "<i8", "shape": [1], "order": "C", "nbytes": 8,
                    "replicated": True}]
        header, infos, total = build_header(NAME, version, rank, regions)
        store = LevelStore("scratch", scratch)
        vdir = store.version_dir(NAME, version)
        vdir.mkdir(parents=True, exist_ok=True)
        path = vdir / store.regions_file_name(rank)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        write_rank_file(fd, header, infos, [grid.view(np.uint8).reshape(-1), it.view(np.uint8)], total)
        os.close(fd)
        m = Manifest(NAME, version, rank, writers, "n0", "scratch", checksum="xxh3_128",
                     files=[FileEntry(path.name, total, digest=digest_file(path, "xxh3_128"))])
        store.commit_manifest(m)
        manifests[rank] = m
    return manifests


def flush(writer, scratch, persistent, manifests, version):
    """Time one version's flush of every rank (the module's work on a node) in seconds."""
    ctx = SimpleNamespace(scratch=lambda r: LevelStore("scratch", scratch),
                          persistent=lambda r: LevelStore("persistent", persistent),
                          log=SimpleNamespace(info=lambda *a: None))
    cmd = SimpleNamespace(name=NAME, version=version, nranks=len(manifests), fresh_digests=set(manifests),
                          mapped=None)
    start = time.perf_counter()
    for rank, m in manifests.items():
        out = writer.write_rank(ctx, cmd, rank, m)
        ctx.persistent(rank).commit_manifest(out)
    flushed = time.perf_counter()
    writer.finish_version(ctx, cmd)
    return flushed - start, time.perf_counter() - flushed


def restart_native(persistent, version, writers, rows):
    vdir = LevelStore("persistent", persistent).version_dir(NAME, version)
    outs = [np.empty((hi - lo, COLS)) for lo, hi in (rows_of(rows, writers, r) for r in range(writers))]
    start = time.perf_counter()
    for rank, out in enumerate(outs):
        with RankFile(vdir / f"r{rank}.vck") as rf:
            np.copyto(out, rf.as_array(rf.region("grid")), casting="no")
    return time.perf_counter() - start, outs


def restart_hdf5(persistent, version, readers, rows):
    vdir = LevelStore("persistent", persistent).version_dir(NAME, version)
    outs = [np.empty((hi - lo, COLS)) for lo, hi in (rows_of(rows, readers, r) for r in range(readers))]
    start = time.perf_counter()
    for rank, out in enumerate(outs):
        with GlobalFile(vdir / "global.h5") as g:
            g.read_slab("grid", (rows_of(rows, readers, rank)[0], 0), out)
    return time.perf_counter() - start, outs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("256M"), help="bytes of one version (all ranks)")
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--many", type=int, default=64, help="rank count of the second global.h5 timing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    args = p.parse_args()
    rows = args.size // (COLS * 8)
    nbytes = rows * COLS * 8
    scratch = Path(tempfile.mkdtemp(prefix="bfmt-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="bfmt-", dir=args.disk_dir))
    times = {k: [] for k in ("raw", "native", "hdf5", "vds", "copyto", "rnative", "rhdf5",
                                  "wnative", "whdf5")}
    try:
        manifests = make_scratch(scratch, rows, args.writers, 1)
        native, hdf5 = NativeWriter(), Hdf5Writer()
        raw = np.frombuffer(bytearray(nbytes), np.uint8)          # the copyto source
        aligned = mmap.mmap(-1, nbytes - nbytes % 4096)         # page-aligned, for O_DIRECT
        for rep in range(args.reps):
            start = time.perf_counter()
            write_file_direct(disk / f"raw{rep}", aligned)
            times["raw"].append(time.perf_counter() - start)
            os.unlink(disk / f"raw{rep}")
            for fmt, writer in (("native", native), ("hdf5", hdf5)):
                root = disk / fmt
                shutil.rmtree(root, ignore_errors=True)
                seconds, vds = flush(writer, scratch, root, manifests, 1)
                times[fmt].append(seconds)
                if fmt == "hdf5":
                    times["vds"].append(vds)
            evict_tree(disk)
            seconds, want = restart_native(disk / "native", 1, args.writers, rows)
            times["rnative"].append(seconds)
            evict_tree(disk)
            seconds, got = restart_hdf5(disk / "hdf5", 1, args.readers, rows)
            times["rhdf5"].append(seconds)
            assert np.array_equal(np.concatenate(got), np.concatenate(want)), "N->M read differs"
            times["wnative"].append(restart_native(disk / "native", 1, args.writers, rows)[0])   # cached now
            times["whdf5"].append(restart_hdf5(disk / "hdf5", 1, args.readers, rows)[0])
            dst = np.empty(nbytes, np.uint8)
            start = time.perf_counter()
            np.copyto(dst, raw)
            times["copyto"].append(time.perf_counter() - start)
        del raw
        aligned.close()
        # global.h5 for many ranks: small slabs, the file is metadata only
        many_scratch = scratch / "many"
        many = make_scratch(many_scratch, args.many * 8, args.many, 2)
        many_vds = []
        for rep in range(args.reps):
            root = disk / f"many{rep}"
            many_vds.append(flush(hdf5, many_scratch, root, many, 2)[1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    print(f"version of {human(nbytes)} on {args.writers} ranks, restart on {args.readers}; "
          f"median of {args.reps}; persistent on {args.disk_dir}, scratch on {args.shm_dir}")
    print(f"  raw O_DIRECT write+fsync  {gbs(med['raw']):6.2f} GB/s  (the disk's limit)")
    print(f"  flush native              {gbs(med['native']):6.2f} GB/s  {med['raw'] / med['native']:.2f}x raw")
    print(f"  flush hdf5                {gbs(med['hdf5']):6.2f} GB/s  {med['raw'] / med['hdf5']:.2f}x raw   "
          f"HDF5/native = {med['native'] / med['hdf5']:.2f} (target >= 0.9)")
    print(f"  global.h5, {args.writers} ranks         {med['vds'] * 1e3:6.2f} ms   (target < 10 ms)")
    print(f"  global.h5, {args.many} ranks        {statistics.median(many_vds) * 1e3:6.2f} ms")
    print(f"  np.copyto                 {gbs(med['copyto']):6.2f} GB/s  (the memory's limit)")
    for label, nat, h5 in (("cold", "rnative", "rhdf5"), ("cached", "wnative", "whdf5")):
        print(f"  restart native {args.writers}->{args.writers}, {label:6} {gbs(med[nat]):6.2f} GB/s  "
              f"{med['copyto'] / med[nat]:.2f}x copyto")
        print(f"  restart hdf5 {args.writers}->{args.readers}, {label:6}   {gbs(med[h5]):6.2f} GB/s  "
              f"{med['copyto'] / med[h5]:.2f}x copyto   N->M/native = {med[nat] / med[h5]:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
