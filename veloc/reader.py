"""``veloc.open``: read a checkpoint version for analysis, in a plain process without MPI.

Called by a user's analysis script or notebook, or by ``veloc export``, on any machine
that sees the checkpoint's level trees; it never imports mpi4py, never writes and never
unpickles unless asked. The levels are found exactly as ``veloc ls`` finds them
(:func:`veloc.cli.levels.open_levels`): every virtual node's scratch folder on this
machine (``{node}`` in the scratch path), the partner copies those nodes hold for others,
their erasure trees, and the persistent level.

Which copy is read: a version is *complete* at a level when every rank ``0..nranks-1``
(``nranks`` from the manifests) has a committed manifest there. By default the newest
version that can be read whole is chosen, from the fastest level where every rank's copy
is intact; when no single level holds every rank intact (a lost node's scratch, a
corrupt file), each rank is read from its own fastest intact copy (``view.level`` is
then ``"mixed"``, ``view.rank_levels`` says which). With ``verify=True`` (the default)
every chosen file's content digest (where the checksum module recorded one) is checked
against its manifest on open, one xxh3 pass over the mapped file that the reads then
reuse; ``verify=False`` checks sizes and headers only. Erasure-coded
copies are not decoded here: a version held only as parity needs a rebuild by restarting
the job, and the error says so.
"""
import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

from veloc.cli.levels import ErasureLevel, Level, fields_of, open_levels, values_on_disk
from veloc.config import load_config, node_id
from veloc.storage.levels import LEVEL_ORDER
from veloc.errors import ConfigError, CorruptCheckpointError, RestartError
from veloc.names import check_name, check_node_id, check_version
from veloc.reader_formats import open_rank_copy
from veloc.reader_view import CheckpointView, rank_ranges

log = logging.getLogger("veloc.reader")


def open(cfg, name: str, version: Optional[int] = None, level: Optional[str] = None, *,
         verify: bool = True, nodes: Optional[Iterable[str]] = None) -> CheckpointView:
    """A read-only :class:`~veloc.reader_view.CheckpointView` of checkpoint ``name``.

    ``cfg``: the application's configuration (INI path, mapping or ``veloc.Config``).
    ``version``: that version (default: the newest one that can be read whole).
    ``level``: read only from ``scratch``, ``partner`` or ``persistent`` (default: the
    fastest intact copy). ``verify``: check content digests on open (default True).
    ``nodes``: node identities whose scratch to read (default: every node's scratch
    folder found on this machine, and this node's). Raises ConfigError for a bad
    configuration or level, RestartError naming what exists when nothing matches, and
    CorruptCheckpointError when the copies exist but none can be read intact.
    """
    config = load_config(cfg)
    name = check_name(name, error=RestartError)
    if version is not None:
        version = check_version(version, error=RestartError)
    if level is not None and level not in LEVEL_ORDER:
        raise ConfigError(f"veloc.open: unknown level {level!r}; accepted: {', '.join(LEVEL_ORDER)}")
    node_list = _nodes(config, nodes)
    levels = open_levels(config, node_list)
    where = "; ".join(f"{lvl.name} {lvl.template}" for lvl in levels)
    if level == "erasure":
        raise RestartError(f"veloc.open does not decode erasure-coded copies: restart the job with veloc to "
                           f"rebuild {name} from its parity, or read level scratch, partner or persistent")
    if level is not None and level not in [lvl.name for lvl in levels]:
        raise RestartError(f"{name}: no {level} level here (levels: {', '.join(lvl.name for lvl in levels)})")
    chosen = [lvl for lvl in levels if level is None or lvl.name in (level, "erasure")]
    rank_levels = [lvl for lvl in chosen if isinstance(lvl, Level)]
    erasure = [lvl for lvl in chosen if isinstance(lvl, ErasureLevel)]
    copies = {lvl.name: lvl.copies(name) for lvl in rank_levels}
    found = sorted({v for c in copies.values() for v in c} | {v for e in erasure for v in e.versions(name)},
                   reverse=True)
    scope = f"at level {level}" if level else "at any level"
    if not found:
        raise RestartError(f"no checkpoint named {name!r} {scope} ({where}; nodes {', '.join(node_list)})")
    if version is not None and version not in found:
        raise RestartError(f"no copy of {name} v{version} {scope}; versions found: {', '.join(map(str, found))}")
    failures = []
    for candidate in [version] if version is not None else found:
        try:
            view = _open_version(name, candidate, rank_levels, copies, erasure, verify)
            view.skipped = [(v, str(exc)) for v, exc in zip(found, failures)]
            return view
        except RestartError as exc:
            if version is not None:
                raise
            log.info("veloc.open: skipping %s v%d: %s", name, candidate, exc)
            failures.append(exc)
    corrupt = any(isinstance(e, CorruptCheckpointError) for e in failures)
    error = CorruptCheckpointError if corrupt else RestartError
    raise error(f"no version of {name} can be read whole {scope}: " + " | ".join(map(str, failures)))


def _nodes(config, nodes):
    if isinstance(nodes, str):
        nodes = [nodes]
    if nodes is not None:
        return sorted({check_node_id(n) for n in nodes})
    here = {node_id()}
    if "node" not in fields_of(config.scratch):
        return sorted(here)
    for value in values_on_disk(config.scratch, "node"):
        try:
            here.add(check_node_id(value))
        except ConfigError:
            continue    # a folder that is no node's
    return sorted(here)


class _Copies:
    """The copies of one version: opens each at most once and remembers why one failed."""

    def __init__(self, name, version, levels, copies, verify):
        self.name, self.version, self.verify = name, version, verify
        self.by_level = {lvl.name: {} for lvl in levels}
        for lvl in levels:
            for rank, store in copies[lvl.name].get(version, []):
                self.by_level[lvl.name].setdefault(rank, []).append(store)
        self.manifests, self.opened, self.reasons, self.failed = {}, {}, {}, set()
        self.nranks = 0
        for lvl, ranks in self.by_level.items():
            for rank, stores in ranks.items():
                for store in stores:
                    manifest = self._manifest(lvl, rank, store)
                    if manifest is not None:
                        self.nranks = max(self.nranks, int(manifest.nranks))

    def _manifest(self, lvl, rank, store):
        key = (lvl, rank, str(store.root))
        if key not in self.manifests:
            try:
                manifest = store.read_manifest(self.name, self.version, rank)
                if manifest is None:
                    raise RestartError(f"{store.manifest_path(self.name, self.version, rank)}: removed meanwhile")
                int(manifest.nranks)
            except (RestartError, TypeError, ValueError) as exc:
                self.reasons.setdefault((lvl, rank), []).append(str(exc))
                manifest = None
            self.manifests[key] = manifest
        return self.manifests[key]

    def expected(self):
        """Ranks ``0..nranks-1``; for processes of ``init_single`` (each records ``nranks = 1``
        under its own unique id) the ids found."""
        present = {r for ranks in self.by_level.values() for r in ranks}
        if present and max(present) >= self.nranks:
            return sorted(present)
        return list(range(self.nranks))

    def open(self, lvl, rank):
        """An open, verified reader of ``rank`` at level ``lvl`` (``(True, reader)``), or
        ``(False, None)`` with the reason recorded."""
        for store in self.by_level[lvl].get(rank, []):
            key = (lvl, rank, str(store.root))
            if key in self.opened:
                return True, self.opened[key]
            manifest = self._manifest(lvl, rank, store)
            if manifest is None or key in self.failed:
                continue
            self.failed.add(key)
            if int(manifest.nranks) != self.nranks and rank < self.nranks:
                self.reasons.setdefault((lvl, rank), []).append(
                    f"{store.root}: written by a job of {manifest.nranks} ranks, other copies by {self.nranks}")
                continue
            try:
                self.opened[key] = open_rank_copy(manifest, store.version_dir(self.name, self.version), self.verify)
            except RestartError as exc:
                self.reasons.setdefault((lvl, rank), []).append(str(exc))
                continue
            self.failed.discard(key)
            return True, self.opened[key]
        return False, None

    def close_except(self, keep):
        for reader in self.opened.values():
            if reader is not None and all(reader is not k for k in keep):
                reader.close()


def _open_version(name, version, levels, copies, erasure, verify):
    """The view of one version, or RestartError/CorruptCheckpointError saying which ranks
    have no intact copy and why (erasure-only ranks named as needing a rebuild)."""
    state = _Copies(name, version, levels, copies, verify)
    expected = state.expected()
    readers: Dict[int, Any] = {}
    rank_levels: Dict[int, str] = {}
    nowhere = [r for r in expected if not any(r in ranks for ranks in state.by_level.values())]
    if nowhere or not expected:
        raise _no_copy(state, erasure, nowhere)      # before hashing anything
    try:
        for lvl in levels:       # the fastest level where every rank is intact
            if expected and all(r in state.by_level[lvl.name] for r in expected):
                opened = [state.open(lvl.name, r) for r in expected]
                if all(ok for ok, _ in opened):
                    readers = {r: reader for r, (_, reader) in zip(expected, opened)}
                    rank_levels = {r: lvl.name for r in expected}
                    break
        if not readers:          # each rank from its own fastest intact copy
            for rank in expected:
                for lvl in levels:
                    ok, reader = state.open(lvl.name, rank)
                    if ok:
                        readers[rank], rank_levels[rank] = reader, lvl.name
                        break
        lacking = [r for r in expected if r not in readers]
        if not expected or lacking:
            raise _no_copy(state, erasure, lacking)
    except BaseException:
        state.close_except([])
        raise
    state.close_except(list(readers.values()))
    return CheckpointView(name, version, state.nranks or len(expected), readers, rank_levels, verify)


def _no_copy(state, erasure, lacking):
    where = f"{state.name} v{state.version}"
    if not lacking:
        return RestartError(f"{where}: no readable manifest ({'; '.join(sum(state.reasons.values(), [])) or '-'})")
    parity = set()
    for lvl in erasure:
        try:
            parity.update(lvl.state(state.name, state.version).ranks)
        except (KeyError, TypeError, ValueError):
            continue
    parts: List[str] = []
    corrupt = False
    for rank in lacking:
        why: List[Tuple[str, str]] = [(lvl, r) for (lvl, rk), rs in state.reasons.items() if rk == rank for r in rs]
        corrupt |= bool(why)
        text = "; ".join(f"{lvl}: {r}" for lvl, r in why) or "no copy at any level read"
        if rank in parity:
            text += ("; held only as erasure-coded parity, which veloc.open does not decode: restart the job "
                     "with veloc to rebuild it, or read another version")
        parts.append(f"rank {rank}: {text}")
    held = {lvl: rank_ranges(ranks) for lvl, ranks in state.by_level.items() if ranks}
    summary = ", ".join(f"{lvl} ranks {r}" for lvl, r in held.items()) or "no rank copies"
    error = CorruptCheckpointError if corrupt else RestartError
    return error(f"{where} ({state.nranks} ranks): ranks {rank_ranges(lacking)} have no intact copy "
                 f"(copies found: {summary}): " + " | ".join(parts))
