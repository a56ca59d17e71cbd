#!/usr/bin/env python
"""Compression ratio and single-thread throughput of the codec candidates (veloc.storage.codecs).

Three 32 MiB inputs (``--size``):

* ``heat``: the state of ``examples/heat.py`` (float64 grid, hot top row, the Jacobi
  sweep of the example) after ``--heat-steps`` iterations on one rank;
* ``smooth``: a smooth float64 field with no zeros (sin * cos): the hard case for
  lossless compression of simulation data, shown for honesty;
* ``weights``: random normal float32 (model weights: incompressible);
* ``sparse``: float32 with 90 % zeros at random places.

Every candidate encodes the input in ``--block`` blocks (veloc's container splits data
the same way) and decodes back into a preallocated buffer, on one thread. Throughput is
reported in GB/s of raw data and as a ratio against ``np.copyto`` of the same 32 MiB,
timed interleaved with each row (best of ``--repeat``), so rows compare across runs on
a shared machine. The last rows, ``veloc:<codec>``, go through veloc's own container
(``veloc.storage.compressed_file``: blocks, the 10 % rule, per-block checksums, ``auto``
probing) from buffer to buffer.

Part ``--flush``: a sync-mode checkpoint (``init_single``: local write, checksum,
compress, flush to ``--disk-dir`` with O_DIRECT) of each input with and without
``[compress] enabled = true`` (codec auto), alternating, ``--flush-reps`` times: the
median time ratio (what compression costs or saves on the whole checkpoint), the
persistent bytes, and the compress module's own time (engine timings) against the raw
runs' flush time: what compressing adds to a flush before it saves anything.

    python scripts/bench/bench_codecs.py                # all inputs, best of 3
    python scripts/bench/bench_codecs.py --quick        # best of 1
    python scripts/bench/bench_codecs.py --flush --only weights,heat
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

MIB = 1 << 20


def heat_state(nbytes, steps):
    cols = 2048
    rows = max(3, nbytes // 8 // cols)
    u = np.zeros((rows, cols))
    u[0, :] = 100.0
    out = u.copy()
    for _ in range(steps):
        t = out[1:-1, 1:-1]
        np.add(u[:-2, 1:-1], u[2:, 1:-1], out=t)
        t += u[1:-1, :-2]
        t += u[1:-1, 2:]
        t *= 0.25
        u, out = out, u
    return u


def inputs(nbytes, steps):
    rng = np.random.default_rng(7)
    n4 = nbytes // 4
    side = int((nbytes // 8) ** 0.5)
    x = np.linspace(0, 3, side)
    sparse = np.zeros(n4, np.float32)
    where = rng.random(n4) < 0.1
    sparse[where] = rng.standard_normal(int(where.sum())).astype(np.float32)
    return {
        "heat": heat_state(nbytes, steps),
        "smooth": np.sin(x)[:, None] * np.cos(2 * x)[None, :] + 2.0,
        "weights": rng.standard_normal(n4).astype(np.float32),
        "sparse": sparse,
    }


def candidates():
    """(label, encode(block, itemsize) -> bytes, decode(stored, out memoryview))."""
    out = []
    try:
        import zstandard
        for level in (1, 3):
            c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            out.append((f"zstd-{level}", lambda b, s, c=c: c.compress(b),
                        lambda z, o, d=d: o.__setitem__(slice(None), d.decompress(z, max_output_size=len(o)))))
    except ImportError:
        pass
    try:
        import lz4.block as lz4b
        out.append(("lz4", lambda b, s: lz4b.compress(b, store_size=False),
                    lambda z, o: o.__setitem__(slice(None), lz4b.decompress(z, uncompressed_size=len(o)))))
    except ImportError:
        pass
    try:
        import blosc2
        for label, codec, filt, level in (("blosc2-shuffle-lz4-5", blosc2.Codec.LZ4, blosc2.Filter.SHUFFLE, 5),
                                          ("blosc2-shuffle-lz4-1", blosc2.Codec.LZ4, blosc2.Filter.SHUFFLE, 1),
                                          ("blosc2-bitshuffle-lz4-5", blosc2.Codec.LZ4, blosc2.Filter.BITSHUFFLE, 5),
                                          ("blosc2-shuffle-zstd-1", blosc2.Codec.ZSTD, blosc2.Filter.SHUFFLE, 1),
                                          ("blosc2-shuffle-blosclz-5", blosc2.Codec.BLOSCLZ, blosc2.Filter.SHUFFLE, 5)):
            out.append((label, lambda b, s, c=codec, f=filt, lv=level: blosc2.compress2(
                b, typesize=s, clevel=lv, codec=c, filters=[f], nthreads=1),
                lambda z, o: blosc2.decompress2(z, dst=o, nthreads=1)))
    except ImportError:
        pass
    return out


def run_blocks(arr, encode, decode, block):
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    itemsize = arr.dtype.itemsize
    t0 = time.perf_counter()
    stored = [encode(raw[i:i + block], itemsize) for i in range(0, len(raw), block)]
    t1 = time.perf_counter()
    dst = np.empty(len(raw), np.uint8)
    view = memoryview(dst)
    for i, z in zip(range(0, len(raw), block), stored):
        decode(z, view[i:i + block])
    t2 = time.perf_counter()
    assert np.array_equal(dst, raw), "round trip differs"
    return sum(len(z) for z in stored), t1 - t0, t2 - t1


def copy_time(arr):
    dst = np.empty_like(arr)
    t0 = time.perf_counter()
    np.copyto(dst, arr)
    return time.perf_counter() - t0


def veloc_rows(codecs):
    """Rows through veloc's container: the whole input at once, split into blocks inside."""
    from veloc.storage import compressed_file as cf

    rows = []
    for name in codecs:
        rows.append((f"veloc:{name}", lambda buf, itemsize, block, name=name: cf.encode_buffer(
            buf, name, itemsize=itemsize, block_size=block), cf.decode_buffer))
    return rows


def run_whole(arr, encode, decode, block):
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    t0 = time.perf_counter()
    encoded = encode(raw, arr.dtype.itemsize, block)
    t1 = time.perf_counter()
    dst = np.empty(len(raw), np.uint8)
    decode(encoded, dst)
    t2 = time.perf_counter()
    assert np.array_equal(dst, raw), "round trip differs"
    return sum(len(p) for p in encoded[0]), t1 - t0, t2 - t1, encoded[1]


def flush_cost(data, reps, shm_dir, disk_dir):
    """Median time of checkpoint() with and without [compress], interleaved, per input."""
    import shutil
    import statistics
    import tempfile
    import veloc
    print(f"\n# sync checkpoint() incl. flush, median of {reps}, interleaved; load {os.getloadavg()[0]:.2f}")
    print(f"{'input':8} {'raw s':>8} {'compress s':>11} {'cost':>8} {'raw bytes':>11} {'stored bytes':>13} "
          f"{'compress/raw flush':>19}")
    for key, arr in data.items():
        times = {"raw": [], "compress": []}
        stored, module_cost, flushes = {}, [], []     # compress module / raw flush seconds
        for rep in range(reps):
            for kind in (("raw", "compress") if rep % 2 == 0 else ("compress", "raw")):
                shm = tempfile.mkdtemp(prefix="veloc-bench-codecs-", dir=shm_dir)
                disk = tempfile.mkdtemp(prefix="veloc-bench-codecs-", dir=disk_dir)
                cfg = {"scratch": f"{shm}/{{node}}", "persistent": disk,
                       "compress": {"enabled": "true" if kind == "compress" else "false"}}
                try:
                    with veloc.init_single(0, cfg) as c:
                        c.protect("x", arr)
                        c.checkpoint("b", 1)            # warms the code paths; not timed
                        t = time.perf_counter()
                        c.checkpoint("b", 2)
                        times[kind].append(time.perf_counter() - t)
                        spent = {m: s for _, v, m, s in c.host.engine.timings if v == 2}
                        if kind == "raw":
                            flushes.append(spent["flush"])
                        else:
                            module_cost.append(spent["compress"])
                    vdir = os.path.join(disk, "b", "v2")
                    stored[kind] = sum(os.path.getsize(os.path.join(vdir, f)) for f in os.listdir(vdir)
                                       if not f.endswith(".json"))
                finally:
                    shutil.rmtree(shm, ignore_errors=True)
                    shutil.rmtree(disk, ignore_errors=True)
        raw, comp = statistics.median(times["raw"]), statistics.median(times["compress"])
        share = statistics.median(module_cost) / statistics.median(flushes)
        print(f"{key:8} {raw:8.4f} {comp:11.4f} {comp / raw - 1:+8.1%} {stored['raw']:11d} "
              f"{stored['compress']:13d} {share:+19.1%}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="MiB per input (default 32)")
    p.add_argument("--block", type=int, default=4, help="block size in MiB (default 4)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--heat-steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="best of 1")
    p.add_argument("--only", help="comma-separated input names")
    p.add_argument("--flush", action="store_true", help="also time sync checkpoints with and without [compress]")
    p.add_argument("--flush-reps", type=int, default=7)
    p.add_argument("--no-codecs", action="store_true", help="skip the codec table")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    args = p.parse_args()
    repeat = 1 if args.quick else args.repeat
    block = args.block * MIB
    data = inputs(args.size * MIB, args.heat_steps)
    rows = [(label, e, d, False) for label, e, d in candidates()]
    rows += [(label, e, d, True) for label, e, d in veloc_rows(["auto", "zstd", "blosc2", "lz4"])]
    print(f"# {args.size} MiB inputs, {args.block} MiB blocks, one thread, best of {repeat}; "
          f"load: {os.getloadavg()[0]:.2f}")
    print(f"{'input':8} {'codec':26} {'ratio':>8} {'enc GB/s':>9} {'dec GB/s':>9} "
          f"{'enc/copy':>9} {'dec/copy':>9}")
    if args.only:
        data = {k: v for k, v in data.items() if k in args.only.split(",")}
    for key, arr in data.items():
        if args.no_codecs:
            break
        for label, encode, decode, whole in rows:
            best_e = best_d = best_c = float("inf")
            picked = ""
            for _ in range(repeat):
                best_c = min(best_c, copy_time(arr))
                if whole:
                    size, te, td, picked = run_whole(arr, encode, decode, block)
                else:
                    size, te, td = run_blocks(arr, encode, decode, block)
                best_e, best_d = min(best_e, te), min(best_d, td)
            gb = arr.nbytes / 1e9
            note = f"  (picked {picked})" if label == "veloc:auto" else ""
            print(f"{key:8} {label:26} {arr.nbytes / size:8.2f} {gb / best_e:9.2f} {gb / best_d:9.2f} "
                  f"{best_c / best_e:9.3f} {best_c / best_d:9.3f}{note}", flush=True)
        print(f"{key:8} {'np.copyto':26} {1.0:8.2f} {arr.nbytes / 1e9 / best_c:9.2f}")
    if args.flush:
        flush_cost(data, args.flush_reps, args.shm_dir, args.disk_dir)


if __name__ == "__main__":
    main()
