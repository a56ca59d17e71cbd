"""Every level of a configuration as the ``veloc ls``/``verify`` tool sees it (see ``veloc.cli.commands``).

Run by a user on any node, outside the application and its engine; it only reads.
Levels, fastest first:

- ``scratch``: ``<scratch>/<name>/v<version>/r<rank>.*`` of the chosen nodes;
- ``partner``: copies this node holds for others, ``<node scratch>/.partner/<owner>/...``;
- ``erasure``: group records and parity blocks, ``<node scratch>/.erasure/<name>/v<version>/``;
- ``persistent``: the same layout as scratch under ``persistent``.

``{node}``/``{rank}`` placeholders are filled in for the nodes the user names (or, with
``--all-nodes``, every node whose scratch folder exists on this machine) and for the
ranks found on disk or in the other levels' manifests (or named with ``--ranks``).
``ls`` checks every file's size against its manifest; ``verify`` also checks content
digests, of rank files and of parity blocks.
"""
import glob
import os
import re
import string
from dataclasses import dataclass, field

from veloc.storage.formats import version_complete
from veloc.storage.levels import LevelStore
from veloc.engine.modules.scratch import verify_copy
from veloc.redundancy.striping import DIGEST, GroupStore, ranks_of
from veloc.redundancy.topology import held_parity
from veloc.storage.hashing import digest_file
from veloc.errors import ConfigError, CorruptCheckpointError
from veloc.names import check_node_id


class UsageError(Exception):
    """A problem with what the user asked for (exit status 2)."""


def fields_of(template):
    """Placeholder names used in a path template."""
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


class _Wild:
    """Formats as a marker character whatever the format spec (``{rank:04d}`` included)."""

    def __init__(self, mark):
        self.mark = mark

    def __format__(self, spec):
        return self.mark


_MARKS = {"node": "\0", "rank": "\1"}


def values_on_disk(template, field_name, **fixed):
    """Values of placeholder ``field_name`` for which the path exists as a directory; the
    other placeholders take ``fixed`` values or match anything."""
    values = {k: fixed[k] if k in fixed else _Wild(m) for k, m in _MARKS.items()}
    pattern, regex, seen = "", "", False
    for part in re.split("([\0\1])", template.format(**values)):
        if part in _MARKS.values():
            pattern += "*"
            if part == _MARKS[field_name]:
                regex += "(?P=v)" if seen else "(?P<v>[^/]+)"
                seen = True
            else:
                regex += "[^/]+"
        else:
            pattern, regex = pattern + glob.escape(part), regex + re.escape(part)
    found = set()
    for path in glob.glob(pattern) if seen else ():
        match = re.fullmatch(regex, path)
        if match and os.path.isdir(path):
            found.add(match.group("v"))
    return found


def ranks_on_disk(template, node):
    """Ranks whose directory exists for a level path containing ``{rank}``."""
    return {int(v) for v in values_on_disk(template, "rank", node=node) if v.isdigit()}


def nodes_on_disk(config):
    """Every node whose scratch folder exists on this machine (``--all-nodes``)."""
    if "node" not in fields_of(config.scratch):
        raise UsageError(f"--all-nodes needs {{node}} in the scratch path; {config.scratch!r} has none "
                         "(give --node N instead)")
    nodes = []
    for value in sorted(values_on_disk(config.scratch, "node")):
        try:
            nodes.append(check_node_id(value))
        except ConfigError:
            continue      # not a node's folder
    if not nodes:
        raise UsageError(f"--all-nodes: no node's scratch folder matches {config.scratch!r} on this machine")
    return nodes


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
    state: str        # complete, unchecksummed, truncated or partial
    problems: list
    compressed: list = field(default_factory=list)    # ranks whose copy is a compressed file


HOLDING = ("complete", "unchecksummed")


def expected_missing(present, nranks):
    """Ranks ``0..nranks-1`` absent from ``present``; none when a rank is ``>= nranks``
    (processes of ``init_single`` each record ``nranks = 1`` and stand on their own)."""
    if present and max(present) >= nranks:
        return []
    return sorted(set(range(nranks)) - set(present))


def _sizes_problems(directory, entries):
    """``(truncated, problems)`` of files listed as ``(name, size)`` in ``directory``."""
    truncated, problems = False, []
    for name, size in entries:
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if actual != size:
            truncated = True
            problems.append(f"{path}: size {actual} != {size} recorded (truncated or overwritten)")
    return truncated, problems


def _state(present, nranks, problems, truncated, unchecked):
    missing = expected_missing(present, nranks)
    state = ("truncated" if truncated else "partial" if missing or problems or not present
             else "unchecksummed" if unchecked else "complete")
    return missing, state


@dataclass
class Level:
    """A level of rank copies (scratch, partner, persistent): ``stores`` are
    ``(rank filter or None, LevelStore)`` pairs, one per root seen from the chosen nodes."""
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

    def versions(self, name):
        return set(self.copies(name))

    def states(self, name):
        return [self.state(name, version, copies) for version, copies in self.copies(name).items()]

    def state(self, name, version, copies):
        present, nranks, size, unchecked, truncated, problems = set(), 0, 0, False, False, []
        compressed = []
        for rank, store in copies:
            if rank in present:
                continue
            try:
                manifest = store.read_manifest(name, version, rank)
                if manifest is None:       # removed meanwhile (garbage collection)
                    continue
                recorded, nbytes = int(manifest.nranks), sum(int(f.size) for f in manifest.files)
                entries = [(f.name, int(f.size)) for f in manifest.files]
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                continue
            except (TypeError, ValueError) as exc:
                problems.append(f"{store.manifest_path(name, version, rank)}: malformed manifest ({exc})")
                continue
            short, bad = _sizes_problems(store.version_dir(name, version), entries)
            truncated, problems = truncated or short, problems + bad
            if not version_complete(store.version_dir(name, version), rank):
                problems.append(f"{store.version_dir(name, version)}: HDF5 copy of rank {rank} but no global.h5: "
                                "the version is not complete at this level")
            present.add(rank)
            if manifest.file("compressed") is not None:
                compressed.append(rank)
            nranks, size = max(nranks, recorded), size + nbytes
            unchecked |= not manifest.checksum or any(f.digest is None for f in manifest.files)
        missing, state = _state(present, nranks, problems, truncated, unchecked)
        return VersionState(name, self.name, version, sorted(present), nranks, missing, size, state, problems,
                            sorted(compressed))

    def verify(self, name, version):
        """Yield ``(status, level, who, detail)`` for every copy of ``name``/``version`` here."""
        copies = self.copies(name).get(version, [])
        if not copies:
            return
        for rank, store in copies:
            reason = verify_copy(store, name, version, rank)
            if reason is None and not version_complete(store.version_dir(name, version), rank):
                yield "MISSING", self.name, f"rank {rank}", (f"{store.version_dir(name, version)}: HDF5 copy intact, "
                                                             "but no global.h5: the version is incomplete here")
                continue
            if reason is not None:
                yield "FAIL", self.name, f"rank {rank}", reason
                continue
            try:
                manifest = store.read_manifest(name, version, rank)
            except CorruptCheckpointError as exc:   # replaced meanwhile
                yield "FAIL", self.name, f"rank {rank}", str(exc)
                continue
            how = (f"{manifest.checksum} digests match" if manifest.checksum
                   else "no checksum recorded: sizes and headers only")
            if manifest.file("compressed") is not None:
                how += "; compressed copy, digest of the stored bytes"
            yield "OK", self.name, f"rank {rank}", f"{store.version_dir(name, version)} ({how})"
        for rank in self.state(name, version, copies).missing:
            yield "MISSING", self.name, f"rank {rank}", f"no copy at this level among {len(copies)} found"


@dataclass
class ErasureLevel:
    """The erasure level seen from the chosen nodes: ``stores`` are ``(node, GroupStore)``.

    A version is held for the ranks of every group record found; its size is the parity
    the chosen nodes hold. Each node's parity blocks are checked against the record."""
    name: str
    template: str
    stores: list = field(default_factory=list)

    def checkpoint_names(self):
        out = set()
        for _, store in self.stores:
            try:
                out.update(p.name for p in store.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
        return sorted(out)

    def versions(self, name):
        return {v for _, store in self.stores for v in store.versions(name)}

    def _records(self, name, version):
        """``[(node, store, record or None, problem or None)]`` for the chosen nodes holding one."""
        out = []
        for node, store in self.stores:
            if version not in store.versions(name):
                continue
            try:
                out.append((node, store, store.read_record(name, version), None))
            except CorruptCheckpointError as exc:
                out.append((node, store, None, str(exc)))
        return out

    def _blocks(self, store, record, node):
        """``[((stripe, j), path)]`` of the parity blocks ``node`` holds for ``record``."""
        members = [e["node"] for e in record["members"]]
        if node not in members:
            return []
        return [((s, j), store.parity_path(record["name"], record["version"], s, j))
                for s, j in held_parity(members.index(node), len(members), record["m"])]

    def states(self, name):
        return [self.state(name, version) for version in sorted(self.versions(name))]

    def state(self, name, version):
        present, nranks, size, truncated, problems = set(), 0, 0, False, []
        for node, store, record, problem in self._records(name, version):
            if record is None:
                problems.append(problem)
                continue
            try:
                for member in record["members"]:
                    present.update(ranks_of(record, member["node"]))
                    nranks = max([nranks] + [int(m["nranks"]) for m in member["manifests"]])
                blocks = self._blocks(store, record, node)
                entries = [(path.name, int(record["parity_len"])) for _, path in blocks]
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"{store.version_dir(name, version)}: malformed group record ({exc!r})")
                continue
            short, bad = _sizes_problems(store.version_dir(name, version), entries)
            truncated, problems = truncated or short, problems + bad
            size += sum(s for _, s in entries)
        missing, state = _state(present, nranks, problems, truncated, False)
        return VersionState(name, self.name, version, sorted(present), nranks, missing, size, state, problems)

    def verify(self, name, version):
        """Yield ``(status, "erasure", "node N", detail)``: each chosen node's parity blocks
        against the sizes and digests its group record lists."""
        for node, store, record, problem in self._records(name, version):
            who = f"node {node}"
            if record is None:
                yield "FAIL", self.name, who, problem
                continue
            group = [e["node"] for e in record["members"]]
            blocks = self._blocks(store, record, node)
            if not blocks:
                yield "FAIL", self.name, who, f"{store.version_dir(name, version)}: its group record {group} " \
                                              f"does not list node {node}"
            for (s, j), path in blocks:
                try:
                    size = path.stat().st_size
                except OSError:
                    yield "MISSING", self.name, who, f"{path}: parity block {s}.{j} of group {group} missing"
                    continue
                if size != record["parity_len"]:
                    yield "FAIL", self.name, who, (f"{path}: size {size} != {record['parity_len']} recorded "
                                                   "(truncated or overwritten)")
                elif digest_file(path, DIGEST) != record["parity"][s][j]:
                    yield "FAIL", self.name, who, f"{path}: {DIGEST} checksum mismatch (parity block {s}.{j})"
                else:
                    yield "OK", self.name, who, (f"{path} (parity block {s}.{j} of {record['scheme']} group "
                                                 f"{group}, {DIGEST} digest matches)")


def _tree_exists(roots):
    return any(os.path.isdir(r) for r in roots)


def open_levels(config, nodes, ranks=None):
    """The levels of ``config`` (fastest first) for ``nodes``; ``{rank}`` paths use ``ranks``
    if given, else every rank found on disk or in the other levels' manifests. Partner and
    erasure appear when their section enables them or their tree exists on a chosen node."""
    scratch, persistent = Level("scratch", config.scratch), None
    levels = [scratch]
    partner_roots = [config.node_scratch(n) / ".partner" for n in nodes]
    if config.section("partner").get("enabled") or _tree_exists(partner_roots):
        partner = Level("partner", str(config.node_scratch("{node}") / ".partner" / "<owner>"))
        for root in partner_roots:
            for owner in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
                partner.add(LevelStore("partner", owner))
        levels.append(partner)
    erasure_roots = [(n, config.node_scratch(n) / ".erasure") for n in nodes]
    if config.section("erasure").get("enabled") or _tree_exists(r for _, r in erasure_roots):
        erasure = ErasureLevel("erasure", str(config.node_scratch("{node}") / ".erasure"),
                               [(n, GroupStore(r)) for n, r in erasure_roots])
        levels.append(erasure)
    if config.persistent is not None:
        persistent = Level("persistent", config.persistent)
        levels.append(persistent)
    plain = [lvl for lvl in (scratch, persistent) if lvl is not None]
    for lvl in plain:
        if "rank" not in fields_of(lvl.template):
            for node in nodes:
                lvl.add(LevelStore(lvl.name, lvl.template.format(node=node, rank=0)))
    if ranks is None:
        ranks = set()
        for lvl in levels:
            if isinstance(lvl, Level) and "rank" in fields_of(lvl.template):
                ranks.update(r for node in nodes for r in ranks_on_disk(lvl.template, node))
            elif isinstance(lvl, Level):
                ranks.update(r for name in lvl.checkpoint_names() for copies in lvl.copies(name).values()
                             for r, _ in copies)
    for lvl in plain:
        if "rank" in fields_of(lvl.template):
            for node in nodes:
                for rank in sorted(ranks):
                    lvl.add(LevelStore(lvl.name, lvl.template.format(node=node, rank=rank)), rank)
    return levels


def checkpoint_states(levels, name):
    """:class:`VersionState` of every version of ``name`` at every level, newest first
    (levels fastest first within a version)."""
    out = [s for lvl in levels for s in lvl.states(name)]
    order = [lvl.name for lvl in levels]
    return sorted(out, key=lambda s: (-s.version, order.index(s.level)))


def levels_reached(states):
    """``{(name, version): [levels holding a complete copy, fastest first]}``."""
    out = {}
    for s in states:
        held = out.setdefault((s.name, s.version), [])
        if s.state in HOLDING:
            held.append(s.level)
    return out


def verify_version(levels, name, version):
    """Yield ``(status, level, who, detail)`` for every copy of ``name``/``version``.

    ``status`` is ``OK``, ``FAIL`` (the copy exists but is corrupt) or ``MISSING`` (a rank
    the manifests expect has no copy, or a parity block is gone); ``who`` is ``rank R`` or,
    for erasure parity, ``node N``.
    """
    for lvl in levels:
        yield from lvl.verify(name, version)
