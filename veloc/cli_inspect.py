"""Read-only inspection behind the ``veloc`` command-line tool (see ``veloc.cli``).

Run by a user on any node, outside the application and its engine. It reads level
trees, manifests and rank files; it never modifies a checkpoint and never unpickles
anything. ``{node}``/``{rank}`` placeholders in level paths are filled in for the nodes
the user names and for the ranks found on disk (or named with ``--ranks``).
"""
import glob
import os
import re
import secrets
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine.levels import LevelStore
from .engine.modules.scratch import verify_copy
from .engine.rankfile import RankFile
from .errors import CorruptCheckpointError


class UsageError(Exception):
    """A problem with what the user asked for (exit status 2)."""


def fields_of(template):
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


class _Wild:
    """Formats as a NUL marker whatever the format spec (``{rank:04d}`` included)."""

    def __format__(self, spec):
        return "\0"


def ranks_on_disk(template, node):
    """Ranks whose directory exists for a level path containing ``{rank}``."""
    parts = template.format(node=node, rank=_Wild()).split("\0")
    pattern = "*".join(glob.escape(p) for p in parts)
    regex = re.escape(parts[0]) + "".join(
        ("(?P<r>[0-9]+)" if i == 0 else "(?P=r)") + re.escape(p) for i, p in enumerate(parts[1:]))
    found = set()
    for path in glob.glob(pattern):
        m = re.fullmatch(regex, path)
        if m and os.path.isdir(path):
            found.add(int(m.group("r")))
    return found


@dataclass
class Level:
    """One configured level seen from the chosen nodes: ``stores`` are (rank filter, store)."""
    name: str
    template: str
    stores: list = field(default_factory=list)

    def add(self, store, rank=None):
        if all(s.root != store.root or r != rank for r, s in self.stores):
            self.stores.append((rank, store))

    def checkpoint_names(self):
        return sorted({n for _, store in self.stores for n in store.names()})

    def copies(self, name):
        """``{version: [(rank, store), ...]}`` of committed manifests of ``name``."""
        out = {}
        for only, store in self.stores:
            for version, ranks in store.versions(name).items():
                out.setdefault(version, []).extend((r, store) for r in ranks if only is None or r == only)
        return {v: sorted(c, key=lambda rc: rc[0]) for v, c in out.items() if c}


def open_levels(config, nodes, ranks=None):
    """The configured levels (fastest first) for ``nodes``; ``{rank}`` paths use ``ranks``
    if given, else every rank found on disk or in the other levels' manifests."""
    templates = [("scratch", config.scratch)]
    if config.persistent is not None:
        templates.append(("persistent", config.persistent))
    levels = [Level(level, template) for level, template in templates]
    for lvl in levels:
        if "rank" not in fields_of(lvl.template):
            for node in nodes:
                lvl.add(LevelStore(lvl.name, lvl.template.format(node=node, rank=0)))
    if ranks is None:
        ranks = set()
        for lvl in levels:
            if "rank" in fields_of(lvl.template):
                ranks.update(r for node in nodes for r in ranks_on_disk(lvl.template, node))
            else:
                ranks.update(r for name in lvl.checkpoint_names() for copies in lvl.copies(name).values()
                             for r, _ in copies)
    for lvl in levels:
        if "rank" in fields_of(lvl.template):
            for node in nodes:
                for rank in sorted(ranks):
                    lvl.add(LevelStore(lvl.name, lvl.template.format(node=node, rank=rank)), rank)
    return levels


@dataclass
class VersionState:
    """What ``veloc ls`` reports for one version of one checkpoint at one level."""
    name: str
    level: str
    version: int
    ranks: list
    nranks: int
    missing: list
    size: int
    state: str
    problems: list


def expected_missing(present, nranks):
    """Ranks ``0..nranks-1`` absent from ``present``; none when a rank is ``>= nranks``
    (processes of ``init_single`` each record ``nranks = 1`` and stand on their own)."""
    if present and max(present) >= nranks:
        return []
    return sorted(set(range(nranks)) - set(present))


def version_state(level, name, version, copies):
    present, nranks, size, unchecked, problems = set(), 0, 0, False, []
    for rank, store in copies:
        if rank in present:
            continue
        try:
            manifest = store.read_manifest(name, version, rank)
            if manifest is None:       # removed meanwhile (garbage collection)
                continue
            ranks_recorded, nbytes = int(manifest.nranks), sum(int(f.size) for f in manifest.files)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            continue
        except (TypeError, ValueError) as exc:
            problems.append(f"{store.manifest_path(name, version, rank)}: malformed manifest ({exc})")
            continue
        present.add(rank)
        nranks, size = max(nranks, ranks_recorded), size + nbytes
        unchecked |= not manifest.checksum or any(f.digest is None for f in manifest.files)
    missing = expected_missing(present, nranks)
    state = ("partial" if missing or problems or not present
             else "unchecksummed" if unchecked else "complete")
    return VersionState(name, level, version, sorted(present), nranks, missing, size, state, problems)


def checkpoint_states(levels, name):
    """:class:`VersionState` of every version of ``name`` at every level, newest first."""
    out = []
    for lvl in levels:
        for version, copies in sorted(lvl.copies(name).items(), reverse=True):
            out.append(version_state(lvl.name, name, version, copies))
    return sorted(out, key=lambda s: -s.version)


def verify_version(levels, name, version):
    """Yield ``(status, level, rank, detail)`` for every copy of ``name``/``version``.

    ``status`` is ``OK``, ``FAIL`` (the copy exists but is corrupt) or ``MISSING`` (a rank
    the manifests expect has no copy at that level).
    """
    for lvl in levels:
        copies = lvl.copies(name).get(version, [])
        if not copies:
            continue
        for rank, store in copies:
            reason = verify_copy(store, name, version, rank)
            if reason is not None:
                yield "FAIL", lvl.name, rank, reason
                continue
            try:
                manifest = store.read_manifest(name, version, rank)
            except CorruptCheckpointError as exc:   # replaced meanwhile
                yield "FAIL", lvl.name, rank, str(exc)
                continue
            how = (f"{manifest.checksum} digests match" if manifest.checksum
                   else "no checksum recorded: sizes and headers only")
            yield "OK", lvl.name, rank, f"{store.version_dir(name, version)} ({how})"
        for rank in version_state(lvl.name, name, version, copies).missing:
            yield "MISSING", lvl.name, rank, f"no copy at this level among {len(copies)} found"


# -- rank files ------------------------------------------------------------------------
def open_rankfile(path):
    """A :class:`RankFile`; refuses anything but a regular file (a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: {'is a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}; "
                         "give a rank file (r<rank>.vck)")
    return RankFile(path)


def region_dtype(path, info):
    try:
        dtype = info.numpy_dtype()
    except Exception:
        raise CorruptCheckpointError(f"{path}: region {info.id!r} has an unreadable dtype {info.dtype!r}") from None
    if dtype.hasobject:
        raise CorruptCheckpointError(f"{path}: region {info.id!r} declares a Python-object dtype; refused")
    return dtype


def human_dtype(dtype):
    """``float64``, ``{x: float32, n: int64}``, ``float64[3]``, ``S16``, ``int32 (big-endian)``."""
    if dtype.fields is not None:
        return "{" + ", ".join(f"{n}: {human_dtype(dtype.fields[n][0])}" for n in dtype.names) + "}"
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return f"{human_dtype(base)}[{','.join(map(str, shape))}]"
    text = dtype.str[1:] if dtype.kind in "SUV" else dtype.name
    if not dtype.isnative:
        text += " (big-endian)" if dtype.byteorder == ">" else " (little-endian)"
    return text


def describe_rankfile(path):
    """The header of a rank file as a JSON-ready dict (a bad dtype is shown, not refused)."""
    with open_rankfile(path) as rf:
        regions = []
        for r in rf.regions:
            try:
                human = "pickle" if r.kind == "pickle" else human_dtype(r.numpy_dtype())
            except Exception:
                human = f"unreadable {r.dtype!r}"
            regions.append({"id": r.id, "kind": r.kind, "dtype": human, "descr": r.dtype,
                            "shape": list(r.shape), "order": r.order, "nbytes": r.nbytes, "offset": r.offset})
        meta = rf.meta
        return {"file": str(path), "size": rf.size, "format": meta.get("format"), "name": meta.get("name"),
                "version": meta.get("version"), "rank": meta.get("rank"), "regions": regions}


def parse_region_id(text):
    """An int if ``text`` is all ASCII digits, else the string itself."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else text


def _write_private(out, write):
    """Create ``out`` with mode 0600 atomically (temporary name, then rename)."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; give the output file name")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def extract_region(path, region_id, out, allow_pickle=False):
    """Write region ``region_id`` of rank file ``path`` to ``out``; return its header dict.

    An int ``region_id`` with no such region falls back to the name made of its digits.

    Arrays go to ``.npy`` (``np.save`` of the stored view: dtype, shape and order kept);
    pickled objects only with ``allow_pickle``, as their raw bytes, never unpickled.
    """
    with open_rankfile(path) as rf:
        info = rf.region(region_id)
        if info is None and isinstance(region_id, int):     # a name made of digits, e.g. "12"
            info = rf.region(str(region_id))
        if info is None:
            ids = ", ".join(repr(r.id) for r in rf.regions) or "none"
            raise UsageError(f"{path}: no region {region_id!r}; regions in this file: {ids}")
        if info.kind == "pickle":
            if not allow_pickle:
                raise UsageError(f"{path}: region {region_id!r} is a pickled Python object; pass "
                                 "--allow-pickle to write its raw pickle bytes (the tool never unpickles)")
            view = rf.bytes_view(info)
            try:
                _write_private(out, lambda f: f.write(view))
            finally:
                del view
            return {"id": info.id, "kind": "pickle", "nbytes": info.nbytes}
        if info.kind != "array":
            raise CorruptCheckpointError(f"{path}: region {region_id!r} has unknown kind {info.kind!r}")
        dtype = region_dtype(path, info)
        if int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize != info.nbytes:
            raise CorruptCheckpointError(f"{path}: region {region_id!r} holds {info.nbytes} bytes, not "
                                         f"{dtype} {tuple(info.shape)}: the header is corrupt")
        arr = rf.as_array(info)
        try:
            _write_private(out, lambda f: np.save(f, arr, allow_pickle=False))
        finally:
            del arr
        return {"id": info.id, "kind": "array", "dtype": human_dtype(dtype), "shape": list(info.shape),
                "order": info.order, "nbytes": info.nbytes}
