"""Crash-debris collection (``veloc.storage.debris``): what a SIGKILLed writer leaves is
collected, a temporary file a live process is writing is not, a committed copy never is.

Writers are real processes: a child that opens a temporary file with ``fileio.temp_name``
and keeps writing to it until it is killed.
"""
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import veloc
from veloc.storage import debris
from veloc.storage.fileio import boot_tag, temp_name, writer_tag
from veloc.storage.levels import LevelStore

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent.parent

WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from veloc.storage.fileio import temp_name
    tmp = temp_name(Path(sys.argv[1]))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    print(tmp, flush=True)
    while True:                      # a copy in progress: it never reaches its rename
        os.write(fd, b"x" * 65536)
        time.sleep(0.01)
""")


class Writer:
    """A child process writing a temporary file for ``final`` until killed."""

    def __init__(self, final):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], env=env,
                                     stdout=subprocess.PIPE, text=True)
        self.tmp = Path(self.proc.stdout.readline().strip())
        assert self.tmp.exists(), self.tmp

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def writers():
    started = []
    yield lambda final: started.append(Writer(final)) or started[-1]
    for w in started:
        if w.proc.poll() is None:
            w.kill()


def cfg_for(dirs, **extra):
    return {"scratch": str(dirs["scratch"]), "persistent": str(dirs["persistent"]), **extra}


def test_temp_names_carry_the_writer(tmp_path):
    tmp = temp_name(tmp_path / "r3.vck")
    assert tmp.name.startswith(".r3.vck.") and tmp.name.endswith(".tmp")
    assert writer_tag() in tmp.name and tmp.name.split(".")[3].split("-")[0] == boot_tag()
    assert debris.temp_target(tmp.name) == "r3.vck"
    assert debris.temp_target(".r3.vck.0a1b2c3d.tmp") == "r3.vck"        # older, untagged format
    assert debris.temp_target("r3.vck") is None and debris.temp_target(".r3.vck.tmp") is None
    assert not debris.writer_gone(tmp.name, time.time())                  # this process: alive


def test_liveness_rule(writers, tmp_path):
    w = writers(tmp_path / "r0.vck")
    name = w.tmp.name
    assert not debris.writer_gone(name, time.time())
    w.kill()
    assert debris.writer_gone(name, time.time())                          # killed: gone at once
    pid, start = name.split(".")[3].split("-")[1:]
    reused = name.replace(f"-{pid}-{start}.", f"-{os.getpid()}-{int(start) + 1}.")
    assert debris.writer_gone(reused, time.time())                        # a reused pid is not the writer
    foreign = name.replace(boot_tag(), "f" * 8 if boot_tag() != "f" * 8 else "e" * 8)
    now = time.time()
    assert not debris.writer_gone(foreign, now - 60, now)                 # another machine: wait
    assert debris.writer_gone(foreign, now - debris.FOREIGN_GRACE_S - 1, now)
    assert not debris.writer_gone(".r0.vck.0a1b2c3d.tmp", now - 60, now)
    assert debris.writer_gone(".r0.vck.0a1b2c3d.tmp", now - debris.FOREIGN_GRACE_S - 1, now)


def test_init_collects_a_killed_writers_debris_and_spares_live_and_committed(dirs, writers, caplog):
    cfg = cfg_for(dirs, scratch_versions=1)
    with veloc.init_single(0, cfg) as c:
        a = np.arange(1000, dtype=np.float64)
        c.protect("a", a)
        c.checkpoint("run", 1)
    store = LevelStore("scratch", dirs["scratch"])
    v1, v2 = store.version_dir("run", 1), store.version_dir("run", 2)
    committed = sorted(p.name for p in v1.iterdir())
    # a rank killed while writing v2: its rank file's temp and an uncommitted rank file
    v2.mkdir(parents=True)
    killed = writers(v2 / "r0.vck")
    killed.kill()
    (v2 / "r0.f.state.txt").write_bytes(b"y" * 5000)          # routed file, never committed
    live = writers(v2 / "r0.manifest.json")                    # e.g. a backend's manifest commit
    other = v2 / "r1.vck"                                      # another rank's file: not ours
    other.write_bytes(b"z" * 10)
    old_legacy = v2 / ".r0.vck.0a1b2c3d.tmp"
    old_legacy.write_bytes(b"w" * 100)
    os.utime(old_legacy, (0, 0))
    killed_bytes = killed.tmp.stat().st_size
    caplog.set_level(logging.INFO, logger="veloc.client")
    c = veloc.init_single(0, cfg)
    try:
        left = sorted(p.name for p in v2.iterdir())
        assert left == sorted([live.tmp.name, "r1.vck"]), left
        assert sorted(p.name for p in v1.iterdir()) == committed
        c.protect("a", np.zeros(1000))
        assert c.restart_test("run") == 1
        c.restart("run", 1)
        assert live.proc.poll() is None and live.tmp.exists()
    finally:
        c.finalize()
    msg = [r.getMessage() for r in caplog.records if "debris" in r.getMessage()]
    assert msg and "collected 3 file(s)" in msg[0] and str(killed_bytes + 5000 + 100) in msg[0], msg
    live.kill()
    tally = debris.collect_rank_scratch(store, 0)            # its writer is gone now
    assert tally.files == 1 and not live.tmp.exists()


def test_recycle_pool_keeps_its_size_and_drops_ranks_the_job_lacks(tmp_path):
    from veloc.storage.levels import RecyclePool
    store = LevelStore("scratch", tmp_path)
    pool = RecyclePool(tmp_path, keep_per_rank=2)
    pool.dir.mkdir()
    for name in ["r0.aaaa.vck", "r0.bbbb.vck", "r0.cccc.vck", "r1.aaaa.vck", "r7.aaaa.vck"]:
        (pool.dir / name).write_bytes(b"p" * 10)
    tally = debris.collect_rank_scratch(store, 0, pool, nranks=2)
    left = sorted(p.name for p in pool.dir.iterdir())
    assert left == ["r0.aaaa.vck", "r0.bbbb.vck", "r1.aaaa.vck"] and tally.files == 2


def test_engine_collects_partner_erasure_and_persistent_debris_at_restart(dirs, writers, caplog):
    cfg = cfg_for(dirs)
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.ones(100))
        for v in (1, 2):
            c.checkpoint("run", v)
    node = veloc.config.node_id()
    base = dirs["scratch"]
    pers = LevelStore("persistent", dirs["persistent"])
    # persistent: v0 uncommitted (older than complete v2: debris), v3 uncommitted (newer:
    # maybe another node still flushing it), a dead writer's temp in v2
    for v in (0, 3):
        pers.version_dir("run", v).mkdir()
        (pers.version_dir("run", v) / "r0.vck").write_bytes(b"d" * 64)
    dead = writers(pers.version_dir("run", 2) / "r0.vck")
    dead.kill()
    # partner tree of another node: committed copy untouched, uncommitted files collected
    ptree = LevelStore("partner", base / ".partner" / "other")
    for v in (1, 2):
        ptree.version_dir("run", v).mkdir(parents=True)
    src = LevelStore("scratch", base).read_manifest("run", 2, 0)
    (ptree.version_dir("run", 2) / "r0.vck").write_bytes(
        (LevelStore("scratch", base).version_dir("run", 2) / "r0.vck").read_bytes())
    ptree.commit_manifest(src.copy_for("partner"))
    (ptree.version_dir("run", 1) / "r5.vck").write_bytes(b"q" * 32)
    transfer = writers(ptree.version_dir("run", 1) / "r6.vck")     # a partner transfer killed midway
    transfer.kill()
    # erasure: uncommitted folder (no group record) removed; committed one untouched
    etree = base / ".erasure" / "run"
    (etree / "v1").mkdir(parents=True)
    (etree / "v1" / "s0.p0.par").write_bytes(b"e" * 128)
    (etree / "v2").mkdir()
    (etree / "v2" / "s0.p0.par").write_bytes(b"e" * 128)
    (etree / "v2" / "group.json").write_text("{}")
    caplog.set_level(logging.INFO)
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.zeros(100))
        assert c.restart_test("run") == 2
        c.restart("run", 2)
    assert not pers.version_dir("run", 0).exists()
    assert (pers.version_dir("run", 3) / "r0.vck").exists()
    assert not dead.tmp.exists() and pers.read_manifest("run", 2, 0) is not None
    assert not ptree.version_dir("run", 1).exists()
    assert ptree.read_manifest("run", 2, 0) is not None and (ptree.version_dir("run", 2) / "r0.vck").exists()
    assert not (etree / "v1").exists()
    assert sorted(p.name for p in (etree / "v2").iterdir()) == ["group.json", "s0.p0.par"]
    msgs = [r.getMessage() for r in caplog.records if f"node {node}'s engine" in r.getMessage()]
    assert msgs and "collected 5 file(s)" in msgs[0], msgs


def test_versioning_collects_older_uncommitted_scratch_files_only(dirs):
    cfg = cfg_for(dirs, scratch_versions=2)
    store = LevelStore("scratch", dirs["scratch"])
    with veloc.init_single(0, cfg) as c:
        c.protect("a", np.ones(100))
        c.checkpoint("run", 1)
        for v in (2, 9):     # failed writes of v2 (older) and of v9 (newer: could be in flight)
            store.version_dir("run", v).mkdir()
            (store.version_dir("run", v) / "r0.vck").write_bytes(b"u" * 16)
        c.checkpoint("run", 3)
        assert not store.version_dir("run", 2).exists()
        assert (store.version_dir("run", 9) / "r0.vck").exists()
        assert store.rank_versions("run", 0) == [1, 3]


CLAIMANT = textwrap.dedent("""
    import sys, time
    from veloc.storage.debris import claim_rank_scratch
    from veloc.storage.levels import LevelStore
    claim = claim_rank_scratch(LevelStore("scratch", sys.argv[1]), int(sys.argv[2]))
    print("claimed" if claim.fd is not None else "refused", flush=True)
    time.sleep(60)
""")


def test_a_live_client_of_the_same_rank_keeps_its_uncommitted_files(tmp_path, writers):
    """Another job on the same scratch with the same rank number is alive: its uncommitted
    files may be a checkpoint in progress, so only dead writers' temps are collected."""
    from veloc.storage.levels import RecyclePool
    store = LevelStore("scratch", tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    other = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(tmp_path), "0"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "claimed"
        vdir = store.version_dir("other_job", 4)
        vdir.mkdir(parents=True)
        (vdir / "r0.vck").write_bytes(b"in progress")
        dead = writers(vdir / "r0.vck")
        dead.kill()
        pool = RecyclePool(tmp_path, keep_per_rank=1)
        pool.dir.mkdir()
        for name in ("r0.aaaa.vck", "r0.bbbb.vck"):
            (pool.dir / name).write_bytes(b"p")
        claim = debris.claim_rank_scratch(store, 0, pool, nranks=1)
        assert claim.fd is None and claim.holder() == other.pid
        assert claim.tally.files == 1 and not dead.tmp.exists()
        assert (vdir / "r0.vck").exists() and len(list(pool.dir.iterdir())) == 2
        mine = debris.claim_rank_scratch(store, 1, pool, nranks=1)     # rank 1 is free here...
        assert mine.fd is not None
        mine.release()
    finally:
        other.kill()
        other.wait(10)
        other.stdout.close()
    claim = debris.claim_rank_scratch(store, 0, pool, nranks=1)       # ...and rank 0 now too
    try:
        assert claim.fd is not None and not (vdir / "r0.vck").exists()
        assert len(list(pool.dir.iterdir())) == 1
    finally:
        claim.release()


def test_newest_complete_needs_every_ranks_manifest(tmp_path):
    from veloc.storage.manifest import FileEntry, Manifest
    store = LevelStore("persistent", tmp_path)
    assert debris.newest_complete(store, "run") is None
    for version, ranks in ((1, (0, 1)), (2, (0, 1)), (3, (1,))):
        for rank in ranks:
            store.commit_manifest(Manifest("run", version, rank, 2, "n0", "persistent",
                                           files=[FileEntry(f"r{rank}.vck", 1, "regions")]))
    assert debris.newest_complete(store, "run") == 2          # v3 lacks rank 0
    store.commit_manifest(Manifest("run", 3, 0, 2, "n0", "persistent", files=[FileEntry("r0.vck", 1, "regions")]))
    assert debris.newest_complete(store, "run") == 3
