"""The local write: scratch files prepared off the critical path, recycled through kept
mappings, and a failed preparation that costs nothing but speed."""
import errno
import os
import stat
import time

import numpy as np
import pytest

import veloc
from veloc.storage import local_write
from veloc.storage.levels import LevelStore, RecyclePool
from veloc.storage.local_write import LocalWriter, predicted_size
from veloc.storage.rankfile import RankFile, build_header
from veloc.regions import Region


def _writer(tmp_path, rotation=2):
    store = LevelStore("scratch", tmp_path / "scratch")
    return store, LocalWriter(store, 0, RecyclePool(store.root), rotation)


def _write(store, writer, version, arrays):
    snaps = [Region(k, v).snapshot() for k, v in arrays.items()]
    header, infos, total = build_header("c", version, 0, [d for d, _ in snaps])
    vdir = store.version_dir("c", version)
    vdir.mkdir(parents=True, exist_ok=True)
    final = vdir / store.regions_file_name(0)
    writer.write("c", final, header, infos, [v for _, v in snaps], total)
    # what a commit does: the manifest makes the version count in the rotation
    store.manifest_path("c", version, 0).write_bytes(b"{}")
    return final, total


def _pool_files(pool):
    return sorted(p for p in pool.dir.iterdir()) if pool.dir.exists() else []


def test_a_fresh_write_prepares_the_next_file_and_the_next_write_takes_it(tmp_path):
    store, writer = _writer(tmp_path)
    arrays = {"a": np.arange(50_000, dtype=np.float64)}
    try:
        final, total = _write(store, writer, 1, arrays)
        writer.wait()
        pooled = _pool_files(writer.pool)
        assert [p.stat().st_size for p in pooled] == [total]
        assert stat.S_IMODE(pooled[0].stat().st_mode) == 0o600
        assert pooled[0].stat().st_blocks * 512 >= total          # allocated: no hole to fault in
        assert len(writer.mappings) == 2                          # v1's file and the prepared one
        inode = pooled[0].stat().st_ino
        arrays["a"] += 1
        final2, _ = _write(store, writer, 2, arrays)
        assert final2.stat().st_ino == inode                       # written into the prepared file
        with RankFile(final2) as rf:
            np.testing.assert_array_equal(rf.as_array(rf.region("a")), arrays["a"])
        with RankFile(final) as rf:                                # the older version is untouched
            np.testing.assert_array_equal(rf.as_array(rf.region("a")), arrays["a"] - 1)
    finally:
        writer.close()
    assert len(writer.mappings) == 0


def test_preparation_stops_once_the_rotation_is_full(tmp_path):
    store, writer = _writer(tmp_path, rotation=2)
    arrays = {"a": np.ones(10_000)}
    try:
        for version in (1, 2, 3):
            _write(store, writer, version, arrays)
            writer.wait()
        # v1 fresh, v2 and v3 into files prepared after v1 and v2; after v3 the rotation
        # (2 kept + 1 being written) is full: garbage collection refills the pool from now on
        assert writer.prepared == 2 and _pool_files(writer.pool) == []
    finally:
        writer.close()


def test_keep_every_version_prepares_after_every_write(tmp_path):
    store, writer = _writer(tmp_path, rotation=0)
    try:
        for version in (1, 2, 3, 4):
            _write(store, writer, version, {"a": np.ones(4096)})
            writer.wait()
        assert writer.prepared == 4 and len(_pool_files(writer.pool)) == 1
    finally:
        writer.close()


def test_a_full_scratch_while_preparing_leaves_nothing_and_the_write_goes_on(tmp_path, monkeypatch):
    store, writer = _writer(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_write.os, "posix_fallocate", full)
    arrays = {"a": np.arange(20_000, dtype=np.int32)}
    try:
        _write(store, writer, 1, arrays)
        writer.wait()
        assert writer.prepared == 0 and _pool_files(writer.pool) == []     # no temporary file left
        final, _ = _write(store, writer, 2, arrays)                         # a fresh file instead
        with RankFile(final) as rf:
            np.testing.assert_array_equal(rf.as_array(rf.region("a")), arrays["a"])
    finally:
        writer.close()


def test_the_first_file_is_prepared_after_protect_and_a_write_does_not_wait_for_the_quiet_time(
        tmp_path, monkeypatch):
    cfg = {"scratch": str(tmp_path / "s"), "scratch_versions": 2}
    arrays = [np.arange(30_000, dtype=np.float64), np.zeros((40, 40), dtype=np.int16)]
    with veloc.init_single(0, cfg) as c:
        for i, arr in enumerate(arrays):
            c.protect(i, arr)
        c.writer.wait(5)
        pooled = _pool_files(c.pool)
        assert len(pooled) == 1 and c.writer.prepared == 1
        expected = predicted_size(c.regions.values())
        assert pooled[0].stat().st_size == expected
        inode = pooled[0].stat().st_ino
        c.checkpoint("c", 1)
        vfile = c.scratch.version_dir("c", 1) / c.scratch.regions_file_name(0)
        assert vfile.stat().st_ino == inode and vfile.stat().st_size == expected
    monkeypatch.setattr(local_write, "QUIET_S", 30.0)
    with veloc.init_single(0, cfg) as c:
        c.protect("x", np.ones(1000))
        start = time.monotonic()
        c.checkpoint("d", 1)            # within the quiet time: the preparation is cancelled
        assert time.monotonic() - start < 10
        c.writer.wait(5)


def test_predicted_size_is_unknown_for_pickled_regions():
    assert predicted_size([Region("p", {"a": 1}, use_pickle=True)]) is None
    assert predicted_size([]) is None
    snaps = [Region("a", np.ones(3)).snapshot()]
    assert predicted_size([Region("a", np.ones(3))]) == build_header("long_name", 123, 7, [snaps[0][0]])[2]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs tmpfs")
def test_a_close_during_preparation_leaves_no_mapping_and_no_temporary_file(tmp_path):
    store, writer = _writer(tmp_path)
    _write(store, writer, 1, {"a": np.ones(1 << 20)})
    writer.close()                       # joins the preparation
    assert len(writer.mappings) == 0
    assert not [p for p in _pool_files(writer.pool) if p.name.endswith(".tmp")]


def test_no_file_is_prepared_while_a_restart_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(local_write, "QUIET_S", 0.05)
    store, writer = _writer(tmp_path)
    writer.expect(lambda: 8192)
    writer.hold()                        # restart_test began
    time.sleep(0.3)
    assert writer.prepared == 0
    writer.release()                     # restart_end
    writer.wait(5)
    assert writer.prepared == 1 and [p.stat().st_size for p in _pool_files(writer.pool)] == [8192]
    writer.close()
