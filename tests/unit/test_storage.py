"""Rank file format, manifests (atomic commit), level stores and the recycle pool."""
import json
import os
import stat

import numpy as np
import pytest

from veloc.storage import fileio
from veloc.storage.levels import LevelStore, RecyclePool
from veloc.storage.manifest import FileEntry, Manifest, verify_files
from veloc.storage.rankfile import ALIGN, RankFile, build_header, dtype_descr, write_rank_file
from veloc.storage.write_mappings import WriteMappings
from veloc.errors import CorruptCheckpointError
from veloc.regions import Region

ARRAYS = {
    "f64": np.random.default_rng(1).random((33, 7)),
    "fortran": np.asfortranarray(np.arange(24, dtype=np.int16).reshape(4, 6)),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 5), dtype=np.uint8),
    "rec": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    "big_endian": np.arange(5, dtype=">u4"),
    "cplx": np.arange(6, dtype=np.complex128),
}


def write_file(path, arrays, use_mapping=False, preexisting=0):
    snaps = [Region(k, v).snapshot() for k, v in arrays.items()]
    header, infos, total = build_header("t", 1, 0, [d for d, _ in snaps])
    if preexisting:
        path.write_bytes(b"\xff" * preexisting)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    mappings = WriteMappings(keep=1)
    try:
        mapped = mappings.get(fd, total) if use_mapping else None
        write_rank_file(fd, header, infos, [v for _, v in snaps], total, mapped)
    finally:
        mappings.close()
        os.close(fd)
    return total


@pytest.mark.parametrize("use_mapping", [False, True])
def test_round_trip_every_dtype_and_layout(tmp_path, use_mapping):
    path = tmp_path / "r0.vck"
    total = write_file(path, ARRAYS, use_mapping, preexisting=1 << 20 if use_mapping else 0)
    assert path.stat().st_size == total
    with RankFile(path) as rf:
        assert rf.meta["name"] == "t" and len(rf.regions) == len(ARRAYS)
        for info in rf.regions:
            assert info.offset % ALIGN == 0
            arr = rf.as_array(info)
            ref = ARRAYS[info.id]
            assert arr.dtype == ref.dtype and arr.shape == ref.shape
            np.testing.assert_array_equal(arr, ref)
            assert arr.flags.f_contiguous == ref.flags.f_contiguous or ref.ndim < 2
            del arr


def test_dtype_descr_round_trips():
    from veloc.storage.rankfile import RegionInfo
    for arr in ARRAYS.values():
        info = RegionInfo("x", "array", dtype_descr(arr.dtype), arr.shape, "C", 0, arr.nbytes)
        assert info.numpy_dtype() == arr.dtype


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "magic", "header_byte", "empty"])
def test_damaged_files_are_refused_clearly(tmp_path, damage):
    path = tmp_path / "r0.vck"
    write_file(path, {"a": np.arange(5000.0)})
    data = bytearray(path.read_bytes())
    if damage == "truncate_data":
        data = data[:-100]
    elif damage == "truncate_header":
        data = data[:10]
    elif damage == "magic":
        data[0:8] = b"NOTVELOC"
    elif damage == "header_byte":
        data[20] ^= 0xFF
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        RankFile(path)


def test_region_rejects_bad_objects():
    from veloc.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not contiguous"):
        Region("a", np.arange(10)[::2])
    with pytest.raises(CheckpointError, match="pickle=True"):
        Region("a", [1, 2, 3])
    with pytest.raises(CheckpointError, match="Python objects"):
        Region("a", np.array([object()]))
    ro = np.arange(3)
    ro.flags.writeable = False
    with pytest.raises(CheckpointError, match="read-only"):
        Region("a", ro)
    assert Region("a", [1, 2], use_pickle=True).kind == "pickle"


def manifest(**kw):
    args = dict(name="t", version=4, rank=1, nranks=2, node="n0", level="scratch",
                files=[FileEntry("r1.vck", 10)])
    args.update(kw)
    return Manifest(**args)


def test_manifest_commit_is_atomic_and_private(tmp_path):
    store = LevelStore("scratch", tmp_path)
    m = manifest()
    store.commit_manifest(m)
    path = store.manifest_path("t", 4, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert store.read_manifest("t", 4, 1) == m
    assert store.versions("t") == {4: [1]} and store.rank_versions("t", 0) == []
    # no temporary files are left behind
    assert [p.name for p in path.parent.iterdir()] == ["r1.manifest.json"]


def test_crash_before_rename_leaves_old_state(tmp_path, monkeypatch):
    store = LevelStore("scratch", tmp_path)
    store.commit_manifest(manifest())

    def crash(*a, **k):
        raise OSError(5, "simulated crash")
    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError):
        store.commit_manifest(manifest(nranks=99))
    monkeypatch.undo()
    assert store.read_manifest("t", 4, 1).nranks == 2
    assert [p.name for p in store.version_dir("t", 4).iterdir()] == ["r1.manifest.json"]


def test_bad_manifests_are_corrupt_not_crashes(tmp_path):
    store = LevelStore("scratch", tmp_path)
    store.commit_manifest(manifest())
    path = store.manifest_path("t", 4, 1)
    for text in ("{", "[]", json.dumps({"format": 99}), json.dumps({"format": 1, "files": []})):
        path.write_text(text)
        with pytest.raises(CorruptCheckpointError, match="manifest"):
            store.read_manifest("t", 4, 1)
    store.commit_manifest(manifest(version=5))
    os.replace(store.manifest_path("t", 5, 1), path)
    with pytest.raises(CorruptCheckpointError, match="describes"):
        store.read_manifest("t", 4, 1)


def test_verify_files_checks_size_and_digest(tmp_path):
    from veloc.storage.hashing import digest_file
    store = LevelStore("scratch", tmp_path)
    vdir = store.version_dir("t", 4)
    vdir.mkdir(parents=True)
    path = vdir / "r1.f.data"
    path.write_bytes(b"hello world")
    m = manifest(files=[FileEntry("r1.f.data", 11, "routed", "data", digest_file(path))], checksum="xxh3_128")
    verify_files(m, vdir)
    path.write_bytes(b"hello World")
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        verify_files(m, vdir)
    verify_files(m, vdir, deep=False)
    path.write_bytes(b"hello")
    with pytest.raises(CorruptCheckpointError, match="size 5"):
        verify_files(m, vdir, deep=False)
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        verify_files(m, vdir, deep=False)


def test_remove_uncommits_first_and_recycles(tmp_path):
    store = LevelStore("scratch", tmp_path)
    pool = RecyclePool(tmp_path, keep_per_rank=1)
    for v in (1, 2):
        vdir = store.version_dir("t", v)
        vdir.mkdir(parents=True)
        (vdir / "r1.vck").write_bytes(b"x" * 100)
        store.commit_manifest(manifest(version=v))
    store.remove("t", 1, 1, pool=pool)
    store.remove("t", 2, 1, pool=pool)
    assert store.versions("t") == {} and not store.version_dir("t", 1).exists()
    assert len(list(pool.dir.iterdir())) == 1          # pool keeps at most keep_per_rank
    target = tmp_path / "new.vck"
    assert pool.take(1, target) == 100 and target.exists()
    assert pool.take(1, tmp_path / "other") is None
    assert pool.take(0, tmp_path / "other") is None


def test_copy_file_falls_back_and_hashes(tmp_path):
    from veloc.storage.hashing import digest_file, hasher
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    h = hasher()
    assert fileio.copy_file(src, tmp_path / "dst", on_chunk=h.update) == 3 << 20
    assert h.hexdigest() == digest_file(src) == digest_file(tmp_path / "dst")
    assert fileio.copy_file(src, tmp_path / "dst2") == 3 << 20
    assert (tmp_path / "dst2").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "dst2").stat().st_mode) == 0o600


@pytest.mark.parametrize("size", [(1 << 20), (1 << 20) + 1, (9 << 20) + 4095, 12 << 20])
@pytest.mark.parametrize("hashed", [False, True])
def test_direct_copy_is_exact_and_uses_o_direct(tmp_path, monkeypatch, size, hashed):
    from veloc.storage.hashing import digest_file, hasher
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    calls = []
    real = fileio._copy_direct
    monkeypatch.setattr(fileio, "_copy_direct", lambda *a: calls.append(real(*a)) or calls[-1])
    h = hasher() if hashed else None
    assert fileio.copy_file(src, tmp_path / "dst", on_chunk=h.update if h else None, direct=True) == size
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == 0o600
    if h:
        assert h.hexdigest() == digest_file(src)
    if takes_o_direct(tmp_path):     # then the whole aligned bulk went direct
        assert calls == [size - size % fileio.DIRECT_ALIGN]


def takes_o_direct(directory):
    """Whether files in ``directory`` can be opened with O_DIRECT (disk file systems can;
    tmpfs only on recent kernels)."""
    if not fileio.O_DIRECT:
        return False
    probe = directory / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | fileio.O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("refusal", ["fcntl", "pwrite"])
def test_direct_copy_falls_back_when_refused(tmp_path, monkeypatch, refusal):
    from veloc.storage.hashing import digest_file, hasher
    import errno
    src = tmp_path / "src"
    src.write_bytes(os.urandom((5 << 20) + 77))
    if refusal == "fcntl":
        monkeypatch.setattr(fileio, "_set_direct", lambda fd, enable: False)
    else:
        real_pwrite = os.pwrite
        fail = iter([True])

        def pwrite(fd, data, offset):
            if next(fail, False):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)
        monkeypatch.setattr(fileio.os, "pwrite", pwrite)
    h = hasher()
    assert fileio.copy_file(src, tmp_path / "dst", on_chunk=h.update, direct=True) == (5 << 20) + 77
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert h.hexdigest() == digest_file(src)


def test_write_mappings_are_kept_per_inode_and_bounded(tmp_path):
    """A recycled file (same inode, new name) is written through the mapping kept from
    its last checkpoint; a resized file is remapped; at most ``keep`` are held."""
    mappings = WriteMappings(keep=2)
    paths = [tmp_path / f"f{i}" for i in range(3)]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    try:
        first = mappings.get(fds[0], 8192)
        first[:4] = b"abcd"
        os.replace(paths[0], tmp_path / "renamed")            # recycled under a new name
        again = os.open(tmp_path / "renamed", os.O_RDWR)
        assert mappings.get(again, 8192) is first
        os.close(again)
        assert (tmp_path / "renamed").read_bytes()[:4] == b"abcd"
        smaller = mappings.get(fds[0], 4096)                  # resized: a new mapping
        assert smaller is not first and first.closed and os.fstat(fds[0]).st_size == 4096
        mappings.get(fds[1], 4096)
        mappings.get(fds[2], 4096)
        assert len(mappings) == 2 and smaller.closed           # oldest evicted
        mappings.forget(fds[2])
        assert len(mappings) == 1
    finally:
        mappings.close()
        for fd in fds:
            os.close(fd)
    assert len(mappings) == 0
