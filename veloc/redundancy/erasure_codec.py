# Backend choice, by scripts/bench/bench_erasure_codecs.py on this 2-vCPU VM (AVX-512+GFNI,
# shared with other jobs): `--sizes 16M --reps 15` and `--reps 15` (64 MiB rows). k=4, xor m=1,
# rs m=2; MB/s of the k data blocks and ratio to np.copyto of the same bytes, interleaved in
# the same run (copyto 7.0 GB/s for 4x16 MiB, 12.3 GB/s for 4x64 MiB); rebuild = 1 or m lost.
#                                   16 MiB blocks                       64 MiB blocks
#  backend (stripe)           encode     rebuild 1  rebuild m   encode     rebuild 1  rebuild m
#  numpy-xor (256K)          11070 1.58x 11129 1.58x 11438 1.63x 11108 0.91x 8074 0.66x 8299 0.68x
#  isal (1M)                  9027 1.28x 12201 1.72x  8867 1.25x  8279 0.67x 8710 0.71x 6109 0.50x
#  pyeclib:isa_l_rs_cauchy    3332 0.48x  4687 0.68x  3209 0.46x  3571 0.28x 4220 0.33x 2815 0.22x
#  pyeclib:isa_l_rs_vand_inv  3371 0.48x  4714 0.67x  3242 0.46x  3480 0.27x 4175 0.33x 2863 0.23x
#  pyeclib:isa_l_rs_vand      3339 0.47x  4582 0.64x  3358 0.47x  3456 0.28x 4017 0.33x 2683 0.22x
#  pyeclib:liberasurecode_rs   881 0.13x  3747 0.54x   839 0.12x   759 0.06x 3318 0.27x  696 0.06x
#  zfec (1M)                  1016 0.14x  1929 0.27x   995 0.14x   849 0.07x 1660 0.13x  733 0.06x
# RS default "isal" (ISA-L called directly): 2.3-2.7x the pyeclib route to the same ISA-L
# code, 9-10x zfec, the fallback when libisal cannot be loaded. pyeclib rows (32K stripes, the
# best of a --stripes sweep) go through a bench-only adapter; none is a backend here: same
# math as isal but slower, isa_l_rs_vand is not MDS, liberasurecode_rs_vand has 16-bit symbols.
"""Erasure codes (XOR, Reed-Solomon) over equal-length blocks, for the L3 ``[erasure]`` level.

Called by the ``[erasure]`` module, per checkpoint version, in the sync-mode leader rank
or the active backend process: with one block per member of an encoding group (distinct
failure domains) it calls ``make_codec(scheme, k, m).encode(blocks)`` and stores the m
parity blocks as files; at restart, ``codec.decode({index: buffer}, block_len)``. Block
i < k is member i's data, block k + j is parity j. No I/O or MPI here. Parity depends on
the code: record ``codec.backend`` (backends with equal ``codec.code`` make identical
parity) with the version and decode with it. Work runs in native code one stripe at a
time, so extra memory is a few stripes at most.
"""
import ctypes
import ctypes.util
import glob
import os

import numpy as np

from veloc.errors import CheckpointError, ConfigError, RestartError

SCHEMES = ("xor", "rs")
_MIB = 1 << 20


class ErasureDecodeError(RestartError):
    """Too few blocks survived, or surviving blocks have the wrong length."""


class ErasureEncodeError(CheckpointError):
    """encode() got the wrong number of blocks, blocks of unequal length, or a bad ``out``."""


def _as_u8(buf):
    """Flat uint8 view of a bytes-like object or numpy array (copies only if non-contiguous)."""
    if isinstance(buf, np.ndarray):
        return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def pad_to(buf, length):
    """``buf`` as uint8 zero-padded to ``length`` bytes (a view if already that long): the
    erasure module brings group members' files to one block length with it."""
    a = _as_u8(buf)
    if a.size > length:
        raise ValueError(f"pad_to: buffer has {a.size} bytes, more than the target {length}")
    if a.size == length:
        return a
    out = np.zeros(length, dtype=np.uint8)
    out[:a.size] = a
    return out


class ErasureCodec:
    """k data blocks -> m parity blocks, and back from any k of the k + m.

    ``encode(data_blocks, out=None)``: k equal-length buffers -> m uint8 parity arrays of
    the same length, written into ``out`` when given (recycled buffers). Every backend
    here works bytewise (GF(2^8) or XOR), so parity is exactly as long as the data.
    ``decode(available, block_len)``: all k data blocks, present ones as views of the
    given buffers, lost ones rebuilt bit-exact. Instances keep no per-call state, but
    use one per thread: not every native library promises thread safety.
    """

    scheme = backend = code = ""
    stripe = 4 * _MIB  # bytes of each block handled per native call

    def __init__(self, k, m, stripe=None):
        self.k, self.m, self.stripe = k, m, int(stripe or self.stripe)

    def __repr__(self):
        return f"<ErasureCodec {self.scheme} k={self.k} m={self.m} backend={self.backend}>"

    def _stripes(self, n):
        """(start, length) of each stripe of an n-byte block."""
        return [(s, min(self.stripe, n - s)) for s in range(0, n, self.stripe)]

    def encode(self, data_blocks, out=None):
        """The m parity blocks of ``data_blocks`` (k equal-length bytes-like buffers)."""
        blocks = [_as_u8(b) for b in data_blocks]
        sizes = sorted({b.size for b in blocks})
        if len(blocks) != self.k or len(sizes) > 1:
            raise ErasureEncodeError(f"{self!r}: encode needs {self.k} data blocks of equal length, got "
                                     f"{len(blocks)} of lengths {sizes}; pad them with pad_to()")
        n = sizes[0]
        if out is None:
            out = [np.empty(n, dtype=np.uint8) for _ in range(self.m)]
        elif len(out) != self.m or not all(
                isinstance(o, np.ndarray) and o.dtype == np.uint8 and o.shape == (n,)
                and o.flags.writeable and o.flags.c_contiguous for o in out):
            raise ErasureEncodeError(
                f"{self!r}: out must be {self.m} writable contiguous uint8 arrays of {n} bytes")
        if n:
            self._encode(blocks, out, n)
        return out

    def decode(self, available, block_len):
        """All k data blocks, from ``available`` (index -> buffer; a None buffer counts as lost)."""
        k, m = self.k, self.m
        bufs = {}
        for idx, buf in available.items():
            if buf is None:
                continue
            if not isinstance(idx, (int, np.integer)) or not 0 <= idx < k + m:
                raise ErasureDecodeError(f"{self!r}: block index {idx!r} is outside 0..{k + m - 1}")
            a = _as_u8(buf)
            if a.size != block_len:
                raise ErasureDecodeError(
                    f"{self!r}: {'data' if idx < k else 'parity'} block {idx} has {a.size} bytes, "
                    f"expected block_len={block_len}: the stored blocks disagree")
            bufs[int(idx)] = a
        if len(bufs) < k:
            raise ErasureDecodeError(
                f"{self!r}: only {len(bufs)} of {k + m} blocks available {sorted(bufs)}, need {k}: "
                f"more than {m} group members lost this version; restore it from another level")
        missing = [i for i in range(k) if i not in bufs]
        result = [bufs[i] if i in bufs else np.empty(block_len, dtype=np.uint8) for i in range(k)]
        if missing and block_len:
            self._rebuild(bufs, missing, block_len, result)
        return result


class XorCodec(ErasureCodec):
    """Single parity p = d0 ^ d1 ^ ... ^ d(k-1): numpy ufuncs on cache-sized stripes."""

    scheme, backend, code, stripe = "xor", "numpy-xor", "xor", 256 << 10

    def _xor_into(self, srcs, dst, n):
        for s, ln in self._stripes(n):
            o = dst[s:s + ln]
            np.bitwise_xor(srcs[0][s:s + ln], srcs[1][s:s + ln], out=o)
            for b in srcs[2:]:
                np.bitwise_xor(o, b[s:s + ln], out=o)

    def _encode(self, blocks, out, n):
        self._xor_into(blocks, out[0], n)

    def _rebuild(self, bufs, missing, n, result):
        self._xor_into([bufs[i] for i in sorted(bufs)], result[missing[0]], n)  # k of k+1 present


class IsalCodec(ErasureCodec):
    """Reed-Solomon (GF(2^8) Cauchy, systematic): ISA-L's ``ec_encode_data`` through ctypes.

    No framing and no copies: ISA-L streams from the k blocks straight into the outputs,
    with the GIL released. Uses a system ``libisal``, else the copy in pyeclib's wheel.
    Same matrix as pyeclib's ``isa_l_rs_cauchy`` (its parity payloads are byte-identical),
    at 2.3-2.7x its speed here: pyeclib copies each stripe ~4 times around the ISA-L call.
    """

    scheme, backend, code, stripe = "rs", "isal", "rs-isal-cauchy", _MIB

    def __init__(self, k, m, stripe=None):
        self._lib = _load_isal()
        self._matrix = np.zeros((k + m, k), dtype=np.uint8)
        self._lib.gf_gen_cauchy1_matrix(self._matrix.ctypes.data, k + m, k)
        self._enc_tables = self._tables(self._matrix[k:])
        super().__init__(k, m, stripe)

    def _tables(self, rows):
        rows = np.ascontiguousarray(rows)
        tables = np.empty(32 * rows.size, dtype=np.uint8)
        self._lib.ec_init_tables(rows.shape[1], rows.shape[0], rows.ctypes.data, tables.ctypes.data)
        return tables

    def _run(self, tables, srcs, dsts, n):
        src_t, dst_t = ctypes.c_void_p * len(srcs), ctypes.c_void_p * len(dsts)
        for s, ln in self._stripes(n):
            self._lib.ec_encode_data(ln, len(srcs), len(dsts), tables.ctypes.data,
                                     src_t(*[b.ctypes.data + s for b in srcs]),
                                     dst_t(*[o.ctypes.data + s for o in dsts]))

    def _encode(self, blocks, out, n):
        self._run(self._enc_tables, blocks, out, n)

    def _rebuild(self, bufs, missing, n, result):
        use = sorted(bufs)[:self.k]
        inv = np.empty((self.k, self.k), dtype=np.uint8)
        sub = np.ascontiguousarray(self._matrix[use])  # gf_invert_matrix overwrites its input
        if self._lib.gf_invert_matrix(sub.ctypes.data, inv.ctypes.data, self.k) != 0:
            raise ErasureDecodeError(f"{self!r}: decode matrix for blocks {use} is singular")
        self._run(self._tables(inv[missing]), [bufs[i] for i in use], [result[i] for i in missing], n)


def _load_isal():
    """ctypes handle on libisal: the system one, else the one bundled in pyeclib's wheel."""
    path = ctypes.util.find_library("isal")
    if path is None:
        import pyeclib
        libs = os.path.join(os.path.dirname(os.path.dirname(pyeclib.__file__)), "pyeclib.libs")
        path = (sorted(glob.glob(os.path.join(libs, "libisal*.so*"))) or [None])[0]
    if path is None:
        raise ImportError("libisal not found: install isa-l (libisal.so.2) or the pyeclib wheel")
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, args, res in (("gf_gen_cauchy1_matrix", (p, i, i), None),
                            ("ec_init_tables", (i, i, p, p), None), ("gf_invert_matrix", (p, p, i), i),
                            ("ec_encode_data", (i, i, i, p, p, p), None)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


class ZfecCodec(ErasureCodec):
    """Reed-Solomon (GF(2^8) Vandermonde, systematic) through zfec: no framing, any length."""

    scheme, backend, code, stripe = "rs", "zfec", "rs-zfec", _MIB

    def __init__(self, k, m, stripe=None):
        import zfec
        self._enc, self._dec = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
        super().__init__(k, m, stripe)

    def _encode(self, blocks, out, n):
        want = tuple(range(self.k, self.k + self.m))
        for s, ln in self._stripes(n):
            for o, p in zip(out, self._enc.encode(tuple(b[s:s + ln] for b in blocks), want)):
                o[s:s + ln] = np.frombuffer(p, dtype=np.uint8)

    def _rebuild(self, bufs, missing, n, result):
        use = tuple(sorted(bufs)[:self.k])
        for s, ln in self._stripes(n):
            primary = self._dec.decode(tuple(bufs[i][s:s + ln] for i in use), use)
            for i in missing:
                result[i][s:s + ln] = np.frombuffer(primary[i], dtype=np.uint8)


# Backends per scheme, the automatic choice first (fastest by the benchmark above).
_CLASSES = {"numpy-xor": XorCodec, "isal": IsalCodec, "zfec": ZfecCodec}
BACKENDS = {"xor": ("numpy-xor",), "rs": ("isal", "zfec")}


def available_backends(scheme):
    """Backends of ``scheme`` whose library loads here, preferred first."""
    found = []
    for name in BACKENDS[scheme]:
        try:
            _CLASSES[name](4, 1 if scheme == "xor" else 2)
            found.append(name)
        except (ImportError, OSError, AttributeError):
            pass
    return found


def make_codec(scheme, k, m=1, backend=None, stripe=None):
    """Codec for an erasure group of k data blocks and m parity blocks.

    ``scheme`` "xor" (m must be 1) or "rs" (m >= 1, k + m <= 256). ``backend`` None picks
    the fastest one that loads here (BACKENDS order); a name forces it (use the one
    recorded for a version when decoding it). ``stripe`` overrides the bytes per native
    call. Called by the erasure module when built from its config section.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"erasure scheme={scheme!r} is not one of: {', '.join(SCHEMES)}")
    for name, value, low in (("k", k, 2), ("m", m, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"erasure {name}={value!r} must be an integer >= {low}")
    if scheme == "xor" and m != 1:
        raise ConfigError(f"erasure m={m}: scheme 'xor' has exactly 1 parity block; "
                          f"use scheme 'rs' for m > 1")
    if scheme == "rs" and k + m > 256:
        raise ConfigError(f"erasure k={k}, m={m}: codes over GF(2^8) need k + m <= 256")
    if backend is not None and backend not in BACKENDS[scheme]:
        raise ConfigError(f"erasure backend={backend!r} is not one of: {', '.join(BACKENDS[scheme])} "
                          f"(scheme {scheme!r})")
    if stripe is not None and not (isinstance(stripe, int) and 0 < stripe <= 1 << 30):
        raise ConfigError(f"erasure stripe={stripe!r} must be a number of bytes in 1..2**30")
    errors = []
    for name in [backend] if backend else BACKENDS[scheme]:
        try:
            return _CLASSES[name](int(k), int(m), stripe)
        except (ImportError, OSError, AttributeError) as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise ConfigError(f"erasure scheme {scheme!r} k={k} m={m}: no usable backend here "
                      f"(pip install pyeclib, for its libisal, or zfec): {'; '.join(errors)}")
