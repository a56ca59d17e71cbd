"""Erasure codes (XOR, Reed-Solomon) over equal-length blocks, for the L3 ``[erasure]`` level.

# BENCHMARK-PLACEHOLDER

Who calls what: the ``[erasure]`` module (veloc/engine/modules) runs, per checkpoint
version, in the sync-mode leader rank or in the active backend process. It gathers one
block per member of an encoding group (one node each, distinct failure domains) and calls
``make_codec(scheme, k, m).encode(blocks)`` to get the m parity blocks it stores as files;
at restart it calls ``codec.decode({index: buffer}, block_len)`` with whatever survived.
Block i < k is group member i's data; block k + j is parity j. Nothing here does I/O or MPI.

All work runs in native code, one stripe at a time, so extra memory stays bounded (a few
stripes, independent of the block size) no matter how large the blocks are.
"""
import numpy as np

from veloc.errors import CheckpointError, ConfigError, RestartError

SCHEMES = ("xor", "rs")
_MIB = 1 << 20


class ErasureDecodeError(RestartError):
    """Too few blocks survived, or the surviving blocks have the wrong length."""


class ErasureEncodeError(CheckpointError):
    """encode() got the wrong number of blocks, blocks of unequal length, or a bad ``out``."""


def _as_u8(buf):
    """A flat uint8 view of a bytes-like object or numpy array (copies only if non-contiguous)."""
    if isinstance(buf, np.ndarray):
        return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def pad_to(buf, length):
    """``buf`` as uint8 zero-padded to ``length`` bytes (a view of it when no padding is needed).

    Used by the erasure module to bring group members' files to one common block length.
    """
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
    ``parity_len(block_len)`` bytes (written into ``out`` when given, to recycle buffers).
    ``parity_len(n)`` is ``n`` for every backend except ``pyeclib:liberasurecode_rs_vand``
    (16-bit symbols), where it is ``n`` rounded up to even; callers store parity as files
    of exactly that length. ``decode(available, block_len)``: returns all k data blocks
    (present ones as views of the given buffers, lost ones rebuilt, bit-exact).
    Instances keep no per-call state, but use one codec per thread: the native libraries
    do not promise thread safety.
    """

    scheme = ""
    backend = ""
    unit = 1           # parity is computed over blocks zero-padded to a multiple of this
    stripe = 4 * _MIB  # bytes of each block processed per native call

    def __init__(self, k, m, stripe=None):
        self.k, self.m = k, m
        if stripe:
            if stripe % self.unit:
                raise ConfigError(f"stripe={stripe} must be a multiple of {self.unit} for {self.backend}")
            self.stripe = stripe

    def __repr__(self):
        return f"<ErasureCodec {self.scheme} k={self.k} m={self.m} backend={self.backend}>"

    def parity_len(self, block_len):
        """Length in bytes of each parity block for data blocks of ``block_len`` bytes."""
        return -(-block_len // self.unit) * self.unit

    def _stripes(self, n):
        """(start, length, padded length) of each stripe of an n-byte block."""
        for s in range(0, n, self.stripe):
            ln = min(self.stripe, n - s)
            yield s, ln, -(-ln // self.unit) * self.unit

    def encode(self, data_blocks, out=None):
        """Return the m parity blocks of ``data_blocks`` (k equal-length bytes-like buffers)."""
        blocks = [_as_u8(b) for b in data_blocks]
        if len(blocks) != self.k:
            raise ErasureEncodeError(f"{self!r}: encode needs {self.k} data blocks, got {len(blocks)}")
        n = blocks[0].size if blocks else 0
        sizes = sorted({b.size for b in blocks})
        if len(sizes) > 1:
            raise ErasureEncodeError(
                f"{self!r}: data blocks must have equal lengths, got {sizes}; pad them with pad_to()")
        plen = self.parity_len(n)
        if out is None:
            out = [np.empty(plen, dtype=np.uint8) for _ in range(self.m)]
        elif (len(out) != self.m or any(not isinstance(o, np.ndarray) or o.dtype != np.uint8
                                        or o.shape != (plen,) or not o.flags.writeable
                                        or not o.flags.c_contiguous for o in out)):
            raise ErasureEncodeError(
                f"{self!r}: out must be {self.m} writable contiguous uint8 arrays of {plen} bytes")
        self._encode(blocks, out, n)
        return out

    def decode(self, available, block_len):
        """Return all k data blocks from ``available`` (index -> buffer; None = lost)."""
        k, m = self.k, self.m
        bufs = {}
        for idx, buf in available.items():
            if buf is None:
                continue
            if not isinstance(idx, (int, np.integer)) or not 0 <= idx < k + m:
                raise ErasureDecodeError(f"{self!r}: block index {idx!r} outside 0..{k + m - 1}")
            a = _as_u8(buf)
            want = block_len if idx < k else self.parity_len(block_len)
            if a.size != want:
                kind = "data" if idx < k else "parity"
                raise ErasureDecodeError(
                    f"{self!r}: {kind} block {idx} has {a.size} bytes, expected {want} "
                    f"(block_len={block_len}); the stored blocks disagree")
            bufs[int(idx)] = a
        if len(bufs) < k:
            raise ErasureDecodeError(
                f"{self!r}: only {len(bufs)} of {k + m} blocks available ({sorted(bufs)}), need {k}: "
                f"more than {m} group members lost this version; restore it from another level")
        result = [bufs.get(i) for i in range(k)]
        missing = [i for i in range(k) if i not in bufs]
        if missing:
            for i in missing:
                result[i] = np.empty(block_len, dtype=np.uint8)
            self._rebuild(bufs, missing, block_len, result)
        return result


class XorCodec(ErasureCodec):
    """Single parity: p = d0 ^ d1 ^ ... ^ d(k-1), with numpy ufuncs on cache-sized stripes."""

    scheme, backend, stripe = "xor", "numpy-xor", 256 << 10

    def _xor_into(self, srcs, dst, n):
        for s, ln, _ in self._stripes(n):
            o = dst[s:s + ln]
            np.bitwise_xor(srcs[0][s:s + ln], srcs[1][s:s + ln], out=o)
            for b in srcs[2:]:
                np.bitwise_xor(o, b[s:s + ln], out=o)

    def _encode(self, blocks, out, n):
        self._xor_into(blocks, out[0], n)

    def _rebuild(self, bufs, missing, n, result):
        (lost,) = missing  # decode() guarantees k of k + 1 present
        self._xor_into([bufs[i] for i in sorted(bufs)], result[lost], n)


class PyeclibCodec(ErasureCodec):
    """Reed-Solomon through pyeclib/liberasurecode (ISA-L or its own rs_vand).

    liberasurecode frames each fragment as ``header + payload``. Encoding k stripes laid
    end to end, each a multiple of ``unit`` bytes, makes payload i exactly stripe i, so
    parity payloads are stored without headers. Headers do not depend on the payload
    (no checksum is requested), so decode borrows the ones the library made for a zero
    stripe of the same length. Fragments given to the library are always ``bytes``
    (a bytearray makes liberasurecode abort the process).
    """

    scheme, stripe = "rs", 32 << 10  # fragments stay under glibc's mmap threshold

    def __init__(self, k, m, ec_type, stripe=None):
        from pyeclib.ec_iface import ECDriver
        self.ec_type, self.backend = ec_type, "pyeclib:" + ec_type
        self._drv = ECDriver(k=k, m=m, ec_type=ec_type)
        self.k, self.m = k, m
        self.unit, self._hdr = self._probe_framing()
        self._headers_by_len = {}
        super().__init__(k, m, stripe)

    def _probe_framing(self):
        """Smallest unit u with payload == stripe for stripes of 3u and 5u bytes; header size."""
        for u in (1 << e for e in range(13)):
            lens = []
            for n in (3 * u, 5 * u):
                data = np.arange(self.k * n, dtype=np.uint64).astype(np.uint8)
                frags = self._drv.encode(data)
                lens.append(len(frags[0]))
                if not all(frags[i][len(frags[i]) - n:] == data[i * n:(i + 1) * n].tobytes()
                           for i in range(self.k)):
                    break
            else:
                if lens[1] - lens[0] == 2 * u:
                    return u, lens[0] - 3 * u
        raise ConfigError(f"pyeclib backend {self.ec_type}: unsupported fragment layout")

    def _headers(self, plen):
        hdrs = self._headers_by_len.get(plen)
        if hdrs is None:
            frags = self._drv.encode(np.zeros(self.k * plen, dtype=np.uint8))
            hdrs = [f[:self._hdr] for f in frags]
            if len(self._headers_by_len) > 8:
                self._headers_by_len.clear()
            self._headers_by_len[plen] = hdrs
        return hdrs

    def _encode(self, blocks, out, n):
        k, hdr = self.k, self._hdr
        stage = np.empty(k * min(self.stripe, self.parity_len(n)), dtype=np.uint8)
        for s, ln, pl in self._stripes(n):
            st = stage[:k * pl]
            if pl != ln:
                st.fill(0)
            for i, b in enumerate(blocks):
                st[i * pl:i * pl + ln] = b[s:s + ln]
            frags = self._drv.encode(st)
            for j, o in enumerate(out):
                o[s:s + pl] = np.frombuffer(frags[k + j], dtype=np.uint8, count=pl, offset=hdr)

    def _rebuild(self, bufs, missing, n, result):
        k, hdr = self.k, self._hdr
        use = sorted(bufs)[:k]
        for s, ln, pl in self._stripes(n):
            hdrs = self._headers(pl)
            pad = bytes(pl - ln)
            frags = [b"".join((hdrs[i], bufs[i][s:s + ln], pad) if i < k else (hdrs[i], bufs[i][s:s + pl]))
                     for i in use]
            try:
                rebuilt = self._drv.reconstruct(frags, list(missing))
            except Exception as exc:  # pyeclib raises its own ECDriverError family
                raise ErasureDecodeError(f"{self!r}: reconstruct of {missing} failed: {exc}") from exc
            for i, f in zip(missing, rebuilt):
                result[i][s:s + ln] = np.frombuffer(f, dtype=np.uint8, count=ln, offset=hdr)


class ZfecCodec(ErasureCodec):
    """Reed-Solomon (GF(2^8) Vandermonde, systematic) through zfec; no framing, any length."""

    scheme, backend, stripe = "rs", "zfec", 256 << 10

    def __init__(self, k, m, stripe=None):
        import zfec
        self._enc, self._dec = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
        super().__init__(k, m, stripe)

    def _encode(self, blocks, out, n):
        want = tuple(range(self.k, self.k + self.m))
        for s, ln, _ in self._stripes(n):
            par = self._enc.encode(tuple(b[s:s + ln] for b in blocks), want)
            for o, p in zip(out, par):
                o[s:s + ln] = np.frombuffer(p, dtype=np.uint8)

    def _rebuild(self, bufs, missing, n, result):
        use = tuple(sorted(bufs)[:self.k])
        for s, ln, _ in self._stripes(n):
            prim = self._dec.decode(tuple(bufs[i][s:s + ln] for i in use), use)
            for i in missing:
                result[i][s:s + ln] = np.frombuffer(prim[i], dtype=np.uint8)


# Automatic choice for "rs", fastest first (see the benchmark block at the top). Not in it:
# pyeclib:isa_l_rs_vand, which cannot decode some loss patterns (e.g. 20 of 3003 with k=8, m=6).
RS_PREFERENCE = ("pyeclib:isa_l_rs_cauchy", "pyeclib:isa_l_rs_vand_inv", "zfec",
                 "pyeclib:liberasurecode_rs_vand")
_RS_ALL = RS_PREFERENCE + ("pyeclib:isa_l_rs_vand",)


def _build(backend, k, m, stripe=None):
    if backend == "numpy-xor":
        return XorCodec(k, m, stripe)
    if backend == "zfec":
        return ZfecCodec(k, m, stripe)
    return PyeclibCodec(k, m, backend.split(":", 1)[1], stripe)


def available_backends(scheme):
    """Backends of ``scheme`` whose library imports and initialises here (preferred first)."""
    if scheme == "xor":
        return ["numpy-xor"]
    found = []
    for name in _RS_ALL:
        try:
            _build(name, 4, 2)
        except Exception:  # ImportError, ECBackendInstanceNotAvailable, ...
            continue
        found.append(name)
    return found


def make_codec(scheme, k, m=1, backend=None, stripe=None):
    """Codec for an erasure group of k data blocks and m parity blocks.

    scheme "xor" (m must be 1) or "rs" (m >= 1, k + m <= 256). ``backend`` None picks the
    fastest available one (RS_PREFERENCE, by the benchmark); naming one forces it.
    ``stripe`` overrides the per-call stripe size (benchmarks). Called by the erasure
    module when it is built from its config section; raises ConfigError naming the bad value.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"erasure scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"erasure k={k!r}: the group size must be an integer >= 2")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ConfigError(f"erasure m={m!r}: the parity count must be an integer >= 1")
    if scheme == "xor" and m != 1:
        raise ConfigError(f"erasure m={m}: scheme 'xor' has exactly 1 parity block; use scheme 'rs' for m > 1")
    if scheme == "rs" and k + m > 256:
        raise ConfigError(f"erasure k={k}, m={m}: Reed-Solomon over GF(2^8) needs k + m <= 256")
    k, m = int(k), int(m)
    known = ("numpy-xor",) if scheme == "xor" else _RS_ALL
    if backend is not None and backend not in known:
        raise ConfigError(f"erasure backend={backend!r} is not one of {', '.join(known)} for scheme {scheme!r}")
    errors = []
    for name in ([backend] if backend else known[:len(RS_PREFERENCE)] if scheme == "rs" else known):
        try:
            return _build(name, k, m, stripe)
        except ConfigError:
            raise
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise ConfigError(f"erasure scheme {scheme!r} k={k} m={m}: no usable backend here "
                      f"(pip install pyeclib or zfec): {'; '.join(errors)}")


__all__ = ["ErasureCodec", "ErasureDecodeError", "ErasureEncodeError", "XorCodec", "PyeclibCodec",
           "ZfecCodec", "RS_PREFERENCE", "available_backends", "make_codec", "pad_to"]
