"""The command a rank sends to its backend (veloc.work_item.WorkItem): built, sent, checked."""
import pickle

import numpy as np
import pytest

from veloc.errors import BackendError
from veloc.work_item import KINDS, WorkItem, WorkItemError

pytestmark = pytest.mark.timeout(30)


def command(kind="CHECKPOINT", version=3, **extra):
    return WorkItem.command(kind, "heat", version, rank=1, nranks=4, local_ranks=[0, 1],
                            session="0f3a9c12be77", seq=7, job_nodes=["n0", "n1"], **extra)


GOOD = {
    "CHECKPOINT": command(),
    "AVAILABLE": command("AVAILABLE", None, max_version=5),
    "VERIFY": command("VERIFY", verified="scratch"),
    "RESTORE": command("RESTORE", level="persistent"),
    "SUPERSEDE": command("SUPERSEDE", None, threshold=2),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_over_the_wire_and_pickle(kind):
    item = GOOD[kind]
    wire = item.to_wire()
    assert WorkItem.from_wire(wire) == item and pickle.loads(pickle.dumps(item)) == item
    assert wire["group"] == f"heat/v{item.version}/{kind}/0f3a9c12be77-7"
    assert wire["key"] == wire["group"] + "/r1" and wire["group_size"] == 2
    assert wire["local_ranks"] == [0, 1] and wire["job_nodes"] == ["n0", "n1"]
    assert "pid" not in wire and "replayed" not in wire          # unset optional fields stay off
    marked = item.replace(pid=123, replayed=True, nbytes=10)
    assert WorkItem.from_wire(marked.to_wire()) == marked


def test_command_takes_numpy_ints_and_keeps_the_wire_format():
    item = WorkItem.command("CHECKPOINT", "heat", np.int64(3), rank=np.int32(1), nranks=4,
                            local_ranks=(r for r in [np.int64(0), 1]), session="s1", seq=1)
    assert item.version == 3 and type(item.version) is int and item.local_ranks == (0, 1)
    assert item.group_size == 2 and item.key == "heat/v3/CHECKPOINT/s1-1/r1"
    assert item.to_wire()["job_nodes"] is None and item.order == "engine"
    with pytest.raises(WorkItemError, match="item field 'version' must be an int"):
        command(version=1.5)
    with pytest.raises(WorkItemError, match="item field 'threshold'"):
        command("SUPERSEDE", None, threshold=True)


BAD = [
    ("kind", "FLUSH", "must be one of CHECKPOINT"),
    ("name", "../etc", "invalid item field 'name'"),
    ("name", 7, "item field 'name' must be a str"),
    ("version", -1, "item field 'version' must be an int >= 0"),
    ("version", None, "item field 'version'"),                   # CHECKPOINT needs one
    ("version", True, "item field 'version'"),
    ("rank", -1, r"item field 'rank' must be an int \[0, 16777216\)"),
    ("rank", "1", "item field 'rank'"),
    ("nranks", 0, "item field 'nranks'"),
    ("local_ranks", [], "item field 'local_ranks'"),
    ("local_ranks", [0, 0], "item field 'local_ranks' must list distinct ranks"),
    ("local_ranks", [0, 2], "including rank 1"),
    ("local_ranks", [0, 1, -9], "item field 'local_ranks' must be an int"),
    ("local_ranks", "01", "item field 'local_ranks' must be a list"),
    ("session", "a/b", "item field 'session' must match"),
    ("session", "", "item field 'session' must be a non-empty str"),
    ("group", "heat/v3/CHECKPOINT/other-7", "item field 'group' must be heat/v3/CHECKPOINT/0f3a9c12be77-<n>"),
    ("group", "heat/v3/CHECKPOINT/0f3a9c12be77-x", "item field 'group'"),
    ("group", 5, "item field 'group' must be a non-empty str"),
    ("group_size", "2", "item field 'group_size' must be an int"),
    ("group_size", 3, "item field 'group_size' must equal the number of local ranks"),
    ("group_size", 0, "item field 'group_size'"),
    ("key", "heat/v3/CHECKPOINT/0f3a9c12be77-7/r0", "item field 'key' must be"),
    ("order", "", "item field 'order'"),
    ("order", "a b", "item field 'order' must match"),
    ("job_nodes", [], "item field 'job_nodes' must be a non-empty list"),
    ("job_nodes", ["n0", "../x"], "item field 'job_nodes' holds a bad node id"),
    ("job_nodes", "n0", "item field 'job_nodes' must be a list"),
    ("threshold", 2, "item field 'threshold' belongs to SUPERSEDE items only"),
    ("max_version", 2, "item field 'max_version' belongs to AVAILABLE items only"),
    ("verified", "scratch", "item field 'verified' belongs to VERIFY items only"),
    ("level", "scratch", "item field 'level' belongs to RESTORE items only"),
    ("pid", 0, "item field 'pid'"),
    ("nbytes", -1, "item field 'nbytes'"),
    ("replayed", 1, "item field 'replayed' must be true or false"),
    ("color", "red", "item field 'color' is unknown"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_every_bad_field_is_named(field, value, message):
    wire = dict(GOOD["CHECKPOINT"].to_wire(), **{field: value})
    with pytest.raises(WorkItemError, match=message) as info:
        WorkItem.from_wire(wire)
    assert isinstance(info.value, BackendError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind,field,value,message", [
    ("SUPERSEDE", "threshold", None, "item field 'threshold' must be an int >= 0"),
    ("SUPERSEDE", "threshold", -3, "item field 'threshold'"),
    ("AVAILABLE", "max_version", -1, "item field 'max_version'"),
    ("VERIFY", "verified", "a/b", "invalid item field 'verified'"),
    ("RESTORE", "level", None, "item field 'level' must be a str"),
    ("RESTORE", "version", None, "item field 'version'"),
])
def test_kind_specific_fields(kind, field, value, message):
    wire = GOOD[kind].to_wire()
    wire[field] = value
    with pytest.raises(WorkItemError, match=message):
        WorkItem.from_wire(wire)


def test_missing_fields_and_non_objects():
    for field in ("kind", "name", "version", "rank", "nranks", "local_ranks", "session", "group",
                  "group_size", "key"):
        wire = GOOD["CHECKPOINT"].to_wire()
        del wire[field]
        with pytest.raises(WorkItemError, match=f"item field '{field}' is missing"):
            WorkItem.from_wire(wire)
    wire = GOOD["CHECKPOINT"].to_wire()
    del wire["job_nodes"], wire["order"]              # optional: defaults
    assert WorkItem.from_wire(wire).job_nodes is None
    with pytest.raises(WorkItemError, match="must be a JSON object, got list"):
        WorkItem.from_wire([1, 2])
    with pytest.raises(WorkItemError, match="item field 'rank'"):
        GOOD["CHECKPOINT"].replace(rank=-1)
