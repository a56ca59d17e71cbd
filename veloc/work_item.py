"""The command an application rank sends to its node's backend: :class:`WorkItem`.

Built by every application rank in async mode (``veloc.hosts.async_host``) with
:meth:`WorkItem.command`, sent over the backend's socket as :meth:`WorkItem.to_wire`
(a JSON object), and rebuilt by the ``veloc-backend`` with :meth:`WorkItem.from_wire`,
which checks every field and refuses the request with a :class:`WorkItemError` naming
the field. The backend journals ``to_wire()`` and reads its journal back with
``from_wire()``; its work queue groups items by ``group`` and its executor runs them.

Fields every item has: ``kind`` (one of :data:`KINDS`), ``name`` (checkpoint name),
``version`` (``None`` for the queries that span versions), ``rank``, ``nranks``,
``local_ranks`` (the job's ranks on this node; ``group_size`` of them send an item of
the same group), ``session`` (one id per job), ``group``
(``<name>/v<version>/<kind>/<session>-<n>``, the same on every node for the ``n``-th
call), ``key`` (``<group>/r<rank>``: a retried submission is queued once), ``order``
(items of one order key run one at a time, in arrival order) and ``job_nodes``.
Per kind: ``threshold`` (SUPERSEDE), ``max_version`` (AVAILABLE), ``verified``
(VERIFY: the level where the rank checked its own copy) and ``level`` (RESTORE).
Set by the backend: ``pid`` (who sent it), ``replayed`` (resumed from the journal);
``nbytes`` (optional) is the bytes the item covers, for drain progress.
"""
import re
from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple

from veloc.errors import BackendError, ConfigError
from veloc.names import check_name, check_node_id

CHECKPOINT, AVAILABLE, VERIFY, RESTORE, SUPERSEDE = KINDS = (
    "CHECKPOINT", "AVAILABLE", "VERIFY", "RESTORE", "SUPERSEDE")
NEEDS_VERSION = (CHECKPOINT, VERIFY, RESTORE)
MAX_RANKS = 1 << 24
MAX_GROUP_SIZE = 1 << 20
MAX_TEXT = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_SEQ = re.compile(r"[0-9]{1,18}")
# field -> the kind it belongs to (absent or None for every other kind)
_KIND_OF = {"threshold": SUPERSEDE, "max_version": AVAILABLE, "verified": VERIFY, "level": RESTORE}


class WorkItemError(BackendError, ValueError):
    """A work item has a missing, unknown or bad field; the message names the field."""


def _fail(field, problem):
    raise WorkItemError(f"item field {field!r} {problem}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(field, value, lo, hi=None, optional=False):
    if value is None and optional:
        return
    if not _is_int(value) or value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        _fail(field, f"must be an int {bound}{' or null' if optional else ''}, got {value!r}")


def _text(field, value, pattern=None, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        _fail(field, f"must be a non-empty str of at most {MAX_TEXT} characters, got {value!r:.80}")
    if pattern is not None and not pattern.fullmatch(value):
        _fail(field, f"must match {pattern.pattern}, got {value!r}")


def _named(field, value, optional=False):
    """A checkpoint or level name (``veloc.names`` rules)."""
    if value is None and optional:
        return
    check_name(value, what=f"item field {field!r}", error=WorkItemError)


@dataclass(frozen=True)
class WorkItem:
    """One rank's command to its node's backend (immutable; pickles and compares by value)."""
    kind: str
    name: str
    version: Optional[int]
    rank: int
    nranks: int
    local_ranks: Tuple[int, ...]
    session: str
    group: str
    group_size: int
    key: str
    order: str = "engine"
    job_nodes: Optional[Tuple[str, ...]] = None
    threshold: Optional[int] = None
    max_version: Optional[int] = None
    verified: Optional[str] = None
    level: Optional[str] = None
    pid: Optional[int] = None
    nbytes: Optional[int] = None
    replayed: bool = False

    # ------------------------------------------------------------ building
    @classmethod
    def command(cls, kind: str, name: str, version: Optional[int], *, rank: int, nranks: int,
                local_ranks, session: str, seq: int, job_nodes=None, **extra) -> "WorkItem":
        """The ``seq``-th call of a rank (every local rank makes the same calls in the same
        order): names its group and key; raises :class:`WorkItemError` for a bad field."""
        version = None if version is None else _index("version", version)
        group = f"{name}/v{version}/{kind}/{session}-{_index('seq', seq)}"
        if "max_version" in extra and extra["max_version"] is not None:
            extra["max_version"] = _index("max_version", extra["max_version"])
        if "threshold" in extra:
            extra["threshold"] = _index("threshold", extra["threshold"])
        local_ranks, rank = tuple(_index("local_ranks", r) for r in local_ranks), _index("rank", rank)
        return cls(kind=kind, name=name, version=version, rank=rank,
                   nranks=_index("nranks", nranks), local_ranks=local_ranks, session=session, group=group,
                   group_size=len(local_ranks), key=f"{group}/r{rank}",
                   job_nodes=None if job_nodes is None else tuple(job_nodes), **extra)

    def __post_init__(self):
        if self.kind not in KINDS:
            _fail("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        _named("name", self.name)
        _int_in("version", self.version, 0, optional=self.kind not in NEEDS_VERSION)
        _int_in("nranks", self.nranks, 1, MAX_RANKS)
        _int_in("rank", self.rank, 0, MAX_RANKS)      # an init_single rank may exceed nranks
        if not isinstance(self.local_ranks, tuple) or not self.local_ranks:
            _fail("local_ranks", f"must be a non-empty list of ranks, got {self.local_ranks!r:.80}")
        for r in self.local_ranks:
            _int_in("local_ranks", r, 0, MAX_RANKS)
        if len(set(self.local_ranks)) != len(self.local_ranks) or self.rank not in self.local_ranks:
            _fail("local_ranks", f"must list distinct ranks including rank {self.rank}, got {list(self.local_ranks)}")
        _text("session", self.session, _TOKEN)
        _text("group", self.group)
        prefix = f"{self.name}/v{self.version}/{self.kind}/{self.session}-"
        if not self.group.startswith(prefix) or not _SEQ.fullmatch(self.group[len(prefix):]):
            _fail("group", f"must be {prefix}<n> for this item, got {self.group!r:.200}")
        _int_in("group_size", self.group_size, 1, MAX_GROUP_SIZE + 1)
        if self.group_size != len(self.local_ranks):
            _fail("group_size", f"must equal the number of local ranks ({len(self.local_ranks)}), "
                                f"got {self.group_size}")
        if self.key != f"{self.group}/r{self.rank}":
            _fail("key", f"must be {self.group}/r{self.rank}, got {self.key!r:.200}")
        _text("order", self.order, _TOKEN)
        self._check_job_nodes()
        for field, kind in _KIND_OF.items():
            if kind != self.kind and getattr(self, field) is not None:
                _fail(field, f"belongs to {kind} items only, not {self.kind}")
        if self.kind == SUPERSEDE:
            _int_in("threshold", self.threshold, 0)
        _int_in("max_version", self.max_version, 0, optional=True)
        _named("verified", self.verified, optional=True)
        _named("level", self.level, optional=self.kind != RESTORE)
        _int_in("pid", self.pid, 1, optional=True)
        _int_in("nbytes", self.nbytes, 0, optional=True)
        if not isinstance(self.replayed, bool):
            _fail("replayed", f"must be true or false, got {self.replayed!r}")

    def _check_job_nodes(self):
        if self.job_nodes is None:
            return
        if not isinstance(self.job_nodes, tuple) or not self.job_nodes:
            _fail("job_nodes", f"must be a non-empty list of node ids or null, got {self.job_nodes!r:.80}")
        for node in self.job_nodes:
            try:
                check_node_id(node)
            except ConfigError as exc:
                _fail("job_nodes", f"holds a bad node id: {exc}")

    # ------------------------------------------------------------ wire / journal
    def to_wire(self) -> dict:
        """The JSON object sent to the backend and journaled (optional fields only when set)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ALWAYS or (value is not None and value is not False):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_wire(cls, raw) -> "WorkItem":
        """Rebuild and check an item from its JSON object (also journal lines written by
        earlier versions, which carry the same keys); :class:`WorkItemError` names the
        first bad, missing or unknown field."""
        if not isinstance(raw, dict):
            raise WorkItemError(f"a work item must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in _FIELDS)
        if unknown:
            _fail(unknown[0], f"is unknown; known fields: {', '.join(_FIELDS)}")
        missing = [f for f in _REQUIRED if f not in raw]
        if missing:
            _fail(missing[0], "is missing")
        values = dict(raw)
        for name in ("local_ranks", "job_nodes"):
            value = values.get(name)
            if value is not None:
                if not isinstance(value, list):
                    _fail(name, f"must be a list, got {type(value).__name__}")
                values[name] = tuple(value)
        return cls(**values)

    def replace(self, **changes) -> "WorkItem":
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)


_FIELDS = tuple(f.name for f in fields(WorkItem))
_REQUIRED = ("kind", "name", "version", "rank", "nranks", "local_ranks", "session", "group",
             "group_size", "key")
_ALWAYS = _REQUIRED + ("order", "job_nodes")


def _index(field, value):
    """``value`` as an int (numpy integers too), else :class:`WorkItemError`."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        _fail(field, f"must be an int, got {value!r:.80}")
    return int(value.__index__())
