"""Persistent commit records: one per node per version, read, removed and collected like
the per-rank manifests they replace (veloc/storage/node_records.py)."""
import json
import shutil
import time

import numpy as np
import pytest

from conftest import flip_bytes, write_vck
from veloc.config import load_config
from veloc.engine.module import CHECKPOINT, Command
from veloc.engine.modules.scratch import verify_copy
from veloc.engine.pipeline import Engine
from veloc.errors import CheckpointError, CorruptCheckpointError
from veloc.regions import Region
from veloc.storage import node_records
from veloc.storage.debris import collect_engine
from veloc.storage.levels import LevelStore
from veloc.storage.manifest import FileEntry, Manifest
from veloc.storage.node_records import SharedLevelStore

NODES = {"n0": [0, 1], "n1": [2, 3]}
NRANKS = 4


def config(dirs, persistent=None, **extra):
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": persistent or str(dirs["persistent"]),
           "mode": "sync", "max_versions": 0, **extra}
    return load_config(cfg, environ={})


def write_scratch(cfg, node, rank, version, name="t"):
    """Rank ``rank``'s committed scratch copy of ``version`` (what its local write leaves)."""
    store = LevelStore("scratch", cfg.scratch_dir(node, rank))
    vdir = store.version_dir(name, version)
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / store.regions_file_name(rank)
    write_vck(path, [Region("a", np.full(64, rank * 100.0 + version))], name=name, version=version, rank=rank)
    store.commit_manifest(Manifest(name, version, rank, NRANKS, node, "scratch",
                                   files=[FileEntry(path.name, path.stat().st_size)]))


def checkpoint(cfg, versions, nodes=NODES, name="t"):
    engines = {node: Engine(cfg, node) for node in nodes}
    for version in versions:
        for node, ranks in nodes.items():
            for rank in ranks:
                write_scratch(cfg, node, rank, version, name)
            engines[node].checkpoint(Command(CHECKPOINT, name, version, ranks, NRANKS))
    return engines


def flush_of(engine):
    return next(m for m in engine.modules if m.name == "flush")


def test_one_record_per_node_per_version(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1, 2])
    for version in (1, 2):
        vdir = dirs["persistent"] / "t" / f"v{version}"
        assert sorted(p.name for p in vdir.iterdir()) == [
            "n0-1.commit.json", "n2-3.commit.json", "r0.vck", "r1.vck", "r2.vck", "r3.vck"]
        record = json.loads((vdir / "n2-3.commit.json").read_text())
        assert record["ranks"] == [2, 3] and [m["rank"] for m in record["manifests"]] == [2, 3]
    store = LevelStore("persistent", dirs["persistent"])
    assert isinstance(store, SharedLevelStore)
    assert store.versions("t") == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    assert store.rank_versions("t", 3) == [1, 2]
    for rank in range(NRANKS):
        manifest = store.read_manifest("t", 2, rank)
        assert manifest.rank == rank and manifest.level == "persistent" and manifest.checksum
        assert verify_copy(store, "t", 2, rank, NRANKS) is None
    assert store.manifest_path("t", 2, 2).name == "n2-3.commit.json"


def test_restore_from_persistent_after_scratch_loss(dirs):
    cfg = config(dirs)
    engines = checkpoint(cfg, [1, 2])
    shutil.rmtree(dirs["scratch"])
    flush = flush_of(engines["n1"])
    assert flush.available("t", [2, 3]) == {2: {1, 2}, 3: {1, 2}}
    assert flush.verify("t", 2, [2, 3]) == {2: None, 3: None}
    flush.restore("t", 2, [2, 3])
    for rank in (2, 3):
        scratch = LevelStore("scratch", cfg.scratch_dir("n1", rank))
        assert verify_copy(scratch, "t", 2, rank, NRANKS) is None
        assert (scratch.version_dir("t", 2) / f"r{rank}.manifest.json").is_file()   # scratch stays per rank


def test_missing_record_leaves_the_nodes_ranks_uncommitted(dirs):
    cfg = config(dirs)
    engines = checkpoint(cfg, [1, 2])
    (dirs["persistent"] / "t" / "v2" / "n2-3.commit.json").unlink()     # n1 died before its commit
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {1: [0, 1, 2, 3], 2: [0, 1]}
    assert store.read_manifest("t", 2, 2) is None
    assert flush_of(engines["n1"]).available("t", [2, 3]) == {2: {1}, 3: {1}}
    assert flush_of(engines["n0"]).available("t", [0, 1]) == {0: {1, 2}, 1: {1, 2}}


@pytest.mark.parametrize("damage", ["torn", "garbage", "other version"])
def test_corrupt_record_is_a_clear_error_for_its_ranks_only(dirs, damage):
    cfg = config(dirs)
    engines = checkpoint(cfg, [1, 2])
    path = dirs["persistent"] / "t" / "v2" / "n2-3.commit.json"
    if damage == "torn":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff\x00 not a record")
    else:
        path.write_bytes((dirs["persistent"] / "t" / "v1" / "n2-3.commit.json").read_bytes())
    store = LevelStore("persistent", dirs["persistent"])
    with pytest.raises(CorruptCheckpointError, match=r"n2-3\.commit\.json: (malformed commit record|commit "
                                                     r"record describes t v1, not t v2)"):
        store.read_manifest("t", 2, 3)
    assert store.read_manifest("t", 2, 1).rank == 1          # the other node's record is intact
    assert store.versions("t")[2] == [0, 1, 2, 3]            # tried at restart, which then falls back
    reasons = flush_of(engines["n1"]).verify("t", 2, [2, 3])
    assert all("n2-3.commit.json" in reasons[r] for r in (2, 3)), reasons
    assert flush_of(engines["n1"]).verify("t", 1, [2, 3]) == {2: None, 3: None}   # the older version


def test_torn_rank_file_under_a_record_fails_its_digest(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1])
    flip_bytes(dirs["persistent"] / "t" / "v1" / "r2.vck")
    store = LevelStore("persistent", dirs["persistent"])
    assert "checksum mismatch" in verify_copy(store, "t", 1, 2, NRANKS)
    assert verify_copy(store, "t", 1, 3, NRANKS) is None


def test_removing_ranks_recommits_the_others_then_removes_the_record(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1, 2], nodes={"n0": [0, 1, 2, 3]})
    store = LevelStore("persistent", dirs["persistent"])
    vdir = store.version_dir("t", 2)
    assert sorted(p.name for p in vdir.glob("n*")) == ["n0-3.commit.json"]
    store.remove("t", 2, 1)                                   # from the middle: two runs stay
    assert sorted(p.name for p in vdir.iterdir()) == ["n0-0.commit.json", "n2-3.commit.json", "r0.vck",
                                                      "r2.vck", "r3.vck"]
    assert json.loads((vdir / "n2-3.commit.json").read_text())["ranks"] == [2, 3]
    assert store.read_manifest("t", 2, 1) is None and store.read_manifest("t", 2, 2).rank == 2
    assert store.versions("t") == {1: [0, 1, 2, 3], 2: [0, 2, 3]}
    store.remove("t", 2, 0)
    assert sorted(p.name for p in vdir.iterdir()) == ["n2-3.commit.json", "r2.vck", "r3.vck"]
    for rank in (2, 3):
        store.remove("t", 2, rank)
    assert not vdir.exists()                                  # pruned once empty
    assert store.versions("t") == {1: [0, 1, 2, 3]}           # other versions kept
    assert verify_copy(store, "t", 1, 1, NRANKS) is None


def test_round_robin_placement_commits_one_record_per_run(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1], nodes={"n0": [0, 2, 3], "n1": [1]})
    vdir = dirs["persistent"] / "t" / "v1"
    assert sorted(p.name for p in vdir.glob("n*")) == ["n0-0.commit.json", "n1-1.commit.json", "n2-3.commit.json"]
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {1: [0, 1, 2, 3]}
    assert all(verify_copy(store, "t", 1, r, NRANKS) is None for r in range(NRANKS))


def test_record_whose_ranks_differ_from_its_name_is_refused(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1])
    vdir = dirs["persistent"] / "t" / "v1"
    (vdir / "n2-3.commit.json").rename(vdir / "n2-4.commit.json")
    store = LevelStore("persistent", dirs["persistent"])
    with pytest.raises(CorruptCheckpointError, match=r"n2-4\.commit\.json: commit record lists ranks \[2, 3\], "
                                                     r"its name says 2-4"):
        store.read_manifest("t", 1, 2)


def test_versioning_keeps_max_versions_per_node(dirs, monkeypatch):
    cfg = config(dirs, max_versions=2)
    checkpoint(cfg, [1, 2, 3])
    written = []
    real = node_records.atomic_write_bytes
    monkeypatch.setattr(node_records, "atomic_write_bytes", lambda path, *a, **k: (written.append(path.name),
                                                                                   real(path, *a, **k)))
    checkpoint(cfg, [4])
    assert written == ["n0-1.commit.json", "n2-3.commit.json"]    # v4's; v2's records went whole
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {3: [0, 1, 2, 3], 4: [0, 1, 2, 3]}
    assert sorted(p.name for p in (dirs["persistent"] / "t").iterdir()) == ["v3", "v4"]


def test_old_per_rank_manifests_still_read_and_removed(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1])
    vdir = dirs["persistent"] / "t" / "v1"
    for record in vdir.glob("n*.commit.json"):                # the layout before node records
        for manifest in json.loads(record.read_text())["manifests"]:
            (vdir / f"r{manifest['rank']}.manifest.json").write_text(json.dumps(manifest))
        record.unlink()
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {1: [0, 1, 2, 3]} and store.rank_versions("t", 2) == [1]
    assert store.read_manifest("t", 1, 2).rank == 2 and verify_copy(store, "t", 1, 2, NRANKS) is None
    assert store.manifest_path("t", 1, 2).name == "r2.manifest.json"
    store.remove("t", 1, 2)
    assert not (vdir / "r2.manifest.json").exists() and not (vdir / "r2.vck").exists()
    assert store.versions("t") == {1: [0, 1, 3]}


def test_debris_collects_uncommitted_rank_files_never_committed_ones(dirs):
    cfg = config(dirs)
    engines = checkpoint(cfg, [1])
    v1 = dirs["persistent"] / "t" / "v1"
    (v1 / "n2-3.commit.json").unlink()                        # n1 crashed before its record
    checkpoint(cfg, [2])
    collect_engine(engines["n1"].ctx, "t", [2, 3], before=2)
    assert sorted(p.name for p in v1.iterdir()) == ["n0-1.commit.json", "r0.vck", "r1.vck"]
    collect_engine(engines["n0"].ctx, "t", [0, 1], before=2)
    assert sorted(p.name for p in v1.iterdir()) == ["n0-1.commit.json", "r0.vck", "r1.vck"]
    assert len(list((dirs["persistent"] / "t" / "v2").iterdir())) == 6


def test_failed_rank_is_left_out_of_the_record(dirs):
    cfg = config(dirs, chksum=False)       # the flush is the first to read the rank files
    engine = Engine(cfg, "n0")
    for rank in (0, 1):
        write_scratch(cfg, "n0", rank, 1)
    (LevelStore("scratch", cfg.scratch_dir("n0", 1)).version_dir("t", 1) / "r1.vck").unlink()
    with pytest.raises(CheckpointError, match=r"flush.*r1\.vck is missing"):
        engine.checkpoint(Command(CHECKPOINT, "t", 1, [0, 1], NRANKS))
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {1: [0]}
    assert (store.version_dir("t", 1) / "n0-0.commit.json").is_file()


@pytest.mark.parametrize("placeholder", ["{node}", "r{rank}"])
def test_per_node_and_per_rank_persistent_folders(dirs, placeholder):
    cfg = config(dirs, persistent=str(dirs["persistent"] / placeholder))
    checkpoint(cfg, [1])
    records = sorted(p.relative_to(dirs["persistent"]).as_posix() for p in dirs["persistent"].rglob("*.commit.json"))
    if placeholder == "{node}":
        assert records == ["n0/t/v1/n0-1.commit.json", "n1/t/v1/n2-3.commit.json"]
    else:
        assert records == [f"r{r}/t/v1/n{r}-{r}.commit.json" for r in range(NRANKS)]
    for rank in range(NRANKS):
        node = "n0" if rank < 2 else "n1"
        store = LevelStore("persistent", cfg.persistent_dir(node, rank))
        assert verify_copy(store, "t", 1, rank, NRANKS) is None


def test_staged_file_over_debris_is_replaced_not_appended(dirs):
    cfg = config(dirs)
    vdir = dirs["persistent"] / "t" / "v1"
    vdir.mkdir(parents=True)
    (vdir / "r0.vck").write_bytes(b"torn by a killed flush" * 1000)
    checkpoint(cfg, [1], nodes={"n0": [0, 1]})
    store = LevelStore("persistent", dirs["persistent"])
    assert verify_copy(store, "t", 1, 0, NRANKS) is None
    assert not list(vdir.glob(".*"))


def test_cached_listing_follows_a_rewrite_by_another_process(dirs, monkeypatch):
    monkeypatch.setattr(node_records, "SETTLED_S", 0.0)     # every listing may be cached
    cfg = config(dirs)
    checkpoint(cfg, [1])
    reader, writer = LevelStore("persistent", dirs["persistent"]), LevelStore("persistent", dirs["persistent"])
    assert reader.read_manifest("t", 1, 0).rank == 0
    time.sleep(0.05)
    node_records._cache.clear()                              # the writer is another process
    writer.uncommit("t", 1, 0)
    assert reader.read_manifest("t", 1, 0) is None and reader.read_manifest("t", 1, 1).rank == 1


def test_record_encoding_round_trip_and_bad_input():
    manifests = [Manifest("t", 3, r, 4, "n0", "persistent", files=[FileEntry(f"r{r}.vck", 10)]) for r in (5, 4)]
    data = node_records.encode_record(manifests)
    assert node_records.record_name(m.rank for m in manifests) == "n4-5.commit.json"
    assert sorted(node_records.decode_record(data, "x", "t", 3)) == [4, 5]
    for bad in (b"[]", b'{"kind": "veloc-node-commit", "format": 1, "manifests": []}', b"\x00"):
        with pytest.raises(CorruptCheckpointError, match="x: malformed commit record"):
            node_records.decode_record(bad, "x", "t", 3)
    with pytest.raises(CorruptCheckpointError, match="describes t v3, not u v3"):
        node_records.decode_record(data, "x", "u", 3)


def test_record_names_that_cannot_be_records_are_ignored(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1])
    vdir = dirs["persistent"] / "t" / "v1"
    for bogus in ("n0-999999999.commit.json", "n5-2.commit.json", "n1234567890-1234567891.commit.json"):
        (vdir / bogus).write_text("{}")
    store = LevelStore("persistent", dirs["persistent"])
    assert store.versions("t") == {1: [0, 1, 2, 3]}
    assert store.read_manifest("t", 1, 0).rank == 0


def test_record_with_a_bad_created_field_is_refused(dirs):
    cfg = config(dirs)
    checkpoint(cfg, [1])
    path = dirs["persistent"] / "t" / "v1" / "n0-1.commit.json"
    data = json.loads(path.read_text())
    data["manifests"][1]["created"] = "yesterday"
    path.write_text(json.dumps(data))
    store = LevelStore("persistent", dirs["persistent"])
    with pytest.raises(CorruptCheckpointError, match="n0-1.commit.json: malformed commit record.*'yesterday'"):
        store.read_manifest("t", 1, 0)


def test_veloc_open_reads_every_rank_from_node_records(dirs):
    import veloc
    cfg = config(dirs)
    checkpoint(cfg, [1, 2])
    shutil.rmtree(dirs["scratch"])
    mapping = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}
    with veloc.open(mapping, "t", level="persistent") as view:
        assert (view.version, view.nranks, view.ranks, view.verified) == (2, NRANKS, (0, 1, 2, 3), True)
        for rank in range(NRANKS):
            assert np.array_equal(view.read("a", rank), np.full(64, rank * 100.0 + 2))
