"""One-pass restart: a rank file's digest checked while it is read into the protected
arrays (``RankFile.read_verified``; ``Client.verify_on_read``), and what happens when the
copy turns out corrupt: the version's next intact copy, or a RestartError naming the
version left, never silently wrong data."""
import numpy as np
import pytest

import veloc
from conftest import flip_bytes, rank0_file, two_versions_newest_corrupt
from veloc.storage.hashing import digest_file
from veloc.storage.rankfile import RankFile, build_header, write_rank_file
from veloc.errors import CorruptCheckpointError, RestartError


def _write(path, arrays):
    regions = [{"id": k, "kind": "array", "dtype": v.dtype.str, "shape": list(v.shape),
                "order": "F" if (v.flags.f_contiguous and not v.flags.c_contiguous) else "C",
                "nbytes": v.nbytes} for k, v in arrays.items()]
    header, infos, total = build_header("t", 1, 0, regions)
    views = [v.reshape(-1, order=r["order"]).view(np.uint8) for v, r in zip(arrays.values(), regions)]
    with open(path, "wb+") as f:
        write_rank_file(f.fileno(), header, infos, views, total)
    return digest_file(path)


def test_read_verified_fills_every_target_and_checks_the_whole_file(tmp_path):
    a, b = np.arange(70000.0), np.asfortranarray(np.arange(600, dtype=np.int32).reshape(20, 30))
    path = tmp_path / "r0.vck"
    digest = _write(path, {"a": a, "b": b})
    out_a, out_b = np.zeros_like(a), np.asfortranarray(np.zeros_like(b))
    with RankFile(path) as f:
        f.read_verified({"a": out_a, "b": out_b}, "xxh3_128", digest)
        with pytest.raises(CorruptCheckpointError, match="mismatch found while reading"):
            f.read_verified({"a": np.zeros_like(a)}, "xxh3_128", "0" * 32)
    assert np.array_equal(out_a, a) and np.array_equal(out_b, b)


def test_read_verified_hashes_the_regions_it_does_not_fill(tmp_path):
    a, b = np.arange(70000.0), np.arange(5000.0)
    path = tmp_path / "r0.vck"
    digest = _write(path, {"a": a, "b": b})
    with RankFile(path) as f:
        info = f.region("b")
    data = bytearray(path.read_bytes())
    data[info.offset + 8] ^= 0xFF                 # damage region b only
    path.write_bytes(bytes(data))
    out_a = np.zeros_like(a)
    with RankFile(path) as f, pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        f.read_verified({"a": out_a}, "xxh3_128", digest)
    assert np.array_equal(out_a, a)               # a itself was intact, the file was not


def test_read_into_goes_straight_into_the_array_or_through_the_mapping(tmp_path):
    a = np.arange(1000.0).reshape(10, 100)
    path = tmp_path / "r0.vck"
    _write(path, {"a": a})
    with RankFile(path) as f:
        info = f.region("a")
        c_order, f_order = np.zeros_like(a), np.asfortranarray(np.zeros_like(a))
        f.read_into(info, c_order)
        f.read_into(info, f_order)                # another memory order: copied from a mapping
        assert f._map is not None
    assert np.array_equal(c_order, a) and np.array_equal(f_order, a)


@pytest.fixture
def streamed(monkeypatch):
    calls = []
    real = RankFile.read_verified
    monkeypatch.setattr(RankFile, "read_verified", lambda self, *a: calls.append(self.path) or real(self, *a))
    return calls


def test_verify_on_read_reads_the_copy_once(node_cfg, dirs, streamed, monkeypatch):
    import veloc.storage.manifest
    hashed = []
    real = veloc.storage.manifest.digest_file
    monkeypatch.setattr(veloc.storage.manifest, "digest_file", lambda p, alg: hashed.append(p) or real(p, alg))
    a = np.arange(50000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        a[:] = -1
        c.verify_on_read = True
        assert c.restart_test("h") == 1 and hashed == [] and (a == -1).all()
        c.restart("h", 1)
        assert streamed == [rank0_file(dirs, "h", 1, "scratch")] and hashed == []
        assert c.last_restart.level == "scratch" and np.array_equal(a, np.arange(50000.0))


def test_verify_on_read_replaces_a_corrupt_copy_by_the_persistent_one(node_cfg, dirs, streamed):
    a = np.arange(50000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        flip_bytes(rank0_file(dirs, "h", 1, "scratch"))
        a[:] = -1
        c.verify_on_read = True
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        # the bad copy, read once; then the good one, unchanged since its flush (fingerprint), hashed as it is read
        assert streamed == [rank0_file(dirs, "h", 1, "scratch"), rank0_file(dirs, "h", 1, "persistent")]
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(50000.0))


def test_verify_on_read_with_no_intact_copy_left_names_the_older_version(node_cfg, dirs):
    a = np.arange(50000.0)
    with veloc.init_single(0, node_cfg) as c:
        two_versions_newest_corrupt(c, a, dirs)
        c.verify_on_read = True
        assert c.restart_test("h") == 2           # all but the digest is intact
        with pytest.raises(RestartError, match=r"v2.*no other intact copy of v2.*is now 1"):
            c.restart("h", 2)
        assert c.last_restart is None
        c.restart("h", 1)
        assert c.last_restart.version == 1 and np.array_equal(a, np.arange(50000.0))


def test_a_pickled_object_is_only_unpickled_from_checked_bytes(dirs, streamed):
    a, state = np.arange(50000.0), {"step": 7}
    with veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")}) as c:
        c.protect("a", a)
        c.protect("state", state, pickle=True)
        c.checkpoint("h", 1)
        state["step"] = 8
        a[:] = -1
        c.verify_on_read = True
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        assert state == {"step": 7} and np.array_equal(a, np.arange(50000.0)) and streamed == []
        state["step"] = 9
        a[:] = -1
        assert c.restart_test("h") == 1
        flip_bytes(rank0_file(dirs, "h", 1, "scratch"))
        with pytest.raises(RestartError, match="mismatch on read"):
            c.restart("h", 1)
        assert state == {"step": 9} and (a == -1).all()     # checked first: nothing touched


def test_the_phases_check_the_whole_file_when_one_region_is_read(dirs):
    a, b = np.arange(50000.0), np.arange(3000.0)
    with veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")}) as c:
        c.protect("a", a)
        c.protect("b", b)
        c.checkpoint("h", 1)
        vck = rank0_file(dirs, "h", 1, "scratch")
        with RankFile(vck) as f:
            offset = f.region("b").offset
        data = bytearray(vck.read_bytes())
        data[offset] ^= 0xFF
        vck.write_bytes(bytes(data))
        c.restart_begin("h", 1)                   # no restart_test: the read checks the digest
        with pytest.raises(RestartError, match="mismatch found while reading"):
            c.recover_mem(["a"])
        c.restart_end(success=False)
        assert c.last_restart is None


class _FakeDeviceArray:
    """Stands in for a cupy array (the module name and ``__cuda_array_interface__`` make
    veloc treat it as one): ``get()`` copies to the host, ``set(host)`` back."""
    __module__ = "cupy._core.core"
    __cuda_array_interface__ = {}

    def __init__(self, host):
        self.host = host
        self.shape, self.dtype, self.flags, self.nbytes = host.shape, host.dtype, host.flags, host.nbytes
        self.sets = 0

    def get(self, order="C"):
        return self.host.copy(order=order)

    def set(self, host):
        self.sets += 1
        self.host[...] = host


def test_a_device_array_is_set_only_from_checked_bytes(dirs, streamed):
    g = _FakeDeviceArray(np.arange(40000, dtype=np.float32))
    with veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")}) as c:
        c.protect("g", g)
        c.checkpoint("h", 1)
        g.host[:] = -1
        c.verify_on_read = True
        assert c.restart_test("h") == 1
        c.restart("h", 1)
        assert len(streamed) == 1 and g.sets == 1 and np.array_equal(g.host, np.arange(40000, dtype=np.float32))
        g.host[:] = -1
        assert c.restart_test("h") == 1
        flip_bytes(rank0_file(dirs, "h", 1, "scratch"))
        with pytest.raises(RestartError, match="mismatch found while reading"):
            c.restart("h", 1)
        assert g.sets == 1 and (g.host == -1).all()         # the staging copy was refused


def test_verify_on_read_still_hashes_routed_files(node_cfg, dirs):
    """A routed file is handed over by path, never read by restart: restart_test checks its
    digest even with verify_on_read, and a damaged one falls back to persistent."""
    with veloc.init_single(0, node_cfg) as c:
        c.checkpoint_begin("files", 1)
        with open(c.route_file("state.txt"), "w") as f:
            f.write("hello world, version one")
        c.checkpoint_end()
        scratch_copy = next(p for p in rank0_file(dirs, "files", 1, "scratch").parent.iterdir() if "state" in p.name)
        scratch_copy.write_bytes(b"HELLO world, version one")       # same size, other bytes
        c.verify_on_read = True
        assert c.restart_test("files") == 1
        c.restart_begin("files", 1)
        with open(c.route_file("state.txt")) as f:
            assert f.read() == "hello world, version one"
        c.restart_end()
        assert c.last_restart.level == "persistent"


def _lose_scratch(dirs):
    import shutil
    for node in dirs["scratch"].iterdir():
        shutil.rmtree(node)


def test_an_unchanged_persistent_copy_is_read_and_hashed_in_one_pass(node_cfg, dirs, streamed, monkeypatch):
    """The flush records the fingerprint of the copy it wrote; after the node lost its
    scratch, restart_test hashes nothing and the read checks the digest."""
    import veloc.storage.manifest
    hashed = []
    real_digest = veloc.storage.manifest.digest_file
    monkeypatch.setattr(veloc.storage.manifest, "digest_file",
                        lambda path, alg: hashed.append(path) or real_digest(path, alg))
    a = np.arange(50000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
    _lose_scratch(dirs)
    a[:] = -1
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        assert c.restart_test("h") == 1 and hashed == []
        c.restart("h", 1)
        assert streamed == [rank0_file(dirs, "h", 1, "persistent")]
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(50000.0))


def test_a_persistent_copy_rewritten_after_its_flush_is_hashed_first_and_skipped(node_cfg, dirs, monkeypatch):
    """Any write to the persistent copy changes its fingerprint: restart_test hashes it,
    finds it corrupt and falls back to the older version before any array is touched."""
    a = np.arange(50000.0)
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        a += 1
        c.checkpoint("h", 2)
    _lose_scratch(dirs)
    flip_bytes(rank0_file(dirs, "h", 2, "persistent"))
    a[:] = -1
    with veloc.init_single(0, node_cfg) as c:
        c.protect("a", a)
        assert c.restart_test("h") == 1
        assert (a == -1).all()
        c.restart("h", 1)
        assert np.array_equal(a, np.arange(50000.0))
