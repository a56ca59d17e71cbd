"""The engine keeps its mappings of recycled scratch files from one pipeline run to the
next (veloc.storage.hashing.MappedFiles with keep_runs), and never keeps one that would
pin a deleted file's memory, outlive a resize, or show stale bytes."""
import os

import numpy as np
import pytest

from veloc.engine.pipeline import kept_mapping_runs
from veloc.storage.hashing import MappedFiles


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def mapped_for_one_run(tmp_path, keep_runs):
    """A 4 KiB file ``f`` mapped once by a ``MappedFiles(keep_runs)`` whose run then ended:
    ``(path, files, mapping)``."""
    path = tmp_path / "f"
    write(path, b"x" * 4096)
    files = MappedFiles(keep_runs=keep_runs)
    mapping = files.get(path)
    files.end_run()
    return path, files, mapping


def test_a_recycled_file_is_found_again_under_its_new_name_with_its_new_bytes(tmp_path):
    first, second = tmp_path / "v1" , tmp_path / "v4"
    write(first, b"a" * 8192)
    files = MappedFiles(keep_runs=4)
    mapping = files.get(first)
    assert bytes(mapping[:1]) == b"a"
    files.end_run()
    os.rename(first, second)                 # the recycle pool hands the same inode back
    with open(second, "r+b") as f:           # the client rewrites it in place
        f.write(b"b" * 8192)
    assert files.peek(second) is None        # not used in this run yet
    again = files.get(second)
    assert again is mapping                  # no new mapping, no page-table population
    assert bytes(again[:8192]) == b"b" * 8192
    assert files.source(second) is mapping
    files.close()
    assert len(files) == 0


def test_a_deleted_file_is_released_at_the_end_of_the_run(tmp_path):
    path, files, _ = mapped_for_one_run(tmp_path, 4)
    assert len(files) == 1
    path.unlink()                            # garbage collection deleted it (pool full)
    files.end_run()
    assert len(files) == 0                   # its memory is free again


def test_a_resized_file_gets_a_new_mapping_of_its_new_size(tmp_path):
    path, files, old = mapped_for_one_run(tmp_path, 4)
    write(path, b"y" * 12288)                # same inode, truncated and rewritten larger
    new = files.get(path)
    assert new is not old and len(new) == 12288 and bytes(new[-1:]) == b"y"
    files.close()


def test_an_unused_mapping_is_dropped_after_keep_runs_runs(tmp_path):
    _, files, _ = mapped_for_one_run(tmp_path, 2)
    files.end_run()
    assert len(files) == 1
    files.end_run()
    assert len(files) == 0
    files.close()


def test_without_keep_runs_every_mapping_ends_with_its_run(tmp_path):
    path = tmp_path / "f"
    write(path, b"x" * 4096)
    files = MappedFiles()
    assert files.source(path) is None        # the caller maps it for one use
    assert files.get(path) is files.peek(path) is not None
    files.end_run()
    assert len(files) == 0 and files.peek(path) is None


def test_an_empty_file_has_no_mapping_and_a_missing_one_raises(tmp_path):
    empty = tmp_path / "empty"
    write(empty, b"")
    files = MappedFiles(keep_runs=2)
    assert files.get(empty) is None
    with pytest.raises(FileNotFoundError):
        files.get(tmp_path / "missing")
    files.close()


@pytest.mark.parametrize("versions,runs", [(0, 0), (1, 8), (2, 10)])
def test_kept_runs_follow_the_rotation(versions, runs):
    class Config:
        scratch_versions = versions
    assert kept_mapping_runs(Config()) == runs


def test_a_sync_job_flushes_recycled_files_from_kept_mappings(tmp_path):
    """End to end in one process: the flushed copies are right while the engine keeps
    mappings of the rotating scratch files, and finalize releases them."""
    import veloc
    cfg = {"scratch": str(tmp_path / "scratch"), "persistent": str(tmp_path / "persistent"),
           "mode": "sync", "scratch_versions": 1}
    client = veloc.init(cfg)
    a = np.zeros(1 << 16)
    client.protect("a", a)
    engine = client.host.engine
    for version in range(1, 7):
        a[:] = version
        client.checkpoint("k", version)
        assert len(engine.mapped) >= 1
    client.finalize()
    assert len(engine.mapped) == 0
    for version in (1, 6):
        client = veloc.init(dict(cfg, scratch=str(tmp_path / f"fresh{version}")))
        b = np.empty(1 << 16)
        client.protect("a", b)
        client.restart("k", version)
        assert client.last_restart.level == "persistent"
        assert (b == version).all()
        client.finalize()


def test_a_mapping_still_viewed_is_released_without_an_error(tmp_path):
    path = tmp_path / "f"
    write(path, b"x" * 4096)
    files = MappedFiles(keep_runs=1)
    view = memoryview(files.get(path))
    path.unlink()
    files.end_run()                          # the file is gone: released, though still viewed
    assert len(files) == 0 and bytes(view[:1]) == b"x"
    view.release()
