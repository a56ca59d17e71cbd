"""The erasure group record (veloc.group_record): same JSON and stamp as before, every bad
field of a group.json a CorruptCheckpointError naming the file and the field."""
import json
import pickle

import pytest

from veloc.storage.hashing import digest_buffer
from veloc.storage.manifest import FileEntry, Manifest
from veloc.redundancy.striping import DIGEST, RECORD, GroupStore, manifests_of, stamped
from veloc.errors import CorruptCheckpointError
from veloc.group_record import GroupMember, GroupRecord

pytestmark = pytest.mark.timeout(30)


def manifest_json(rank, sizes):
    files = [FileEntry(f"r{rank}.{i}.vck", size, digest=f"{rank}{i}" * 8) for i, size in enumerate(sizes)]
    m = Manifest("heat", 3, rank, 6, f"n{rank // 2}", "scratch", files=files, checksum=DIGEST, created=1.5)
    return json.loads(m.to_bytes())


def old_record():
    """A record built exactly as the erasure module built its dict before records were typed."""
    members = []
    for i, n in enumerate(("n0", "n1", "n2")):
        manifests = [manifest_json(2 * i, [100, 20]), manifest_json(2 * i + 1, [7 * (i + 1)])]
        members.append({"node": n, "domain": f"rack{i}", "length": sum(f["size"] for x in manifests for f in x["files"]),
                        "digest": None if i else "ab" * 16, "manifests": manifests})
    record = {"format": 1, "name": "heat", "version": 3, "scheme": "xor", "m": 1, "k": 2, "backend": "numpy-xor",
              "code": "xor", "chunk": 64, "parity_len": 64, "members": members,
              "parity": [[f"p{s}" * 8] for s in range(3)]}
    record["stamp"] = digest_buffer(json.dumps(record, sort_keys=True).encode(), DIGEST)[:16]
    return record


def test_old_group_json_reads_and_writes_back_byte_for_byte(tmp_path):
    old = old_record()
    store = GroupStore(tmp_path, durable=False)
    path = store.version_dir("heat", 3) / RECORD
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, sort_keys=True))
    rec = store.read_record("heat", 3)
    assert rec.to_json() == old and rec.stamp == old["stamp"]
    assert stamped(rec.with_stamp("")).stamp == old["stamp"]        # the same stamp computation
    assert rec.nodes == ["n0", "n1", "n2"] and rec.member_index("n1") == 1
    assert rec.ranks_of("n2") == [4, 5] and rec.ranks_of("n9") == []
    assert rec.members[1].file_sizes == [100, 20, 14] and rec.members[0].digest == "ab" * 16
    assert [m.rank for m in manifests_of(rec.members[2])] == [4, 5]
    assert pickle.loads(pickle.dumps(rec)) == rec                  # crosses MPI (allgather)
    path.unlink()
    store.commit(rec, {})
    assert path.read_bytes() == json.dumps(old, sort_keys=True).encode()


def test_an_unstamped_record_is_never_written(tmp_path):
    rec = GroupRecord.from_json(old_record()).with_stamp("")
    with pytest.raises(CorruptCheckpointError, match="not stamped"):
        GroupStore(tmp_path, durable=False).commit(rec, {})


def _set(path, value):
    """``old_record()`` with the value at ``path`` (keys and list indices) replaced or,
    for ``...``, removed."""
    raw = old_record()
    *parents, last = path
    target = raw
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return raw


BAD = [
    (("format",), 2, "field 'format' must be 1"),
    (("name",), "../x", "field 'name'"),
    (("version",), "3", "field 'version' must be an int >= 0"),
    (("scheme",), "raid", "field 'scheme' must be one of xor, rs"),
    (("m",), 0, "field 'm' must be an int >= 1"),
    (("k",), 3, "field 'members' must list k \\+ m = 4 members"),
    (("backend",), "", "field 'backend' must be a non-empty str"),
    (("code",), None, "field 'code'"),
    (("chunk",), 0, "field 'chunk'"),
    (("parity_len",), -1, "field 'parity_len'"),
    (("members",), {}, "field 'members' must be a list"),
    (("members", 1), "n1", "field 'members\\[1\\]' must be a JSON object"),
    (("members", 1, "node"), "a/b", "field 'members\\[1\\].node' is not a node id"),
    (("members", 2, "node"), "n0", "field 'members' names a node twice"),
    (("members", 0, "domain"), "", "field 'members\\[0\\].domain'"),
    (("members", 0, "length"), 5, "field 'members\\[0\\].length' is 5 but the files"),
    (("members", 0, "digest"), 7, "field 'members\\[0\\].digest'"),
    (("members", 0, "manifests"), "x", "field 'members\\[0\\].manifests' must be a list"),
    (("members", 0, "manifests", 1, "rank"), -1, "field 'members\\[0\\].manifests\\[1\\].rank'"),
    (("members", 0, "manifests", 1, "nranks"), ..., "field 'members\\[0\\].manifests\\[1\\].nranks'"),
    (("members", 0, "manifests", 0, "files"), None, "manifests\\[0\\].files' must be a list"),
    (("members", 0, "manifests", 0, "files", 0, "size"), "1", "manifests\\[0\\].files\\[0\\].size'"),
    (("members", 0, "color"), 1, "field 'members\\[0\\].color' is unknown"),
    (("members", 0, "length"), ..., "field 'members\\[0\\].length' is missing"),
    (("parity",), [["a"]], "field 'parity' must list the parity digests of 3 stripes"),
    (("parity", 1), ["a", "b"], "field 'parity\\[1\\]' must list 1 digest"),
    (("parity", 1), [""], "field 'parity\\[1\\]'"),
    (("stamp",), "", "field 'stamp' is empty"),
    (("stamp",), "XYZ", "field 'stamp' must be hex digits"),
    (("stamp",), ..., "field 'stamp' is missing"),
    (("extra",), 1, "field 'extra' is unknown"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[".".join(map(str, p)) for p, _, _ in BAD])
def test_every_bad_field_is_corrupt_and_named(tmp_path, path, value, message):
    store = GroupStore(tmp_path, durable=False)
    file = store.version_dir("heat", 3) / RECORD
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps(_set(path, value)))
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        store.read_record("heat", 3)
    assert str(info.value).startswith(f"{file}: malformed erasure group record: ")


def test_unreadable_or_foreign_group_json(tmp_path):
    store = GroupStore(tmp_path, durable=False)
    file = store.version_dir("heat", 3) / RECORD
    file.parent.mkdir(parents=True)
    assert store.read_record("heat", 4) is None
    for text, message in (("{", "unreadable erasure group record"), ("[]", "must be a JSON object"),
                          ("{}", "field 'format' is missing")):
        file.write_text(text)
        with pytest.raises(CorruptCheckpointError, match=message):
            store.read_record("heat", 3)
    file.write_text(json.dumps(old_record()))
    (store.version_dir("heat", 5)).mkdir()
    (store.version_dir("heat", 5) / RECORD).write_text(json.dumps(old_record()))
    with pytest.raises(CorruptCheckpointError, match="not the group record of heat v5"):
        store.read_record("heat", 5)


def test_members_built_by_the_engine_are_checked_too():
    with pytest.raises(CorruptCheckpointError, match="field 'length' is 3 but the files"):
        GroupMember("n0", "n0", 3, None, (manifest_json(0, [1]),))
    rec = GroupRecord.from_json(old_record())
    with pytest.raises(CorruptCheckpointError, match="field 'members' must list"):
        GroupRecord(**{**rec.__dict__, "members": rec.members[:2]})
