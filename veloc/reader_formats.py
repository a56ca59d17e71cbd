"""The per-format seam of the read API (``veloc.open``): one reader per stored rank copy.

Called only by :mod:`veloc.reader` in a plain analysis process (no MPI). A rank's copy
of a version at a level is described by its manifest; the manifest's file entries say
which format holds the regions (``FileEntry.kind``). :func:`open_rank_copy` picks the
reader registered for that kind (for ``regions``, the engine's own formats, told apart by
file suffix: a ``.vck`` rank file or an HDF5 ``r<rank>.h5``, whose version counts only
once its ``global.h5`` exists) after checking the file's size and, when asked, its
content digest against the manifest (hashed in one pass before anything is parsed); the
reader validates the file's header on open. A reader it returns is verified and open.

A reader answers the :class:`RankReader` calls: ``regions`` (the file header's
:class:`~veloc.storage.rankfile.RegionInfo` list), ``array(info)`` (a read-only array,
memory-mapped where the format allows: a ``.vck`` file is mapped without pre-faulting,
so reading one region of a large copy reads only that region), ``raw(info)`` (a region's
stored bytes) and ``close()``. A new persistent format plugs in with
:func:`register_reader` (its manifest file kind and a factory taking the file's path).
Copies no reader can decode (compressed sidecar files, for example) raise
:class:`UnreadableCopy` with a message saying what they are, so the caller can take the
same version from another level instead.
"""
import mmap
import os
from typing import Callable, Dict, List, Optional, Protocol

import numpy as np

from veloc.storage.formats import open_rank_file, version_complete
from veloc.storage.hashing import digest_file
from veloc.storage.rankfile import RankFile, RegionInfo
from veloc.errors import ConfigError, CorruptCheckpointError, RestartError


class UnreadableCopy(RestartError):
    """A committed copy exists but is stored in a form this reader cannot decode."""


class RankReader(Protocol):
    """What :mod:`veloc.reader` needs from one rank's open, verified copy."""
    path: object
    regions: List[RegionInfo]

    def array(self, info: RegionInfo) -> np.ndarray: ...

    def raw(self, info: RegionInfo) -> memoryview: ...

    def close(self) -> None: ...


def _lazy_mapping(path):
    """A read-only mapping of the whole file without pre-faulting its pages (``RankFile``
    maps them all on open, which pays off when every byte is hashed or restored); ``None``
    for an empty file, which the rank file's own checks then refuse."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) if size else None
    finally:
        os.close(fd)


def _refuse_object_dtypes(reader, path):
    """Close ``reader`` and raise if a header declares a Python-object dtype."""
    for info in reader.regions:
        if info.kind == "array" and info.numpy_dtype().hasobject:
            reader.close()
            raise CorruptCheckpointError(f"{path}: region {info.id!r} declares a Python-object dtype "
                                         f"{info.dtype!r}; refused (arrays are never unpickled)")


class RankFileReader:
    """A rank file of the engine's formats (``veloc.storage.formats.open_rank_file``: a
    ``.vck`` file, or an ``r<rank>.h5`` of the HDF5 persistent format): arrays are
    read-only views of one shared read-only mapping of the file. A ``.vck`` file is mapped
    without pre-faulting, so reading one region of a large copy reads only that region."""

    def __init__(self, path):
        self.path = path
        self._mapping = _lazy_mapping(path) if path.suffix == ".vck" else None
        try:
            self._file = RankFile(path, mapped=self._mapping) if self._mapping is not None else open_rank_file(path)
        except BaseException:
            self._close_mapping()
            raise
        self.regions = self._file.regions
        _refuse_object_dtypes(self, path)

    def array(self, info):
        return self._file.as_array(info)

    def raw(self, info):
        return memoryview(self._file.bytes_view(info))

    def close(self):
        self._file.close()
        self._close_mapping()

    def _close_mapping(self):
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:      # a caller still holds an array; the mapping goes with it
                pass
            self._mapping = None


class CompressedCopyReader:
    """A compressed copy (``r<rank>.vcz``, the ``[compress]`` module's persistent form):
    each array is decoded into a new array when read (block checksums checked first)."""

    def __init__(self, path):
        from veloc.storage.compressed_file import CompressedReader
        self.path = path
        self._file = CompressedReader(path)
        self.regions = self._file.regions
        _refuse_object_dtypes(self, path)

    def array(self, info):
        out = self._file.as_array(info)
        out.flags.writeable = False
        return out

    def raw(self, info):
        return self._file.load_bytes(info)

    def close(self):
        self._file.close()


READERS: Dict[str, Callable[..., RankReader]] = {"regions": RankFileReader, "compressed": CompressedCopyReader}
COMPRESSED_SUFFIXES = (".vcz",)


def register_reader(kind: str, factory: Callable[..., RankReader]) -> None:
    """Let :func:`open_rank_copy` read manifest file entries of ``kind`` with
    ``factory(path)`` (the file's digest is checked before, when asked)."""
    READERS[kind] = factory


def _where(manifest):
    return f"{manifest.name} v{manifest.version} rank {manifest.rank} at level {manifest.level}"


def regions_entry(manifest):
    """The manifest entry holding the rank's memory regions (``None`` for a rank that
    checkpointed only routed files); raises :class:`UnreadableCopy` for a form no
    registered reader decodes (a compressed copy is named as such)."""
    entries = [f for f in manifest.files if f.kind != "routed"]
    if not entries:
        return None
    entry = entries[0]
    if entry.kind in READERS and (entry.kind != "regions" or not entry.name.endswith(COMPRESSED_SUFFIXES)):
        return entry
    if entry.name.endswith(COMPRESSED_SUFFIXES) or "compress" in entry.kind:
        raise UnreadableCopy(f"compressed copy: {entry.name} ({_where(manifest)}) is stored compressed "
                             "([compress] module) and veloc.open has no decoder for it; read the version "
                             "from another level (level=...), or restart the job, which restores it")
    raise UnreadableCopy(f"{entry.name} ({_where(manifest)}) is stored as {entry.kind!r}, a format "
                         f"veloc.open cannot read (readable: {', '.join(sorted(READERS))}); "
                         "read another level (level=...)")


def open_rank_copy(manifest, directory, verify=True) -> Optional[RankReader]:
    """An open reader of ``manifest``'s regions file in ``directory`` (``None`` if the rank
    has no memory regions): size checked against the manifest, header validated, and with
    ``verify`` the content digest too. Raises CorruptCheckpointError or UnreadableCopy."""
    entry = regions_entry(manifest)
    if entry is None:
        return None
    path = directory / entry.name
    if not version_complete(directory, manifest.rank):
        raise UnreadableCopy(f"{path}: its version is not complete at this level yet ({_where(manifest)}: "
                             "HDF5 copies count once the version's global.h5 is committed)")
    try:
        size = path.stat().st_size
    except OSError:
        raise CorruptCheckpointError(f"{path}: missing ({_where(manifest)})") from None
    if size != int(entry.size):
        raise CorruptCheckpointError(f"{path}: size {size} != {entry.size} recorded in the manifest "
                                     f"(truncated or overwritten; {_where(manifest)})")
    if verify and manifest.checksum and entry.digest:
        try:
            actual = digest_file(path, manifest.checksum)
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: unreadable ({exc.strerror}; {_where(manifest)})") from None
        if actual != entry.digest:
            raise CorruptCheckpointError(f"{path}: {manifest.checksum} checksum mismatch ({_where(manifest)})")
    try:
        reader = READERS[entry.kind](path)
    except ConfigError as exc:          # e.g. an HDF5 copy where h5py is not installed
        raise UnreadableCopy(f"{path} ({_where(manifest)}): {exc}") from None
    except OSError as exc:              # removed or replaced since its size was checked
        raise CorruptCheckpointError(f"{path}: unreadable ({exc.strerror}; {_where(manifest)})") from None
    return reader
