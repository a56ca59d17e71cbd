"""The compressed rank file (``r<rank>.vcz``): a rank file's regions in independent blocks.

Layout::

    magic  b"VELOCCZ1"                                      8 bytes
    stored blocks, back to back
    header JSON
    trailer: header offset (u64), header length (u32), crc32 of the header (u32),
             magic b"VELOCCZE"                              24 bytes

The header holds what the raw rank file's header holds (``format``, ``name``,
``version``, ``rank`` and every region's JSON dict as written there, extra keys
included), plus for each region its ``codec`` (and ``error_bound`` for a lossy one) and
its ``blocks``: ``[offset, stored bytes, raw bytes, how, xxh3_64 of the stored bytes]``
with ``how`` 0 = stored raw, 1 = the region's lossless codec, 2 = zfp. ``head`` lists the
blocks of the raw file's own header bytes, so :meth:`CompressedReader.restore_raw`
rebuilds the raw file byte for byte (``source``: its size and digest).

Blocks are independent (``block_size`` raw bytes each, default 4 MiB): decode can run
in parallel, and a damaged block is found by its own checksum before it is decoded; a
block that does not shrink by at least 10 % is stored raw. Decoding writes each block
straight into the caller's array. Written by the compress module (node engine); read by
application ranks on restart, by the engine and by the ``veloc`` tool.
"""
import json
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from veloc.storage.codecs import get_codec
from veloc.errors import ConfigError, CorruptCheckpointError
from veloc.storage.fileio import atomic_file, pwrite_all
from veloc.storage.hashing import digest_buffer, hasher, map_readonly
from veloc.storage.rankfile import RegionReader, region_info

MAGIC = b"VELOCCZ1"
END_MAGIC = b"VELOCCZE"
TRAILER = struct.Struct("<QII8s")
FORMAT = 1
DEFAULT_BLOCK = 4 << 20
MIN_SAVING = 0.10                       # a block must shrink by this much to be stored encoded
RAW, CODED, ZFP = 0, 1, 2
PROBE_BYTES = 128 << 10                 # auto: bytes sampled per region and candidate
AUTO_CANDIDATES = ("zstd", "blosc2")    # auto: the smaller output wins (see bench_codecs.py)
MAX_HEADER = 64 << 20


def _stored_checksum(data):
    return xxhash.xxh3_64_intdigest(data)


def _encode_blocks(raw, codec, itemsize, level, block_size, write):
    """Encode ``raw`` (uint8 memoryview) block by block with ``codec`` (``None``: raw);
    ``write(bytes) -> offset``. Returns the block table."""
    blocks = []
    for start in range(0, len(raw), block_size):
        chunk = raw[start:start + block_size]
        how, data = RAW, chunk
        if codec is not None:
            encoded = codec.encode(chunk, itemsize, level)
            if len(encoded) <= (1 - MIN_SAVING) * len(chunk):
                how, data = CODED, encoded
        blocks.append([write(data), len(data), len(chunk), how, _stored_checksum(data)])
    return blocks


def _encode_zfp(arr, tolerance, block_size, write):
    """Lossy blocks of a float array: slabs along its slowest axis, zfp within
    ``tolerance``; a slab with non-finite values or that does not shrink is stored raw."""
    codec = get_codec("zfp")
    slabs = arr if arr.flags.c_contiguous else arr.T          # a C-ordered view either way
    slabs = slabs.reshape(1) if slabs.ndim == 0 else slabs
    if slabs.ndim > 4:
        slabs = slabs.reshape(slabs.shape[0], -1)
    row = max(1, slabs[0].nbytes) if len(slabs) else 1
    step = max(1, block_size // row)
    blocks = []
    for start in range(0, len(slabs), step):
        slab = slabs[start:start + step]
        raw = memoryview(np.ascontiguousarray(slab).reshape(-1).view(np.uint8))
        how, data = RAW, raw
        if slab.size and np.isfinite(slab).all():
            encoded = codec.encode_array(slab, tolerance)
            if len(encoded) <= (1 - MIN_SAVING) * len(raw):
                how, data = ZFP, encoded
        blocks.append([write(data), len(data), len(raw), how, _stored_checksum(data)])
    return blocks


def choose_codec(raw, itemsize, level):
    """``auto``: the codec for one region, by measurement on samples of it: the candidate
    with the smallest output on the samples, or ``None`` (store raw) when none shrinks
    them by 10 %, so incompressible data costs only the probe."""
    n = len(raw)
    if n == 0:
        return None
    if n <= PROBE_BYTES:
        sample = bytes(raw)                       # small: the whole region
    else:                                         # 4 disjoint pieces of whole elements, spread out
        picks = 4
        span = max(itemsize, PROBE_BYTES // picks // itemsize * itemsize)
        starts = [s - s % itemsize for s in ((n - span) * i // (picks - 1) for i in range(picks))]
        sample = b"".join(bytes(raw[s:s + span]) for s in starts)
    best, best_size = None, (1 - MIN_SAVING) * len(sample)
    for name in AUTO_CANDIDATES:
        try:
            codec = get_codec(name)
        except ConfigError:          # library not installed: measure the others
            continue
        size = len(codec.encode(memoryview(sample), itemsize, level))
        if size < best_size:
            best, best_size = codec, size
    return best


def _region_raw(rankfile, info):
    return memoryview(rankfile.bytes_view(info))


def plan_codecs(rankfile, codec="auto", level=None):
    """``{region id: codec name}`` for the regions of ``rankfile``: ``zfp`` where the raw
    header asks for it (``lossy``), ``codec`` otherwise, or with ``auto`` the measured pick
    (``none`` = stored raw)."""
    plan = {}
    for info, rjson in zip(rankfile.regions, rankfile.meta["regions"]):
        if rjson.get("lossy") and info.kind == "array":
            plan[info.id] = "zfp"
        elif codec == "auto":
            itemsize = info.numpy_dtype().itemsize if info.kind == "array" else 1
            pick = choose_codec(_region_raw(rankfile, info), itemsize, level)
            plan[info.id] = "none" if pick is None else pick.name
        else:
            plan[info.id] = codec
    return plan


def write_compressed(rankfile, dst, plan, level=None, block_size=DEFAULT_BLOCK, durable=True,
                     checksum=None, source_digest=None):
    """Encode the open :class:`RankFile` ``rankfile`` into ``dst`` (committed atomically),
    each region with its codec in ``plan`` (see :func:`plan_codecs`; a ``zfp`` region
    within the bound its raw header dict gives as ``lossy = ["zfp", bound]``).
    ``checksum``: algorithm of the returned digest of the stored bytes (computed as they
    are written), and of ``source_digest`` (the raw file's, recorded in the header).
    Returns ``(stored size, stored digest or None)``."""
    regions_json = rankfile.meta["regions"]
    h = hasher(checksum) if checksum else None
    with atomic_file(dst, durable) as fd:
        position = [0]

        def write(data):
            at = position[0]
            view = memoryview(data)
            if h is not None:
                h.update(view)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            position[0] += len(view)
            return at

        write(MAGIC)
        head = _encode_blocks(memoryview(rankfile.head_view()), None, 1, level, block_size, write)
        out_regions = []
        for info, rjson in zip(rankfile.regions, regions_json):
            entry = dict(rjson)
            name = plan[info.id]
            if name == "zfp":
                bound = float(rjson["lossy"][1])
                entry["codec"], entry["error_bound"] = "zfp", bound
                entry["blocks"] = _encode_zfp(rankfile.as_array(info), bound, block_size, write)
            else:
                raw = _region_raw(rankfile, info)
                itemsize = info.numpy_dtype().itemsize if info.kind == "array" else 1
                pick = None if name == "none" else get_codec(name)
                entry["codec"] = name
                entry["blocks"] = _encode_blocks(raw, pick, itemsize, level, block_size, write)
                del raw
            out_regions.append(entry)
        source = {"size": rankfile.size, "checksum": checksum, "digest": source_digest}
        meta = {k: v for k, v in rankfile.meta.items() if k != "regions"}
        meta.update(format=FORMAT, raw_format=rankfile.meta.get("format"), block_size=block_size,
                    source=source, head=head, regions=out_regions, created=time.time())
        body = json.dumps(meta, separators=(",", ":")).encode()
        header_at = write(body)
        write(TRAILER.pack(header_at, len(body), zlib.crc32(body), END_MAGIC))
        stored = position[0]
    return stored, (h.hexdigest() if h is not None else None)


def _decode_block(buf, block, out, codec_name, where):
    offset, stored, raw, how, check = block
    data = memoryview(buf)[offset:offset + stored]
    if _stored_checksum(data) != check:
        raise CorruptCheckpointError(f"{where}: block at byte {offset} is damaged (checksum mismatch)")
    if how == RAW:
        get_codec("none").decode_into(data, out)
    elif how == CODED:
        get_codec(codec_name).decode_into(data, out)
    else:
        raise CorruptCheckpointError(f"{where}: block at byte {offset} has unknown encoding {how!r}")


class CompressedReader(RegionReader):
    """Read-only view of a compressed rank file, validated on open (magic, header CRC,
    block bounds). The same reader interface as :class:`RankFile`: ``regions``,
    ``region(id)``, ``read_into(info, out)``, ``load_bytes(info)``, ``digest(alg)``,
    ``close()``; plus ``codec(info)``, ``stored_bytes(info)``, ``as_array(info)`` and
    :meth:`restore_raw`."""

    def __init__(self, path, workers=1):
        self.path = path
        self.workers = workers
        self._file = open(path, "rb")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._map = map_readonly(self._file.fileno(), self.size) if self.size else b""
            self.meta = self._parse()
        except BaseException:
            self.close()
            raise
        self._entries = {}
        self.regions = []
        for r in self.meta["regions"]:
            try:
                info = region_info(r, r["offset"])      # the raw file's region, layout included
            except (ValueError, KeyError, TypeError) as exc:
                self.close()
                raise CorruptCheckpointError(f"{self.path}: malformed region {r.get('id')!r} ({exc})") from None
            self.regions.append(info)
            self._entries[info.id] = r

    def _parse(self):
        if self.size < len(MAGIC) + TRAILER.size or bytes(self._map[:len(MAGIC)]) != MAGIC:
            raise CorruptCheckpointError(f"{self.path}: not a compressed veloc rank file (bad magic or truncated)")
        at, length, crc, end = TRAILER.unpack(bytes(self._map[self.size - TRAILER.size:]))
        if end != END_MAGIC or length > MAX_HEADER or at + length > self.size - TRAILER.size:
            raise CorruptCheckpointError(f"{self.path}: bad trailer (the file is truncated or overwritten)")
        body = bytes(self._map[at:at + length])
        if zlib.crc32(body) != crc:
            raise CorruptCheckpointError(f"{self.path}: header checksum mismatch")
        try:
            meta = json.loads(body)
            for r in meta["regions"]:
                self._check_blocks(r["blocks"], int(r["nbytes"]), at, repr(r["id"]))
            self._check_blocks(meta["head"], None, at, "header")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{self.path}: malformed header ({exc})") from None
        return meta

    def _check_blocks(self, blocks, nbytes, limit, what):
        total = 0
        for offset, stored, raw, how, _ in blocks:
            if offset < len(MAGIC) or offset + stored > limit or raw < 0:
                raise CorruptCheckpointError(f"{self.path}: a block of region {what} lies outside the data")
            total += raw
        if nbytes is not None and total != nbytes:
            raise CorruptCheckpointError(f"{self.path}: region {what} blocks hold {total} bytes, "
                                         f"{nbytes} expected")

    def codec(self, info):
        """The region's codec name (``zfp`` for a lossy region) and its error bound or None."""
        entry = self._entries[info.id]
        return entry["codec"], entry.get("error_bound")

    def stored_bytes(self, info):
        return sum(b[1] for b in self._entries[info.id]["blocks"])

    def digest(self, algorithm):
        """Hex digest of the whole stored file (what the manifest records)."""
        return digest_buffer(self._map, algorithm)

    def _decode_bytes(self, blocks, codec_name, out):
        """Decode lossless ``blocks`` into the uint8 memoryview ``out``."""
        starts, at = [], 0
        for b in blocks:
            starts.append(at)
            at += b[2]
        jobs = [(b, out[s:s + b[2]]) for b, s in zip(blocks, starts)]
        where = str(self.path)
        if self.workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for f in [pool.submit(_decode_block, self._map, b, o, codec_name, where) for b, o in jobs]:
                    f.result()
        else:
            for b, o in jobs:
                _decode_block(self._map, b, o, codec_name, where)

    def _decode_zfp(self, blocks, out):
        """Decode a lossy region into the array ``out`` (of the stored dtype and shape)."""
        slabs = out if out.flags.c_contiguous else out.T
        slabs = slabs.reshape(1) if slabs.ndim == 0 else slabs
        if slabs.ndim > 4:
            slabs = slabs.reshape(slabs.shape[0], -1)
        row = max(1, slabs[0].nbytes) if len(slabs) else 1
        at = 0
        for offset, stored, raw, how, check in blocks:
            rows = raw // row
            target = slabs[at:at + rows]
            data = memoryview(self._map)[offset:offset + stored]
            if _stored_checksum(data) != check:
                raise CorruptCheckpointError(f"{self.path}: block at byte {offset} is damaged (checksum mismatch)")
            if how == ZFP:
                get_codec("zfp").decode_into_array(data, target)
            else:
                np.copyto(target, np.frombuffer(data, target.dtype).reshape(target.shape))
            at += rows

    def read_into(self, info, out):
        """Decode array region ``info`` straight into ``out`` (a writable numpy array of the
        stored dtype and shape, either memory order)."""
        entry = self._entries[info.id]
        same_order = out.flags.c_contiguous if info.order == "C" else out.flags.f_contiguous
        target = out if same_order else np.empty(out.shape, out.dtype, order=info.order)
        if entry["codec"] == "zfp":
            self._decode_zfp(entry["blocks"], target)
        elif target.nbytes:
            raw = target.reshape(-1, order=info.order).view(np.uint8)
            self._decode_bytes(entry["blocks"], entry["codec"], memoryview(raw))
        if target is not out:
            np.copyto(out, target)

    def as_array(self, info):
        """A new array holding region ``info`` (decoded)."""
        out = np.empty(info.shape, info.numpy_dtype(), order=info.order)
        self.read_into(info, out)
        return out

    def load_bytes(self, info):
        """The raw bytes of region ``info`` (a pickled object), decoded."""
        out = bytearray(info.nbytes)
        self._decode_bytes(self._entries[info.id]["blocks"], self._entries[info.id]["codec"],
                           memoryview(out))
        return memoryview(out)

    def lossless(self):
        return all(r["codec"] != "zfp" for r in self.meta["regions"])

    def restore_raw(self, fd):
        """Write the raw rank file this file was made from into ``fd`` (open for writing),
        one decoded block at a time (a lossy region: one region at a time); returns its size."""
        size = int(self.meta["source"]["size"])
        os.ftruncate(fd, size)
        largest = max([b[2] for r in self.meta["regions"] for b in r["blocks"]]
                      + [b[2] for b in self.meta["head"]] + [0])
        scratch = memoryview(bytearray(largest))

        def put(blocks, codec_name, at):
            for block in blocks:
                out = scratch[:block[2]]
                _decode_block(self._map, block, out, codec_name, str(self.path))
                pwrite_all(fd, out, at)
                at += block[2]
        put(self.meta["head"], "none", 0)
        for info in self.regions:
            entry = self._entries[info.id]
            if entry["codec"] == "zfp":
                arr = self.as_array(info)
                pwrite_all(fd, arr.reshape(-1, order=info.order).view(np.uint8), info.offset)
                del arr
            else:
                put(entry["blocks"], entry["codec"], info.offset)
        return size


def open_reader(path, kind="regions", workers=1):
    """The reader of a rank's region file of any format (see
    :func:`veloc.storage.formats.open_rank_file`)."""
    from veloc.storage.formats import open_rank_file
    return open_rank_file(path, kind, workers)


def encode_buffer(buf, codec="auto", itemsize=1, level=None, block_size=DEFAULT_BLOCK):
    """In-memory form of one region's blocks, for benchmarks: ``(parts, codec name, blocks)``
    (each block's offset is its index in ``parts``)."""
    raw = memoryview(buf).cast("B")
    parts = []

    def write(data):
        parts.append(data if isinstance(data, bytes) else bytes(data))
        return len(parts) - 1
    pick = choose_codec(raw, itemsize, level) if codec == "auto" else (
        None if codec == "none" else get_codec(codec))
    blocks = _encode_blocks(raw, pick, itemsize, level, block_size, write)
    return parts, "none" if pick is None else pick.name, blocks


def decode_buffer(encoded, out):
    """Decode what :func:`encode_buffer` returned into the writable buffer ``out``."""
    parts, codec, blocks = encoded
    view, at = memoryview(out).cast("B"), 0
    for index, stored, raw, how, check in blocks:
        _decode_block(parts[index], [0, stored, raw, how, check], view[at:at + raw], codec, "buffer")
        at += raw
