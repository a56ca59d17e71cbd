#!/usr/bin/env python
"""Benchmark the erasure-code backends of veloc.engine.erasure_codec.

Measures, for every backend available here, encode and decode (rebuild 1 lost data block,
and m lost data blocks) throughput in MB/s of input data (the k data blocks), for
k=4, m=1 (xor) and k=4, m=2 (rs), against ``np.copyto`` of the same k blocks into a
preallocated buffer taken in the same run, right before each row: the ratio column is
what to compare, since absolute numbers drift between runs on a shared VM.

Encode writes into recycled parity buffers (``out=``), like copyto into its preallocated
destination; decode allocates the rebuilt blocks, as the API does at restart.

    python scripts/bench/bench_erasure_codecs.py            # 16 and 64 MiB blocks, best of 5
    python scripts/bench/bench_erasure_codecs.py --quick    # 16 MiB only, best of 2
    python scripts/bench/bench_erasure_codecs.py --stripes 32K,256K,1M   # stripe-size sweep

The erasure module picks its default RS backend from these numbers (RS_PREFERENCE in
erasure_codec.py, whose header records a run).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from veloc.engine.erasure_codec import available_backends, make_codec  # noqa: E402

MIB = 1 << 20


def best_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def parse_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": MIB}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * mult


def bench_row(backend, k, m, block, data, reps, stripe=None):
    scheme = "xor" if backend == "numpy-xor" else "rs"
    codec = make_codec(scheme, k, m, backend=backend, stripe=stripe)
    nbytes = k * block

    src = np.concatenate(data)
    dst = np.empty_like(src)
    t_copy = best_time(lambda: np.copyto(dst, src), reps)
    del src, dst

    out = [np.empty(codec.parity_len(block), dtype=np.uint8) for _ in range(m)]
    t_enc = best_time(lambda: codec.encode(data, out=out), reps)
    blocks = list(data) + out

    row = {"backend": backend, "k": k, "m": m, "block": block, "stripe": codec.stripe,
           "copy": nbytes / t_copy / 1e6, "enc": nbytes / t_enc / 1e6}
    for label, lost in (("dec1", [0]), ("decm", list(range(m)))):
        avail = {i: b for i, b in enumerate(blocks) if i not in lost}
        got = codec.decode(avail, block)
        if not all(np.array_equal(got[i], data[i]) for i in lost):
            raise SystemExit(f"{backend}: decode after losing {lost} is not bit-exact")
        del got
        row[label] = nbytes / best_time(lambda: codec.decode(avail, block), reps) / 1e6
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 MiB blocks only, best of 2")
    ap.add_argument("--sizes", default=None, help="block sizes, e.g. 16M,64M")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (best is kept)")
    ap.add_argument("--backends", default=None, help="comma list (default: all available)")
    ap.add_argument("--stripes", default=None, help="stripe sizes to sweep, e.g. 32K,256K,1M")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("-m", type=int, default=2, help="parity blocks for rs (xor always 1)")
    args = ap.parse_args(argv)

    sizes = [parse_size(s) for s in (args.sizes or ("16M" if args.quick else "16M,64M")).split(",")]
    reps = args.reps or (2 if args.quick else 5)
    backends = (args.backends.split(",") if args.backends
                else available_backends("xor") + available_backends("rs"))
    stripes = [parse_size(s) for s in args.stripes.split(",")] if args.stripes else [None]

    print(f"# python {' '.join(sys.argv)}")
    print(f"# best of {reps}; MB/s of the k data blocks; x = ratio to np.copyto of the same bytes")
    hdr = (f"{'backend':32} {'k':>2} {'m':>2} {'block':>6} {'stripe':>7} {'copyto':>7} "
           f"{'encode':>14} {'rebuild 1':>14} {'rebuild m':>14}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(12345)
    for block in sizes:
        data = [rng.integers(0, 256, block, dtype=np.uint8) for _ in range(args.k)]
        for backend in backends:
            m = 1 if backend == "numpy-xor" else args.m
            for stripe in stripes:
                r = bench_row(backend, args.k, m, block, data, reps, stripe)

                def cell(key):
                    return f"{r[key]:7.0f} {r[key] / r['copy']:5.2f}x"
                print(f"{backend:32} {args.k:2d} {m:2d} {block // MIB:4d}Mi {r['stripe'] >> 10:6d}K "
                      f"{r['copy']:7.0f} {cell('enc'):>14} {cell('dec1'):>14} {cell('decm'):>14}",
                      flush=True)
        del data


if __name__ == "__main__":
    main()
