#!/usr/bin/env python
"""Benchmark the erasure-code backends of veloc.redundancy.erasure_codec.

Measures, for every backend available here, encode and decode (rebuild 1 lost data block,
and m lost data blocks) throughput in MB/s of input data (the k data blocks), for
k=4, m=1 (xor) and k=4, m=2 (rs), against ``np.copyto`` of the same k blocks into a
preallocated buffer, timed interleaved with each row's operations: the ratio column is
what to compare, since absolute numbers drift between runs on a shared VM.

Encode writes into recycled parity buffers (``out=``), like copyto into its preallocated
destination; decode allocates the rebuilt blocks, as the API does at restart.

Besides the library's backends it measures the pyeclib route (ECDriver, one row per
ec_type that initialises here) through a bench-only adapter, ``PyeclibBench``: it lays
the k stripes end to end, keeps the parity payloads without liberasurecode's 80-byte
headers and rebuilds with ``reconstruct`` on fragments re-framed with headers borrowed
from a zero stripe. It shows what the library's ``isal`` backend (ISA-L through ctypes)
saves over that route.

    python scripts/bench/bench_erasure_codecs.py            # 16 and 64 MiB blocks, best of 5
    python scripts/bench/bench_erasure_codecs.py --quick    # 16 MiB only, best of 2
    python scripts/bench/bench_erasure_codecs.py --stripes 32K,256K,1M   # stripe-size sweep

make_codec() picks its default RS backend by these numbers (the order of BACKENDS in
erasure_codec.py, whose header records a run and its command).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from veloc.redundancy.erasure_codec import (ErasureCodec, ErasureDecodeError,  # noqa: E402
                                        available_backends, make_codec)

MIB = 1 << 20


class PyeclibBench(ErasureCodec):
    """Reed-Solomon through pyeclib/liberasurecode, for comparison only (see above).

    Payload i of an encode of k stripes laid end to end is exactly stripe i when the stripe
    length is a multiple of the symbol size (1 byte for ISA-L, 2 for liberasurecode_rs_vand:
    the bench's blocks and stripes are even, arbitrary lengths would need padding). Headers
    do not depend on the payload (no checksum asked for). Fragments passed to pyeclib must
    be ``bytes``: a bytearray aborts the process.
    """

    scheme = "rs"

    def __init__(self, k, m, ec_type, stripe=None):
        from pyeclib.ec_iface import ECDriver
        super().__init__(k, m, stripe or (32 << 10))  # best in a --stripes sweep (mmap threshold)
        self.backend, self._drv, self._hdrs = "pyeclib:" + ec_type, ECDriver(k=k, m=m, ec_type=ec_type), {}
        data = np.arange(k * 10, dtype=np.uint8)
        frags, short = self._drv.encode(data), self._drv.encode(data[:k * 6])
        self._hdr = len(frags[0]) - 10
        if len(short[0]) != self._hdr + 6 or any(f[self._hdr:] != data[i * 10:i * 10 + 10].tobytes()
                                                 for i, f in enumerate(frags[:k])):
            raise ValueError(f"{self.backend}: fragments are not header + stripe")

    def _headers(self, ln):
        if ln not in self._hdrs:
            self._hdrs[ln] = [f[:self._hdr] for f in self._drv.encode(np.zeros(self.k * ln, np.uint8))]
        return self._hdrs[ln]

    def _encode(self, blocks, out, n):
        k, hdr = self.k, self._hdr
        stage = np.empty(k * min(self.stripe, n), dtype=np.uint8)
        for s, ln in self._stripes(n):
            st = stage[:k * ln]
            for i, b in enumerate(blocks):
                st[i * ln:(i + 1) * ln] = b[s:s + ln]
            frags = self._drv.encode(st)  # accepts a numpy array, not a memoryview
            for j, o in enumerate(out):
                o[s:s + ln] = np.frombuffer(frags[k + j], dtype=np.uint8, count=ln, offset=hdr)

    def _rebuild(self, bufs, missing, n, result):
        hdr, use = self._hdr, sorted(bufs)[:self.k]
        for s, ln in self._stripes(n):
            hdrs = self._headers(ln)
            frags = [b"".join((hdrs[i], bufs[i][s:s + ln])) for i in use]
            try:
                rebuilt = self._drv.reconstruct(frags, list(missing))
            except Exception as exc:
                raise ErasureDecodeError(f"{self.backend}: reconstruct failed: {exc}") from exc
            for i, f in zip(missing, rebuilt):
                result[i][s:s + ln] = np.frombuffer(f, dtype=np.uint8, count=ln, offset=hdr)


def pyeclib_types(k, m):
    """(usable ec_types, {ec_type: why not}) among the types pyeclib knows."""
    try:
        import warnings
        from pyeclib.ec_iface import ALL_EC_TYPES
    except ImportError as exc:
        return [], {"pyeclib": str(exc)}
    ok, skipped = [], {}
    for ec_type in ALL_EC_TYPES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PyeclibBench(k, m, ec_type)
            ok.append(ec_type)
        except Exception as exc:
            skipped[ec_type] = f"{type(exc).__name__}: {str(exc)[:70]}"
    return ok, skipped


def build(backend, k, m, stripe):
    if backend.startswith("pyeclib:"):
        return PyeclibBench(k, m, backend.split(":", 1)[1], stripe)
    return make_codec("xor" if backend == "numpy-xor" else "rs", k, m, backend=backend, stripe=stripe)


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
    """One table row. The four timings are interleaved within each repetition and the best
    of each kept, so copyto and the codec see the same machine (others share this VM)."""
    codec = build(backend, k, m, stripe)
    if codec.stripe % 2 or block % 2:
        raise SystemExit("stripe and block sizes must be even (see PyeclibBench)")
    src = np.concatenate(data)
    dst = np.empty_like(src)
    out = [np.empty(block, dtype=np.uint8) for _ in range(m)]
    codec.encode(data, out=out)
    blocks = list(data) + out
    ops = {"copy": lambda: np.copyto(dst, src), "enc": lambda: codec.encode(data, out=out)}
    for label, lost in (("dec1", [0]), ("decm", list(range(m)))):
        avail = {i: b for i, b in enumerate(blocks) if i not in lost}
        got = codec.decode(avail, block)
        if not all(np.array_equal(got[i], data[i]) for i in lost):
            raise SystemExit(f"{backend}: decode after losing {lost} is not bit-exact")
        ops[label] = lambda avail=avail: codec.decode(avail, block)
    best = dict.fromkeys(ops, float("inf"))
    for _ in range(reps):
        for label, fn in ops.items():
            best[label] = min(best[label], best_time(fn, 1))
    row = {label: k * block / t / 1e6 for label, t in best.items()}
    row["stripe"] = codec.stripe
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
    usable, skipped = pyeclib_types(args.k, args.m)
    backends = (args.backends.split(",") if args.backends else
                available_backends("xor") + available_backends("rs") + ["pyeclib:" + t for t in usable])
    stripes = [parse_size(s) for s in args.stripes.split(",")] if args.stripes else [None]

    print(f"# python {' '.join(sys.argv)}")
    print(f"# best of {reps}; MB/s of the k data blocks; x = ratio to np.copyto of the same bytes")
    for ec_type, why in skipped.items():
        print(f"# pyeclib ec_type {ec_type} not measured: {why}")
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
