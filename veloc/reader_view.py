"""The read-only view that :func:`veloc.open` returns, and the stitching of global arrays.

Used in a plain analysis process (no MPI) and by ``veloc export``. The view holds one
open, verified reader per rank (see :mod:`veloc.reader_formats`); ``read`` hands out a
rank's array as a read-only, memory-mapped view, ``read_global`` assembles a global
array from every rank's slab after checking that the slabs tile it exactly (no gap, no
overlap), and returns one copy of a replicated region. Nothing is ever unpickled unless
the caller passes ``allow_pickle=True``.
"""
import bisect
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from veloc.errors import CorruptCheckpointError, RestartError


def rank_ranges(ranks, empty="none") -> str:
    """[0, 1, 2, 5] -> '0-2,5' (``empty`` for no rank)."""
    out, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out) or empty


@dataclass(frozen=True)
class RegionSpec:
    """One region of a version as the ranks' file headers describe it.

    ``kind`` is ``"array"`` or ``"pickle"``; ``dtype`` the stored numpy dtype (``None``
    for pickle); ``dtype_name`` the element type's name where numpy has none (a
    ``bfloat16`` tensor is then stored, and read, as raw items of the same size);
    ``global_shape`` is set for a slab of a global array, ``replicated`` for a region
    every rank holds identically; ``shape`` is what ``read_global`` returns (global or
    replicated) or the common per-rank shape (``None`` if ranks differ); ``shapes`` is
    each holding rank's own shape.
    """
    id: Any
    kind: str
    dtype: Optional[np.dtype]
    dtype_name: str
    shape: Optional[Tuple[int, ...]]
    global_shape: Tuple[int, ...]
    replicated: bool
    shapes: Mapping[int, Tuple[int, ...]] = field(repr=False)

    @property
    def is_global(self) -> bool:
        return bool(self.global_shape)

    @property
    def ranks(self) -> Tuple[int, ...]:
        return tuple(sorted(self.shapes))


def _region_specs(readers):
    infos = {}
    for rank, reader in sorted(readers.items()):
        for info in reader.regions if reader is not None else ():
            infos.setdefault(info.id, {})[rank] = info
    specs = {}
    for region_id, by_rank in infos.items():
        first = next(iter(by_rank.values()))
        shapes = {r: tuple(i.shape) for r, i in by_rank.items()}
        if first.kind != "array":
            shape = None
        elif first.global_shape:
            shape = tuple(first.global_shape)
        else:
            shape = tuple(first.shape) if len(set(shapes.values())) == 1 else None
        dtype = first.numpy_dtype() if first.kind == "array" else None
        specs[region_id] = RegionSpec(region_id, first.kind, dtype, first.dtype_name, shape,
                                      tuple(first.global_shape), first.replicated, shapes)
    return specs


def _plain_id(region_id):
    """A region id as the file headers hold it: ``str``, or ``int`` for any integer type."""
    if isinstance(region_id, str) or isinstance(region_id, bool) or not hasattr(region_id, "__index__"):
        return region_id
    return int(region_id.__index__())


def _box(offset, shape):
    return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(offset, shape)) + "]"


def check_tiling(where, global_shape, slabs):
    """Raise CorruptCheckpointError unless ``slabs`` (``[(rank, offset, shape)]``) cover
    ``global_shape`` exactly once. Counts coverage on the grid of slab boundaries (at most
    ``(2 * slabs + 1) ** ndim`` cells, never the array itself) to name a gap or an overlap."""
    if not all(global_shape):
        return
    cuts = [sorted({0, g} | {o[d] for _, o, _ in slabs} | {o[d] + s[d] for _, o, s in slabs})
            for d, g in enumerate(global_shape)]
    counts = np.zeros([len(c) - 1 for c in cuts], np.uint32)
    boxes = []
    for rank, offset, shape in slabs:
        cell = tuple(slice(bisect.bisect_left(c, o), bisect.bisect_left(c, o + n))
                     for c, o, n in zip(cuts, offset, shape))
        counts[cell] += 1
        boxes.append((rank, cell))
    for bad, what in ((counts > 1, "overlap"), (counts == 0, "gap")):
        if bad.any():
            at = np.argwhere(bad)[0]
            lo = [int(c[i]) for c, i in zip(cuts, at)]
            span = [int(c[i + 1]) - int(c[i]) for c, i in zip(cuts, at)]
            holders = [r for r, cell in boxes if all(s.start <= i < s.stop for s, i in zip(cell, at))]
            detail = (f"ranks {', '.join(map(str, holders))} all hold global index {_box(lo, span)}"
                      if what == "overlap" else
                      f"no rank's slab covers global index {_box(lo, span)} of global shape {tuple(global_shape)}")
            raise CorruptCheckpointError(f"{where}: slab {what}: {detail}")


class CheckpointView:
    """A read-only view of one checkpoint version (built by :func:`veloc.open`).

    Attributes: ``name``, ``version``, ``level`` (the level every rank is read from, or
    ``"mixed"``), ``rank_levels`` (``{rank: level}``), ``nranks`` (the writing job's size),
    ``ranks`` (the ranks held: ``0..nranks-1``, or the unique ids of ``init_single``
    processes), ``files`` (``{rank: path of the file read}``), ``regions`` (``{id: RegionSpec}``), ``verified`` (whether content digests
    were checked on open, where the manifests record them), ``skipped`` (``[(version,
    reason)]`` of newer versions passed over because they cannot be read whole). Close it (or use it as a
    context manager) to release the mappings; arrays handed out stay valid while referenced.
    """

    def __init__(self, name, version, nranks, readers: Dict[int, Any], rank_levels: Dict[int, str],
                 verified: bool):
        self.name, self.version, self.nranks, self.verified = name, version, nranks, verified
        self._readers = dict(readers)
        self.rank_levels = dict(sorted(rank_levels.items()))
        self.ranks = tuple(sorted(self._readers))
        self.files = {r: (reader.path if reader is not None else None) for r, reader in sorted(self._readers.items())}
        used = set(self.rank_levels.values())
        self.level = used.pop() if len(used) == 1 else "mixed"
        self.regions: Dict[Any, RegionSpec] = _region_specs(self._readers)
        self.skipped: List[Tuple[int, str]] = []     # newer versions passed over, and why
        self._closed = False

    def __repr__(self):
        return (f"<CheckpointView {self.name} v{self.version} level={self.level} nranks={self.nranks} "
                f"regions={list(self.regions)}>")

    def _where(self, rank=None, region_id=None):
        out = f"{self.name} v{self.version}"
        if rank is not None:
            out += f" rank {rank} (level {self.rank_levels[rank]})"
        return out + (f" region {region_id!r}" if region_id is not None else "")

    def _info(self, region_id, rank):
        region_id = _plain_id(region_id)
        if self._closed:
            raise RestartError(f"{self._where()}: the view is closed")
        if rank not in self._readers:
            raise RestartError(f"{self._where()}: no rank {rank!r}; ranks held: {rank_ranges(self.ranks)}")
        reader = self._readers[rank]
        for info in reader.regions if reader is not None else ():
            if info.id == region_id and type(info.id) is type(region_id):
                return reader, info
        held = [i.id for i in reader.regions] if reader is not None else []
        raise RestartError(f"{self._where(rank)}: no region {region_id!r}; regions there: "
                           f"{', '.join(map(repr, held)) or 'none (routed files only)'}")

    def read(self, region_id, rank: int, allow_pickle: bool = False):
        """One rank's copy of a region: a read-only array (memory-mapped, no copy). A region
        protected with ``pickle=True`` is unpickled only with ``allow_pickle=True`` (only
        for checkpoints you trust); otherwise RestartError."""
        reader, info = self._info(region_id, rank)
        if info.kind == "pickle":
            if not allow_pickle:
                raise RestartError(f"{self._where(rank, region_id)} is a pickled Python object: pass "
                                   "allow_pickle=True to unpickle it (only for checkpoints you trust)")
            try:
                return pickle.loads(reader.raw(info))
            except Exception as exc:
                raise CorruptCheckpointError(f"{reader.path}: cannot unpickle region {region_id!r}: {exc}") from exc
        return reader.array(info)

    def read_bytes(self, region_id, rank: int) -> memoryview:
        """The stored bytes of one rank's region, as they are on disk (a pickled region's
        pickle bytes, never unpickled here)."""
        reader, info = self._info(region_id, rank)
        return reader.raw(info)

    def slabs(self, region_id) -> List[Tuple[int, Tuple[slice, ...], np.ndarray]]:
        """``[(rank, index in the global array, read-only slab)]`` of every rank holding a
        global region (memory-mapped, no copy), after checking that they tile the global
        shape exactly."""
        spec = self._spec(region_id)
        if not spec.is_global:
            raise RestartError(f"{self._where(region_id=region_id)} is not a global array (protected without "
                               "global_shape=/offset=); read it per rank with read(id, rank)")
        placed, first = [], self._info(region_id, spec.ranks[0])[1]
        for rank in spec.ranks:
            reader, info = self._info(region_id, rank)
            if (info.kind, tuple(info.global_shape), info.dtype) != ("array", spec.global_shape, first.dtype):
                raise CorruptCheckpointError(
                    f"{self._where(rank, region_id)}: holds a {info.dtype} slab of global shape "
                    f"{tuple(info.global_shape) or 'none'}, rank {spec.ranks[0]} a {first.dtype} slab of "
                    f"{spec.global_shape}: the ranks disagree")
            placed.append((rank, tuple(info.global_offset), tuple(info.shape), reader, info))
        absent = sorted(set(self.ranks) - set(spec.ranks))
        try:
            check_tiling(self._where(region_id=region_id), spec.global_shape, [p[:3] for p in placed])
        except CorruptCheckpointError as exc:
            if absent:
                raise CorruptCheckpointError(f"{exc} (ranks {rank_ranges(absent)} hold no such region)") from None
            raise
        return [(rank, tuple(slice(o, o + n) for o, n in zip(offset, shape)), reader.array(info))
                for rank, offset, shape, reader, info in placed]

    def _spec(self, region_id):
        region_id = _plain_id(region_id)
        if self._closed:
            raise RestartError(f"{self._where()}: the view is closed")
        for rid, spec in self.regions.items():
            if rid == region_id and type(rid) is type(region_id):
                return spec
        raise RestartError(f"{self._where()}: no region {region_id!r}; regions: "
                           f"{', '.join(map(repr, self.regions)) or 'none'}")

    def read_global(self, region_id) -> np.ndarray:
        """The whole global array of ``region_id`` stitched from every rank's slab (a new
        array), or, for a replicated region, the lowest holding rank's read-only copy.
        RestartError for a per-rank or pickled region; CorruptCheckpointError (naming
        the ranks and the global index) when the slabs leave a gap, overlap or disagree."""
        spec = self._spec(region_id)
        if spec.kind != "array":
            raise RestartError(f"{self._where(region_id=region_id)} is a pickled object, not an array: "
                               "read(id, rank, allow_pickle=True) reads one rank's copy")
        if spec.replicated:
            return self.read(region_id, spec.ranks[0])
        if not spec.is_global:
            raise RestartError(f"{self._where(region_id=region_id)} is a per-rank region (protected without "
                               "global_shape=/offset= or replicated=True): read it per rank with "
                               f"read(id, rank), ranks {rank_ranges(spec.ranks)}")
        out = np.empty(spec.global_shape, spec.dtype)
        for _rank, index, slab in self.slabs(region_id):
            out[index] = slab
        return out

    def close(self) -> None:
        """Release every rank's file and mapping; idempotent."""
        if self._closed:
            return
        self._closed = True
        for reader in self._readers.values():
            if reader is not None:
                reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def region_names(specs: List[RegionSpec]) -> Dict[Any, str]:
    """A distinct dataset name for each region id (``veloc export``): the id as text, an int
    id prefixed ``int.`` where a string id has the same text."""
    texts = {s.id for s in specs if isinstance(s.id, str)}
    return {s.id: (f"int.{s.id}" if isinstance(s.id, int) and str(s.id) in texts else str(s.id)) for s in specs}
