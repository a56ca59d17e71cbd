"""The client in one process (``init_single`` / ``Ckpt``): API contract and bad input.

These run without mpiexec (mpi4py starts as a singleton on COMM_SELF).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import veloc
from conftest import flip_bytes
from veloc.errors import CheckpointError, ConfigError, RestartError


@pytest.fixture
def cfg(dirs):
    return {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"])}


def vck(dirs, name, version, rank=0, level="scratch"):
    root = dirs["persistent"] if level == "persistent" else next(dirs["scratch"].iterdir())
    return root / name / f"v{version}" / f"r{rank}.vck"


def test_round_trip_in_place(cfg):
    c = veloc.init_single(0, cfg)
    grid = np.random.default_rng(0).random((64, 32))
    it = np.array([7], dtype=np.int64)
    c.protect("grid", grid)
    c.protect(1, it)
    c.protect("meta", {"lr": 0.1, "tags": ["a"]}, pickle=True)
    assert c.restart_test("sim") is None
    c.checkpoint("sim", 7)
    saved = grid.copy()
    grid[:] = -1
    it[0] = 0
    assert c.restart_test("sim") == 7
    c.restart("sim", 7)
    assert np.array_equal(grid, saved) and it[0] == 7
    assert c.recovered["meta"] == {"lr": 0.1, "tags": ["a"]}
    assert c.last_restart == veloc.RestartInfo("sim", 7, "scratch")
    c.finalize()
    c.finalize()   # idempotent
    with pytest.raises(CheckpointError, match="finalized"):
        c.checkpoint("sim", 8)


def test_phases_and_recover_size(cfg):
    with veloc.init_single(3, cfg) as c:
        a = np.arange(100, dtype=np.float32)
        c.protect(0, a)
        c.checkpoint_begin("ph", 1)
        c.checkpoint_mem()
        c.checkpoint_end()
        assert c.checkpoint_finished()
        c.restart_begin("ph", 1)
        assert c.recover_size(0) == 400
        with pytest.raises(RestartError, match="not in ph v1"):
            c.recover_size(9)
        c.recover_mem([0])
        c.restart_end()


def test_file_based_mode(cfg):
    with veloc.init_single(0, cfg) as c:
        c.checkpoint_begin("files", 2)
        path = c.route_file("/some/where/state-2.txt")
        with open(path, "w") as f:
            f.write("hello")
        c.checkpoint_end()
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert c.restart_test("files") == 2
        c.restart_begin("files", 2)
        with open(c.route_file("state-2.txt")) as f:
            assert f.read() == "hello"
        with pytest.raises(RestartError, match="no routed file"):
            c.route_file("other.txt")
        c.restart_end()


def test_routed_file_never_written_is_an_error(cfg):
    with veloc.init_single(0, cfg) as c:
        c.checkpoint_begin("files", 1)
        c.route_file("x.dat")
        with pytest.raises(CheckpointError, match="nothing was written"):
            c.checkpoint_end()
        assert c.restart_test("files") is None


def test_bad_calls_are_clear_errors(cfg):
    with veloc.init_single(0, cfg) as c:
        a = np.zeros(4)
        c.protect("a", a)
        with pytest.raises(CheckpointError, match="without checkpoint_begin"):
            c.checkpoint_end()
        with pytest.raises(CheckpointError, match="without checkpoint_begin"):
            c.checkpoint_mem()
        with pytest.raises(CheckpointError, match="invalid checkpoint name"):
            c.checkpoint("../etc", 1)
        with pytest.raises(CheckpointError, match="non-negative"):
            c.checkpoint("ok", -3)
        c.checkpoint_begin("ok", 1)
        with pytest.raises(CheckpointError, match="still open"):
            c.checkpoint_begin("ok", 2)
        c.checkpoint_end(success=False)
        with pytest.raises(CheckpointError, match="not protected"):
            c.unprotect("nope")
        with pytest.raises(RestartError, match="cannot restart"):
            c.restart("ok", 1)
        with pytest.raises(RestartError, match="without restart_begin"):
            c.recover_mem()
        with pytest.raises(CheckpointError, match="nothing to commit"):
            c.checkpoint_begin("ok", 3)
            c.checkpoint_end()
    with pytest.raises(ConfigError, match="unique_id"):
        veloc.init_single(-1, cfg)


def test_shape_mismatch_touches_nothing(cfg):
    with veloc.init_single(0, cfg) as c:
        a, b = np.arange(10.0), np.arange(3)
        c.protect("a", a)
        c.protect("b", b)
        c.checkpoint("m", 1)
        c.protect("b", np.zeros(4, dtype=np.int64))   # re-protect replaces, with another shape
        a[:] = 5
        with pytest.raises(RestartError, match="region 'b'.*protect an array of the checkpointed"):
            c.restart("m", 1)
        assert (a == 5).all()    # validated before any array was written
        c.unprotect("b")
        c.protect("new", np.zeros(1))
        with pytest.raises(RestartError, match="'new' is not in m v1"):
            c.restart("m", 1)


def test_pickle_only_when_asked(cfg):
    with veloc.init_single(0, cfg) as c:
        c.protect("o", {"k": 1}, pickle=True)
        c.checkpoint("p", 1)
    with veloc.init_single(0, cfg) as c:
        c.protect("o", np.zeros(1))          # an array now: the pickled bytes are not loaded
        with pytest.raises(RestartError, match="pickled object"):
            c.restart("p", 1)
        assert c.recovered == {}


def test_fallback_to_older_version_without_persistent(dirs):
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "scratch_versions": 0}     # keep all three
    with veloc.init_single(0, cfg) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        for v in (1, 2, 3):
            a[:] = v
            c.checkpoint("f", v)
    path = vck(dirs, "f", 3)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x55
    path.write_bytes(bytes(data))
    with veloc.init_single(0, cfg) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        assert c.restart_test("f") == 2
        assert c.restart_test("f", max_version=1) == 1
        c.restart("f", 2)
        assert (a == 2).all() and c.last_restart.level == "scratch"


def test_corrupt_scratch_restores_from_persistent(cfg, dirs):
    with veloc.init_single(0, cfg) as c:
        a = np.arange(5000.0)
        c.protect("a", a)
        c.checkpoint("q", 1)
    path = vck(dirs, "q", 1)
    data = bytearray(path.read_bytes())
    data[5000] ^= 1
    path.write_bytes(bytes(data))
    with veloc.init_single(0, cfg) as c:
        b = np.zeros(5000)
        c.protect("a", b)
        assert c.restart_test("q") == 1
        c.restart("q", 1)
        assert np.array_equal(b, np.arange(5000.0)) and c.last_restart.level == "persistent"
    # read in place: nothing was copied back to scratch, whose bad copy is still refused
    with veloc.init_single(0, {"scratch": cfg["scratch"]}) as c:
        assert c.restart_test("q") is None


def test_lost_scratch_reads_persistent_in_place_and_routed_files_come_back(cfg, dirs, monkeypatch):
    """After losing scratch, a rank file alone is read where it is on persistent, hashed
    once (by restart_test); a version with routed files is brought back to scratch."""
    import shutil
    from veloc.storage.rankfile import RankFile
    opened, hashed = [], []
    real_init, real_digest = RankFile.__init__, RankFile.digest
    monkeypatch.setattr(RankFile, "__init__", lambda self, path: opened.append(path) or real_init(self, path))
    monkeypatch.setattr(RankFile, "digest", lambda self, alg: hashed.append(self.path) or real_digest(self, alg))
    with veloc.init_single(0, cfg) as c:
        a = np.arange(3000.0)
        c.protect("a", a)
        c.checkpoint("p", 1)
        c.checkpoint_begin("p", 2)
        with open(c.route_file("notes.txt"), "w") as f:
            f.write("v2")
        c.checkpoint_mem()
        c.checkpoint_end()
    shutil.rmtree(dirs["scratch"])
    with veloc.init_single(0, cfg) as c:
        b = np.zeros(3000)
        c.protect("a", b)
        opened.clear()
        assert c.restart_test("p", max_version=1) == 1
        c.restart("p", 1)
        assert np.array_equal(b, np.arange(3000.0)) and c.last_restart.level == "persistent"
        assert opened[-1] == vck(dirs, "p", 1, level="persistent") and hashed == []
        assert not (next(dirs["scratch"].iterdir()) / "p" / "v1" / "r0.vck").exists()
        b[:] = 0
        assert c.restart_test("p") == 2
        c.restart_begin("p", 2)
        routed = c.route_file("notes.txt")
        assert routed.startswith(str(dirs["scratch"])) and open(routed).read() == "v2"
        c.recover_mem()
        c.restart_end()
        assert np.array_equal(b, np.arange(3000.0)) and c.last_restart.level == "persistent"


def test_versioning_keeps_newest(cfg, dirs):
    cfg = dict(cfg, scratch_versions=2, max_versions=1)
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.zeros(100))
        for v in range(1, 6):
            c.checkpoint("gc", v)
    scratch_root = next(dirs["scratch"].iterdir())
    assert sorted(p.name for p in (scratch_root / "gc").iterdir()) == ["v4", "v5"]
    assert sorted(p.name for p in (dirs["persistent"] / "gc").iterdir()) == ["v5"]
    assert len(list((scratch_root / ".recycle").iterdir())) >= 1


def test_discarded_version_is_gone(cfg):
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.zeros(10))
        c.checkpoint("d", 1)
        c.checkpoint_begin("d", 2)
        c.checkpoint_mem()
        c.checkpoint_end(success=False)
        assert c.restart_test("d") == 1


def test_unusable_scratch_is_a_config_error(dirs):
    blocker = dirs["tmp"] / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="scratch directory .*a-file"):
        veloc.init_single(0, {"scratch": str(blocker / "sub")})


def test_full_disk_fails_cleanly_and_keeps_old_versions(dirs):
    """RLIMIT_FSIZE makes writes past 1 MiB fail like a full disk (EFBIG), in a child."""
    code = f"""
import resource, signal, numpy as np, veloc
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
cfg = {{"scratch": {str(dirs['scratch'] / '{node}')!r}, "persistent": {str(dirs['persistent'])!r}}}
c = veloc.init_single(0, cfg)
a = np.ones(1000); c.protect("a", a); c.checkpoint("full", 1)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
c.protect("a", np.ones(1 << 20))
try:
    c.checkpoint("full", 2)
except veloc.CheckpointError as exc:
    print("ERROR:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
c.protect("a", a); a[:] = 0
print("TEST:", c.restart_test("full")); c.restart("full", 1); print("SUM:", a.sum())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERROR: rank 0: cannot write" in out.stdout and "earlier versions are untouched" in out.stdout
    assert "TEST: 1" in out.stdout and "SUM: 1000.0" in out.stdout


def test_ckpt_drop_in(cfg):
    ck = veloc.Ckpt(5, cfg)
    assert ck.restart_test("legacy", 0) < 0
    with pytest.raises(CheckpointError, match="assign Ckpt.protected"):
        ck.checkpoint("legacy", 1)
    ck.protected = {"step": 1, "w": [1.0, 2.0]}
    ck.checkpoint("legacy", 1)
    ck.protected = {"step": 2}
    ck.checkpoint("legacy", 2)
    assert ck.restart_test("legacy", 0) == 2
    assert ck.restart_test("legacy", 1) == 1
    ck.protected = None
    ck.restart("legacy", 1)
    assert ck.protected == {"step": 1, "w": [1.0, 2.0]}
    ck.finalize()


def test_checkpoint_waits_for_the_previous_version_only_without_a_recycled_file(dirs):
    """Async policy: versions older than the previous one are always awaited; the previous
    one only when no recycled scratch file is ready for this rank."""
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "scratch_versions": 1}
    with veloc.init_single(0, cfg) as c:
        c.writer.prepare_enabled = False      # only recycled files in the pool
        c.protect("a", np.zeros(1000))
        real_host, calls = c.host, []

        class Recorder:
            def drain(self, keep=0):
                calls.append(keep)

        c.host = Recorder()
        c._wait_for_buffers()
        assert calls == [1, 0]            # empty pool: wait for everything
        c.host = real_host
        for v in (1, 2, 3):
            c.checkpoint("p", v)
        assert c.pool.has(0)
        calls.clear()
        c.host = Recorder()
        c._wait_for_buffers()
        assert calls == [1]               # a recycled file is ready: the previous version may still run
        c.host = real_host


def test_restart_reads_and_hashes_an_unchanged_copy_in_one_pass(cfg, dirs, monkeypatch):
    """restart_test hashes no scratch file that is unchanged since the checksum module
    hashed it (its fingerprint matches); restart then checks the digest while reading
    (one pass). A file rewritten after that hash is hashed in full by restart_test, which
    then picks the next intact copy; a file rewritten after restart_test is caught by the
    read, which refills the array from the persistent copy."""
    import veloc.storage.manifest
    from veloc.storage.rankfile import RankFile
    hashed, streamed = [], []
    real_digest, real_stream = veloc.storage.manifest.digest_file, RankFile.read_verified
    monkeypatch.setattr(veloc.storage.manifest, "digest_file",
                        lambda path, alg: hashed.append(path) or real_digest(path, alg))
    monkeypatch.setattr(RankFile, "read_verified",
                        lambda self, *a: streamed.append(self.path) or real_stream(self, *a))
    a = np.arange(4096.0)
    with veloc.init_single(0, cfg) as c:
        c.protect("a", a)
        c.checkpoint("h", 1)
        c.checkpoint("h", 2)
        path = vck(dirs, "h", 1)
        a[:] = 0
        assert c.restart_test("h") == 2 and hashed == []
        c.restart("h", 2)
        assert np.array_equal(a, np.arange(4096.0)) and streamed == [vck(dirs, "h", 2)]
        flip_bytes(vck(dirs, "h", 2))          # rewritten after the checksum: restart_test hashes it
        assert c.restart_test("h") == 2 and hashed      # from persistent
        assert c.restart_test("h", 1) == 1
        flip_bytes(path)                       # rewritten after restart_test
        a[:] = 0
        c.restart("h", 1)
        # the corrupt scratch copy was read, then the persistent one, unchanged since the
        # flush recorded its fingerprint, was read and hashed in one pass as well
        assert streamed[-2] == path and streamed[-1].parent.parent.parent.name == "persistent"
        assert c.last_restart.level == "persistent" and np.array_equal(a, np.arange(4096.0))
