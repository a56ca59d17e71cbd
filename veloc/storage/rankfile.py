"""The self-describing per-rank checkpoint file (``r<rank>.vck``).

Layout::

    magic  b"VELOCRK1"                      8 bytes
    header length (u32, little endian)      4 bytes
    crc32 of the header JSON (u32, LE)      4 bytes
    header JSON: format, name, version, rank, regions[{id, kind, dtype, shape, order,
                 offset, nbytes, [dtype_name], [global_shape, global_offset],
                 [replicated]}]
    region bytes, each starting at a 4096-byte aligned offset (direct-I/O friendly)

Arrays are written straight from their buffers and never pickled; a ``pickle`` region
holds the bytes of an object the user explicitly protected with ``pickle=True``.
``dtype_name`` (optional; absent in older files) names an element type numpy lacks
(``bfloat16``, ``float8_e4m3fn``, a torch dtype); ``dtype`` then describes raw storage of
the same item size, so readers without that type still see every byte.
``global_shape``/``global_offset`` (optional) place an array region as a slab of a global
array; ``replicated`` (optional) marks a region every rank holds identically.
Written by each application rank (``checkpoint_mem``); read by each rank on restart and
by the ``veloc`` command-line tool.
"""
import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import preadinto_all, pwrite_all
from veloc.storage.hashing import HASH_CHUNK, hasher, map_readonly

MAGIC = b"VELOCRK1"
PREFIX = struct.Struct("<8sII")
ALIGN = 4096
FORMAT = 1
MAX_HEADER = 64 << 20
DISK_READ_PIECE = 16 << 20     # RankFile.read_piece for a copy on a disk (persistent)


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class RegionInfo:
    """One region as described by a file header."""
    id: object
    kind: str          # "array" or "pickle"
    dtype: str         # numpy dtype descr string (arrays); "" for pickle
    shape: tuple
    order: str         # "C" or "F"
    offset: int
    nbytes: int
    dtype_name: str = ""   # element type by name where numpy has none (e.g. "bfloat16")
    global_shape: tuple = ()   # the region is a slab of a global array of this shape ...
    global_offset: tuple = ()  # ... starting at this index in every dimension
    replicated: bool = False   # every rank holds the same value

    @property
    def is_global(self):
        return bool(self.global_shape)

    def numpy_dtype(self):
        descr = json.loads(self.dtype) if self.dtype.startswith("[") else self.dtype
        return np.lib.format.descr_to_dtype(_tuplify(descr))


def _tuplify(descr):
    if isinstance(descr, list):
        return [tuple(_tuplify(x) for x in item) if isinstance(item, list) else item for item in descr]
    return descr


def dtype_descr(dtype):
    """A JSON-storable, exact description of a numpy dtype."""
    descr = np.lib.format.dtype_to_descr(dtype)
    return descr if isinstance(descr, str) else json.dumps(descr)


def _region_json(info):
    out = {"id": info.id, "kind": info.kind, "dtype": info.dtype, "shape": list(info.shape),
           "order": info.order, "offset": info.offset, "nbytes": info.nbytes}
    if info.dtype_name:
        out["dtype_name"] = info.dtype_name
    if info.global_shape:
        out["global_shape"], out["global_offset"] = list(info.global_shape), list(info.global_offset)
    if info.replicated:
        out["replicated"] = True
    return out


def region_info(r, offset):
    """A :class:`RegionInfo` from a region's descriptor dict (a header entry or what a
    region writes) placed at ``offset``."""
    return RegionInfo(r["id"], r["kind"], r["dtype"], tuple(r["shape"]), r["order"], int(offset),
                      int(r["nbytes"]), str(r.get("dtype_name", "")),
                      tuple(int(x) for x in r.get("global_shape", ())),
                      tuple(int(x) for x in r.get("global_offset", ())), r.get("replicated") is True)


def _with_extra_keys(descriptor, info):
    """The region's header JSON: its layout plus any other keys of its descriptor (e.g.
    ``lossy``), which readers pass through unchanged."""
    out = _region_json(info)
    out.update({k: v for k, v in descriptor.items() if k not in out and k not in ("dtype_name",)})
    return out


def build_header(name, version, rank, regions):
    """Lay out ``regions`` (dicts with id, kind, dtype, shape, order, nbytes, and any extra
    JSON-storable keys, kept in the header) after a header.

    Returns ``(header_bytes, infos, total_size)``.
    """
    infos = []
    # Offsets depend on the header length, which depends on the offsets: two passes.
    guess = ALIGN
    for _ in range(3):
        offset = guess
        infos = []
        for r in regions:
            infos.append(region_info(r, offset))
            offset = _align(offset + r["nbytes"])
        body = json.dumps({
            "format": FORMAT, "name": name, "version": version, "rank": rank,
            "regions": [_with_extra_keys(r, i) for r, i in zip(regions, infos)],
        }, separators=(",", ":")).encode()
        need = _align(PREFIX.size + len(body))
        if need <= guess:
            break
        guess = need
    header = PREFIX.pack(MAGIC, len(body), zlib.crc32(body)) + body
    total = infos[-1].offset + infos[-1].nbytes if infos else len(header)
    return header, infos, max(total, len(header))


def write_rank_file(fd, header, infos, views, total, mapped=None, digest=None):
    """Write header and region buffers into the open file ``fd`` (opened read-write).

    ``mapped``: a shared writable mapping of the whole file, exactly ``total`` bytes, of
    recycled (already allocated) scratch space; the buffers are copied into it (about
    twice as fast as ``pwrite`` on tmpfs). Otherwise ``pwrite`` each buffer. The file
    ends up exactly ``total`` bytes.

    ``digest``: a streaming hasher (``update``) fed every byte of the file in order while
    it is written, each chunk while it is still in the CPU cache (the alignment gaps
    between regions are zeroed so that the file holds exactly what was hashed): the
    application rank's checksum, about a fifth of the copy's time instead of a separate
    pass over the file by the engine.
    """
    if digest is None:
        _write_plain(fd, header, infos, views, total, mapped)
        return
    put = _MappedSink(mapped) if mapped is not None else _PwriteSink(fd)
    try:
        _write_hashed(put, header, infos, views, total, digest)
    finally:
        del put       # no view of the mapping outlives the write (the mapping is closed later)
    if mapped is None:
        os.ftruncate(fd, total)


def _write_hashed(put, header, infos, views, total, digest):
    put(header, 0, digest)
    at = len(header)
    for info, view in zip(infos, views):
        if not info.nbytes:
            continue
        if info.offset > at:
            put(bytes(info.offset - at), at, digest)
        source = memoryview(view).cast("B")
        for start in range(0, info.nbytes, HASH_CHUNK):
            put(source[start:start + HASH_CHUNK], info.offset + start, digest)
        at = info.offset + info.nbytes
    if total > at:
        put(bytes(total - at), at, digest)


class _MappedSink:
    """Copies a chunk into the file's mapping, then hashes the copy (still in cache)."""

    def __init__(self, mapped):
        self.target = np.frombuffer(mapped, np.uint8)

    def __call__(self, chunk, offset, digest):
        dst = self.target[offset:offset + len(chunk)]
        np.copyto(dst, np.frombuffer(chunk, np.uint8))
        digest.update(dst)


class _PwriteSink:
    """``pwrite``s a chunk, then hashes the source (just read by the kernel: in cache)."""

    def __init__(self, fd):
        self.fd = fd

    def __call__(self, chunk, offset, digest):
        pwrite_all(self.fd, chunk, offset)
        digest.update(chunk)


def _write_plain(fd, header, infos, views, total, mapped):
    if mapped is not None:
        mapped[:len(header)] = header
        for info, view in zip(infos, views):
            if info.nbytes:
                dst = np.frombuffer(mapped, np.uint8, info.nbytes, info.offset)
                np.copyto(dst, np.frombuffer(view, np.uint8))
                del dst
        return
    pwrite_all(fd, header, 0)
    for info, view in zip(infos, views):
        if info.nbytes:
            pwrite_all(fd, view, info.offset)
    os.ftruncate(fd, total)


def _flat_target(out, info):
    """``out``'s bytes as a flat writable uint8 array in the stored memory order of region
    ``info``, or ``None`` when ``out`` is laid out otherwise (a copy must reorder it)."""
    if not out.flags.writeable or not (out.flags.c_contiguous if info.order == "C" else out.flags.f_contiguous):
        return None
    if out.nbytes != info.nbytes:
        return None
    return out.reshape(-1, order=info.order).view(np.uint8)


class RegionReader:
    """What every reader of a rank's regions shares (the native :class:`RankFile`, the
    compressed and the HDF5 readers): lookup by id, closing the file and the mapping it
    owns, and use as a context manager. Subclasses set ``regions``, ``_file`` and ``_map``
    (``_owns_map`` False when the mapping belongs to someone else)."""

    regions = ()
    _map = None
    _owns_map = True

    def region(self, region_id):
        """The :class:`RegionInfo` with id ``region_id`` or ``None``."""
        for r in self.regions:
            if r.id == region_id:
                return r
        return None

    def load_bytes(self, info):
        """The bytes of region ``info`` (a pickled object), as a read-only view."""
        return self.bytes_view(info)

    def close(self):
        if self._map is not None and self._owns_map and not isinstance(self._map, bytes):
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
        self._map = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RankFile(RegionReader):
    """Read-only view of a rank file, validated on open (magic, header CRC, bounds).

    Region reads (:meth:`read_into`) go straight from the file into the caller's array
    with ``preadv``: on tmpfs faster than mapping the file (the kernel fills no page
    table) and then copying. A mapping is made only when a caller asks for views of the
    file (:meth:`bytes_view`, :meth:`as_array`, :meth:`head_view`, :meth:`digest`)."""

    # Bytes per read of :meth:`read_verified`. From tmpfs a cache-sized piece is hashed
    # while it is in the CPU cache; from a disk, two ranks reading 256 KiB pieces of
    # their files at once ran at a third of the disk's speed here (readahead of two
    # interleaved streams), so a reader of a disk copy sets ``DISK_READ_PIECE``.
    read_piece = HASH_CHUNK

    def __init__(self, path, mapped=None):
        """``mapped``: an existing read-only mapping of the whole file to read from (kept
        open by its owner, e.g. the pipeline run's ``MappedFiles``), instead of a new one."""
        self.path = path
        self._file = open(path, "rb")
        self._owns_map = mapped is None
        self._map = mapped
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.meta, self.regions = self._parse_header()
            if mapped is not None and len(mapped) != self.size:
                raise CorruptCheckpointError(f"{self.path}: changed while being read")
        except BaseException:
            self._file.close()
            raise

    @property
    def _mapping(self):
        """The read-only mapping of the whole file (made on first use)."""
        if self._map is None:
            self._map = map_readonly(self._file.fileno(), self.size) if self.size else b""
        return self._map

    def _parse_header(self):
        prefix = self._file.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise CorruptCheckpointError(f"{self.path}: truncated ({self.size} bytes), no header")
        magic, length, crc = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise CorruptCheckpointError(f"{self.path}: not a veloc rank file (bad magic {magic!r})")
        if length > MAX_HEADER or PREFIX.size + length > self.size:
            raise CorruptCheckpointError(f"{self.path}: header length {length} exceeds file size {self.size}")
        body = self._file.read(length)
        if zlib.crc32(body) != crc:
            raise CorruptCheckpointError(f"{self.path}: header checksum mismatch")
        try:
            meta = json.loads(body)
            regions = [region_info(r, r["offset"]) for r in meta["regions"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{self.path}: malformed header ({exc})") from None
        for r in regions:
            if r.kind == "array":
                try:
                    expected = int(np.prod(r.shape, dtype=np.int64)) * r.numpy_dtype().itemsize
                except (ValueError, TypeError) as exc:
                    raise CorruptCheckpointError(f"{self.path}: region {r.id!r} has a bad dtype ({exc})") from None
                if expected != r.nbytes:
                    raise CorruptCheckpointError(f"{self.path}: region {r.id!r} claims {r.nbytes} bytes for "
                                                 f"{r.dtype} {r.shape} ({expected} expected)")
            if r.global_shape and (len(r.global_shape) != len(r.shape) or len(r.global_offset) != len(r.shape)
                                   or any(o < 0 or o + n > g for o, n, g in
                                          zip(r.global_offset, r.shape, r.global_shape))):
                raise CorruptCheckpointError(f"{self.path}: region {r.id!r} claims a slab {r.shape} at "
                                             f"{r.global_offset} outside its global shape {r.global_shape}")
            if r.offset < PREFIX.size + length or r.offset + r.nbytes > self.size:
                raise CorruptCheckpointError(
                    f"{self.path}: region {r.id!r} [{r.offset}, +{r.nbytes}) lies outside the file "
                    f"({self.size} bytes): the file is truncated")
        return meta, regions

    def digest(self, algorithm):
        """Hex digest of the whole file, from the mapping."""
        from veloc.storage.hashing import digest_buffer
        return digest_buffer(self._mapping, algorithm)

    def head_view(self):
        """A read-only uint8 view of the file's bytes before its first region (the header
        and its padding)."""
        first = min((r.offset for r in self.regions), default=self.size)
        return np.frombuffer(self._mapping, np.uint8, first, 0)

    def bytes_view(self, info):
        """A read-only uint8 numpy view of a region's bytes (no copy)."""
        return np.frombuffer(self._mapping, np.uint8, info.nbytes, info.offset)

    def as_array(self, info):
        """A read-only numpy array view of an array region (no copy)."""
        raw = self.bytes_view(info)
        return raw.view(info.numpy_dtype()).reshape(info.shape, order=info.order)

    # The reader interface restart uses for every region file (see also
    # compressed_file.CompressedReader): regions, region(id), read_into, load_bytes,
    # digest, close.
    def read_into(self, info, out):
        """Copy array region ``info`` into ``out`` (a numpy array of its dtype and shape):
        read straight into ``out``'s buffer when its memory order is the stored one, else
        copied from the mapping."""
        target = _flat_target(out, info)
        if target is None or (self._map is not None and not self._owns_map):
            src = self.as_array(info)
            np.copyto(out, src, casting="no")
            del src
            return
        if preadinto_all(self._file.fileno(), target, info.offset) != info.nbytes:
            raise CorruptCheckpointError(f"{self.path}: region {info.id!r} is cut short (the file shrank "
                                         "while being read)")

    def read_verified(self, targets, algorithm, expected):
        """Read the whole file once, in file order, hashing every byte as it arrives:
        the bytes of region ``info`` go into ``targets[info.id]`` (an array of the region's
        dtype, shape and memory order), the rest (header, padding, regions not asked for)
        through a cache-sized buffer. Raises CorruptCheckpointError when the digest is not
        ``expected``; the targets then hold unverified bytes."""
        h = hasher(algorithm)
        chunk = memoryview(bytearray(HASH_CHUNK))
        fd, at = self._file.fileno(), 0
        spans = sorted((r.offset, r.nbytes, _flat_target(targets[r.id], r) if r.id in targets else None)
                       for r in self.regions if r.nbytes)
        for offset, nbytes, target in spans + [(self.size, 0, None)]:
            at = self._hash_through(fd, h, chunk, at, offset)
            if target is not None:
                view = memoryview(target)
                for start in range(0, nbytes, self.read_piece):
                    piece = view[start:start + self.read_piece]
                    if preadinto_all(fd, piece, offset + start) != len(piece):
                        raise CorruptCheckpointError(f"{self.path}: cut short while being read")
                    for sub in range(0, len(piece), HASH_CHUNK):
                        h.update(piece[sub:sub + HASH_CHUNK])
                at = offset + nbytes
        if h.hexdigest() != expected:
            raise CorruptCheckpointError(f"{self.path}: {algorithm} checksum mismatch found while reading "
                                         "(the copy is corrupt)")

    def _hash_through(self, fd, h, chunk, start, end):
        """Feed bytes ``[start, end)`` of the file to ``h`` through ``chunk``; returns ``end``."""
        while start < end:
            piece = chunk[:min(len(chunk), end - start)]
            if preadinto_all(fd, piece, start) != len(piece):
                raise CorruptCheckpointError(f"{self.path}: cut short while being read")
            h.update(piece)
            start += len(piece)
        return end
