"""The erasure group record: :class:`GroupRecord` and its :class:`GroupMember` entries.

Written by the ``[erasure]`` module of every node's engine (sync-mode node leader or
active backend) as ``<node scratch>/.erasure/<name>/v<version>/group.json`` on every
member of an encoding group, last and atomically: it is the commit record of the
group's parity (see ``GroupStore`` in the striping module). Read back by the engines
on restart (and exchanged between them with MPI ``allgather``: records pickle) and by
``veloc ls``/``verify``.

On disk it is the JSON object of :meth:`GroupRecord.to_json` (keys sorted): ``format``,
``name``, ``version``, ``scheme``, ``m`` (parity blocks per stripe), ``k`` (data blocks
per stripe), ``backend`` and ``code`` of the codec, ``chunk`` (bytes per data block of a
stripe), ``parity_len`` (bytes per parity block), ``members`` (per member in group
order: ``node``, failure ``domain``, block ``length``, block ``digest`` or null when the
per-file digests pin the data, and its ranks' scratch ``manifests``), ``parity``
(``parity[s][j]``: digest of parity block ``j`` of stripe ``s``) and ``stamp``, the
first 16 hex digits of the digest of the record without its stamp, which tells two
encodings of a version apart. :meth:`GroupRecord.from_json` checks every field; a
malformed record is a :class:`~veloc.errors.CorruptCheckpointError` naming the file
and the field.
"""
import re
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from veloc.errors import ConfigError, CorruptCheckpointError
from veloc.names import check_name, check_node_id

FORMAT = 1
SCHEMES = ("xor", "rs")
_STAMP = re.compile(r"[0-9a-f]{1,64}")


class GroupRecordError(CorruptCheckpointError):
    """A group record field is missing or bad; the message names the field."""


def _fail(field, problem):
    raise GroupRecordError(f"field {field!r} {problem}")


def _int(field, value, lo):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        _fail(field, f"must be an int >= {lo}, got {value!r:.80}")


def _text(field, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(field, f"must be a non-empty str{' or null' if optional else ''}, got {value!r:.80}")


def _fields(raw, keys, where):
    """The values of ``keys`` in the JSON object ``raw`` (every one required, no others)."""
    if not isinstance(raw, dict):
        _fail(where, f"must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in keys if k not in raw]
    if missing:
        _fail(f"{where}.{missing[0]}" if where != "record" else missing[0], "is missing")
    unknown = sorted(str(k) for k in raw if k not in keys)
    if unknown:
        _fail(f"{where}.{unknown[0]}" if where != "record" else unknown[0], "is unknown")
    return {k: raw[k] for k in keys}


@dataclass(frozen=True)
class GroupMember:
    """One member node of an encoding group. ``manifests`` are its ranks' scratch
    manifests as JSON objects (ranks ascending); their files, in that order, make the
    member's data block."""
    node: str
    domain: str
    length: int
    digest: Optional[str]
    manifests: Tuple[dict, ...]

    def __post_init__(self):
        try:
            check_node_id(self.node)
        except ConfigError as exc:
            _fail("node", f"is not a node id: {exc}")
        _text("domain", self.domain)
        _int("length", self.length, 0)
        _text("digest", self.digest, optional=True)
        if not isinstance(self.manifests, tuple):
            _fail("manifests", f"must be a list, got {type(self.manifests).__name__}")
        for i, manifest in enumerate(self.manifests):
            self._check_manifest(i, manifest)
        if sum(self.file_sizes) != self.length:
            _fail("length", f"is {self.length} but the files of its manifests hold {sum(self.file_sizes)} bytes")

    @staticmethod
    def _check_manifest(i, manifest):
        where = f"manifests[{i}]"
        if not isinstance(manifest, dict):
            _fail(where, f"must be a JSON object, got {type(manifest).__name__}")
        _int(f"{where}.rank", manifest.get("rank"), 0)
        _int(f"{where}.nranks", manifest.get("nranks"), 1)
        files = manifest.get("files")
        if not isinstance(files, list):
            _fail(f"{where}.files", f"must be a list, got {files!r:.80}")
        for j, entry in enumerate(files):
            if not isinstance(entry, dict):
                _fail(f"{where}.files[{j}]", "must be a JSON object")
            _int(f"{where}.files[{j}].size", entry.get("size"), 0)

    @property
    def ranks(self) -> List[int]:
        """The ranks whose scratch copies this member's block holds."""
        return [m["rank"] for m in self.manifests]

    @property
    def file_sizes(self) -> List[int]:
        """Sizes of the files of this member's block, in block order."""
        return [f["size"] for m in self.manifests for f in m["files"]]

    def to_json(self) -> dict:
        return {"node": self.node, "domain": self.domain, "length": self.length, "digest": self.digest,
                "manifests": list(self.manifests)}

    @classmethod
    def from_json(cls, raw, where="member") -> "GroupMember":
        values = _fields(raw, ("node", "domain", "length", "digest", "manifests"), where)
        if not isinstance(values["manifests"], list):
            _fail(f"{where}.manifests", f"must be a list, got {type(values['manifests']).__name__}")
        values["manifests"] = tuple(values["manifests"])
        try:
            return cls(**values)
        except GroupRecordError as exc:
            raise GroupRecordError(str(exc).replace("field '", f"field '{where}.", 1)) from None


_RECORD_KEYS = ("format", "name", "version", "scheme", "m", "k", "backend", "code", "chunk",
                "parity_len", "members", "parity", "stamp")


@dataclass(frozen=True)
class GroupRecord:
    """The commit record of one version's parity in one group (the same on every member).
    ``stamp`` is empty until the striping module stamps it, which it does before commit."""
    name: str
    version: int
    scheme: str
    m: int
    k: int
    backend: str
    code: str
    chunk: int
    parity_len: int
    members: Tuple[GroupMember, ...]
    parity: Tuple[Tuple[str, ...], ...]
    stamp: str = ""
    format: int = FORMAT

    def __post_init__(self):
        if self.format != FORMAT:
            _fail("format", f"must be {FORMAT}, got {self.format!r}")
        check_name(self.name, what="field 'name'", error=GroupRecordError)
        _int("version", self.version, 0)
        if self.scheme not in SCHEMES:
            _fail("scheme", f"must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        _int("m", self.m, 1)
        _int("k", self.k, 1)
        _text("backend", self.backend)
        _text("code", self.code)
        _int("chunk", self.chunk, 1)
        _int("parity_len", self.parity_len, 1)
        if not isinstance(self.members, tuple) or len(self.members) != self.k + self.m \
                or not all(isinstance(e, GroupMember) for e in self.members):
            _fail("members", f"must list k + m = {self.k + self.m} members, got {self.members!r:.120}")
        if len(set(self.nodes)) != len(self.nodes):
            _fail("members", f"names a node twice: {self.nodes}")
        if not isinstance(self.parity, tuple) or len(self.parity) != len(self.members):
            _fail("parity", f"must list the parity digests of {len(self.members)} stripes")
        for s, row in enumerate(self.parity):
            if not isinstance(row, tuple) or len(row) != self.m or not all(isinstance(d, str) and d for d in row):
                _fail(f"parity[{s}]", f"must list {self.m} digest(s), got {row!r:.120}")
        if self.stamp and (not isinstance(self.stamp, str) or not _STAMP.fullmatch(self.stamp)):
            _fail("stamp", f"must be hex digits, got {self.stamp!r:.80}")

    # ------------------------------------------------------------ queries
    @property
    def nodes(self) -> List[str]:
        """Member nodes, in group order."""
        return [e.node for e in self.members]

    def member_index(self, node: str) -> int:
        """``node``'s position in the group (``ValueError`` if it is no member)."""
        return self.nodes.index(node)

    def ranks_of(self, node: str) -> List[int]:
        """The ranks ``node``'s block holds (empty if it is no member)."""
        for e in self.members:
            if e.node == node:
                return e.ranks
        return []

    # ------------------------------------------------------------ JSON
    def content_json(self) -> dict:
        """The record as written, without its stamp (what the stamp is computed from)."""
        return {"format": self.format, "name": self.name, "version": self.version, "scheme": self.scheme,
                "m": self.m, "k": self.k, "backend": self.backend, "code": self.code, "chunk": self.chunk,
                "parity_len": self.parity_len, "members": [e.to_json() for e in self.members],
                "parity": [list(row) for row in self.parity]}

    def to_json(self) -> dict:
        """The JSON object of ``group.json``."""
        if not self.stamp:
            raise GroupRecordError(f"group record of {self.name} v{self.version} is not stamped")
        return dict(self.content_json(), stamp=self.stamp)

    def with_stamp(self, stamp: str) -> "GroupRecord":
        return replace(self, stamp=stamp)

    @classmethod
    def from_json(cls, raw, where="erasure group record") -> "GroupRecord":
        """Check and rebuild a record (also those written by earlier versions);
        :class:`CorruptCheckpointError` names ``where`` (the file) and the bad field."""
        try:
            values = _fields(raw, _RECORD_KEYS, "record")
            if not values["stamp"]:
                _fail("stamp", "is empty")
            for key in ("members", "parity"):
                if not isinstance(values[key], list):
                    _fail(key, f"must be a list, got {type(values[key]).__name__}")
            values["members"] = tuple(GroupMember.from_json(e, f"members[{i}]")
                                      for i, e in enumerate(values["members"]))
            values["parity"] = tuple(tuple(row) if isinstance(row, list) else row for row in values["parity"])
            return cls(**values)
        except GroupRecordError as exc:
            raise GroupRecordError(f"{where}: malformed erasure group record: {exc}") from None
