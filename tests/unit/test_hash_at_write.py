"""The rank hashes its rank file while writing it ([checksum] at_write): the digest is
that of the file's bytes, whichever way the file was written, and the engine makes no
second pass over the file."""
import mmap
import os

import numpy as np
import pytest
from conftest import flip_bytes

import veloc
import veloc.engine.modules.checksum as checksum_module
from veloc.regions import Region
from veloc.storage.hashing import digest_file, hasher
from veloc.storage.manifest import file_fingerprint, unchanged_since_hashed
from veloc.storage.rankfile import build_header, write_rank_file

ARRAYS = {"a": np.arange(10_001, dtype=np.float64), "b": np.arange(77, dtype=np.int8),
          "empty": np.zeros(0), "c": np.random.default_rng(1).random((300, 7))}


def _layout():
    snaps = [Region(k, v).snapshot() for k, v in ARRAYS.items()]
    header, infos, total = build_header("h", 1, 0, [d for d, _ in snaps])
    return header, infos, [v for _, v in snaps], total


@pytest.mark.parametrize("way", ["pwrite-fresh", "pwrite-over-garbage", "mapped-over-garbage"])
def test_the_digest_at_write_is_the_digest_of_the_file(tmp_path, way):
    header, infos, views, total = _layout()
    path = tmp_path / "r0.vck"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if way != "pwrite-fresh":       # a recycled file: old bytes everywhere, gaps included
            os.write(fd, b"\xAB" * (total + 8192))
            os.ftruncate(fd, total if way.startswith("mapped") else total + 8192)
        h = hasher("xxh3_128")
        if way.startswith("mapped"):
            mapped = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
            write_rank_file(fd, header, infos, views, total, mapped, h)
            mapped.close()
        else:
            write_rank_file(fd, header, infos, views, total, None, h)
    finally:
        os.close(fd)
    assert path.stat().st_size == total
    assert h.hexdigest() == digest_file(path, "xxh3_128")


def test_the_plain_and_the_hashed_write_give_the_same_file(tmp_path):
    header, infos, views, total = _layout()
    files = []
    for digest in (None, hasher("xxh3_64")):
        path = tmp_path / f"r{len(files)}.vck"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        write_rank_file(fd, header, infos, views, total, None, digest)
        os.close(fd)
        files.append(path.read_bytes())
    assert files[0] == files[1]


def _counting(monkeypatch):
    hashed = []
    real = checksum_module.digest_file
    monkeypatch.setattr(checksum_module, "digest_file",
                        lambda path, *a, **k: hashed.append(path.name) or real(path, *a, **k))
    return hashed


def _scratch_manifest(client, name, version):
    return client.scratch.read_manifest(name, version, 0)


@pytest.mark.parametrize("at_write", [True, False])
def test_the_engine_hashes_only_what_the_rank_did_not(dirs, monkeypatch, at_write):
    hashed = _counting(monkeypatch)
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"]),
           "checksum": {"at_write": at_write}}
    with veloc.init_single(0, cfg) as c:
        a = np.arange(50_000.0)
        c.protect("a", a)
        c.checkpoint("h", 1)          # a fresh file, bound by page allocation: the engine hashes it
        assert hashed == ["r0.vck"]
        hashed.clear()
        c.checkpoint_begin("h", 2)    # into the file prepared meanwhile: hashed while copied
        c.checkpoint_mem()
        with open(c.route_file("extra.txt"), "w") as f:
            f.write("routed")
        c.checkpoint_end()
        manifest = _scratch_manifest(c, "h", 2)
        vdir = c.scratch.version_dir("h", 2)
        assert hashed == (["r0.f.extra.txt"] if at_write else ["r0.vck", "r0.f.extra.txt"])
        for entry in manifest.files:          # every digest is that of the file, however made
            assert entry.digest == digest_file(vdir / entry.name, manifest.checksum)
            assert entry.fingerprint == file_fingerprint(os.stat(vdir / entry.name))
        assert unchanged_since_hashed(manifest, vdir)
        a[:] = 0
        assert c.restart_test("h") == 2
        c.restart("h", 2)
        assert np.array_equal(a, np.arange(50_000.0))
        assert c.last_restart.level == "scratch"


def test_without_checksums_the_rank_hashes_nothing(dirs):
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "chksum": False}
    with veloc.init_single(0, cfg) as c:
        assert c.write_checksum is None
        c.protect("a", np.ones(100))
        c.checkpoint("h", 1)
        manifest = _scratch_manifest(c, "h", 1)
        assert manifest.checksum is None and all(e.digest is None for e in manifest.files)


def test_a_file_changed_after_the_write_is_hashed_again_and_refused(dirs, monkeypatch):
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}
    with veloc.init_single(0, cfg) as c:
        a = np.arange(4096.0)
        c.protect("a", a)
        c.checkpoint("h", 1)
        vdir = c.scratch.version_dir("h", 1)
        flip_bytes(vdir / "r0.vck")
        assert not unchanged_since_hashed(_scratch_manifest(c, "h", 1), vdir)
        a[:] = 0
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(4096.0))
