"""Size-agnostic collective tests; run under mpiexec by test_under_mpiexec.py (-n 2 and -n 4).

Every rank runs this pytest module; each test is collective over COMM_WORLD. Virtual
nodes come from VELOC_NODE_ID, set per rank by the driver (two ranks per node when n=4).
"""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import veloc
from veloc.errors import CheckpointError, ConfigError, RestartError
from veloc.storage.levels import LevelStore

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


@pytest.fixture
def cfg():
    base = comm.bcast(tempfile.mkdtemp(prefix="veloc-mpi-", dir="/dev/shm") if rank == 0 else None)
    pers = comm.bcast(tempfile.mkdtemp(prefix="veloc-mpi-p-") if rank == 0 else None)
    yield {"scratch": base + "/{node}", "persistent": pers, "scratch_versions": 3}
    comm.Barrier()
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(pers, ignore_errors=True)


def data(version):
    return np.arange(1000, dtype=np.float64) * (rank + 1) + version


def write_versions(cfg, versions, name="c"):
    with veloc.init(cfg, comm) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        for v in versions:
            a[:] = data(v)
            c.checkpoint(name, v)


def restart_newest(cfg, name="c", max_version=None, verify_on_read=False):
    with veloc.init(cfg, comm) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        c.verify_on_read = verify_on_read
        v = c.restart_test(name, max_version)
        if v is None:
            return None, None
        c.restart(name, v)
        assert np.array_equal(a, data(v))
        return v, c.last_restart.level


def my_file(cfg, version, level="scratch", name="c", what="vck"):
    from veloc.config import node_id
    root = Path(cfg["persistent"]) if level == "persistent" else Path(cfg["scratch"].format(node=node_id()))
    suffix = "vck" if what == "vck" else "manifest.json"
    return root / name / f"v{version}" / f"r{rank}.{suffix}"


def test_round_trip_all_ranks(cfg):
    write_versions(cfg, [1, 2])
    assert restart_newest(cfg) == (2, "scratch")
    assert restart_newest(cfg, max_version=1) == (1, "scratch")


def test_one_rank_missing_newest_everywhere_agrees_on_older(cfg):
    write_versions(cfg, [1, 2])
    if rank == size - 1:
        my_file(cfg, 2, what="manifest").unlink()
        LevelStore("persistent", cfg["persistent"]).uncommit("c", 2, rank)   # out of its node's record
    comm.Barrier()
    assert restart_newest(cfg) == (1, "scratch")


def test_corrupt_rank_uses_persistent_others_scratch(cfg):
    write_versions(cfg, [1])
    if rank == 0:
        path = my_file(cfg, 1)
        raw = bytearray(path.read_bytes())
        raw[-8] ^= 0xFF
        path.write_bytes(bytes(raw))
    comm.Barrier()
    v, level = restart_newest(cfg)
    assert v == 1 and level == ("persistent" if rank == 0 else "scratch")


def _flip_tail(path):
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_verify_on_read_corrupt_rank_rereads_from_persistent_others_keep_scratch(cfg):
    write_versions(cfg, [1])
    if rank == 0:
        _flip_tail(my_file(cfg, 1))
    comm.Barrier()
    v, level = restart_newest(cfg, verify_on_read=True)
    assert v == 1 and level == ("persistent" if rank == 0 else "scratch")


def test_verify_on_read_newest_corrupt_everywhere_on_one_rank_raises_everywhere(cfg):
    write_versions(cfg, [1, 2])
    if rank == size - 1:
        _flip_tail(my_file(cfg, 2))
        _flip_tail(my_file(cfg, 2, "persistent"))
    comm.Barrier()
    with veloc.init(cfg, comm) as c:
        a = np.zeros(1000)
        c.protect("a", a)
        c.verify_on_read = True
        assert c.restart_test("c") == 2
        with pytest.raises(RestartError, match=f"rank {size - 1} read a corrupt copy.*is now 1"):
            c.restart("c", 2)
        c.restart("c", 1)
        assert np.array_equal(a, data(1)) and c.last_restart.version == 1


def test_lost_node_scratch(cfg):
    write_versions(cfg, [3])
    from veloc.config import node_id
    lost = comm.bcast(node_id() if rank == size - 1 else None, root=size - 1)
    if rank == size - 1:
        shutil.rmtree(cfg["scratch"].format(node=lost))
    comm.Barrier()
    v, level = restart_newest(cfg)
    assert v == 3 and level == ("persistent" if node_id() == lost else "scratch")


def test_no_persistent_and_a_lost_rank_means_none(cfg):
    cfg = dict(cfg)
    del cfg["persistent"]
    write_versions(cfg, [1])
    if rank == 0:
        my_file(cfg, 1).unlink()
    comm.Barrier()
    assert restart_newest(cfg) == (None, None)


def test_restart_of_missing_version_raises_everywhere(cfg):
    write_versions(cfg, [1])
    with veloc.init(cfg, comm) as c:
        c.protect("a", np.zeros(1000))
        with pytest.raises(RestartError, match="cannot restart 'c' v5"):
            c.restart("c", 5)


def test_one_rank_discards_then_everyone_drops_it(cfg):
    write_versions(cfg, [1])
    with veloc.init(cfg, comm) as c:
        c.protect("a", np.zeros(1000))
        c.checkpoint_begin("c", 2)
        c.checkpoint_mem()
        if rank == 0:
            c.checkpoint_end(success=False)
        else:
            with pytest.raises(CheckpointError, match="discarded"):
                c.checkpoint_end(success=True)
        assert c.restart_test("c") == 1


def test_bad_scratch_on_one_rank_fails_init_everywhere(cfg):
    bad = dict(cfg)
    if rank == size - 1:
        blocker = Path(tempfile.mkdtemp()) / "file"
        blocker.write_text("x")
        bad["scratch"] = str(blocker / "sub")
    with pytest.raises(ConfigError, match="scratch directory" if rank == size - 1 else f"rank {size - 1}"):
        veloc.init(bad, comm)


def test_max_versions_keeps_the_last_complete_version(cfg):
    cfg = dict(cfg, max_versions=1)
    write_versions(cfg, [1, 2, 3, 4])
    pers = Path(cfg["persistent"]) / "c"
    comm.Barrier()
    kept = sorted(p.name for p in pers.iterdir())
    # v4 is kept; v3 only while another node's copy of v4 was still in flight at collection time
    assert kept in (["v4"], ["v3", "v4"]), kept


def test_module_failure_on_one_node_before_a_collective_module_raises_everywhere(cfg, monkeypatch):
    """Node of the last rank fails in checksum (before partner, a collective module): every
    rank gets the error instead of the other nodes waiting in the partner exchange."""
    from veloc.config import node_id
    from veloc.engine.modules.checksum import ChecksumModule
    failing = comm.bcast(node_id() if rank == size - 1 else None, root=size - 1)
    if node_id() == failing:
        def broken(self, cmd):
            raise OSError(5, "Input/output error (injected)")
        monkeypatch.setattr(ChecksumModule, "checkpoint", broken)
    cfg = dict(cfg, partner={"enabled": True})
    with veloc.init(cfg, comm) as c:
        c.protect("a", np.zeros(10))
        with pytest.raises(CheckpointError, match="checksum failed on c v1: .*injected"):
            c.checkpoint("c", 1)


def test_need_checkpoint_decisions_are_identical_on_every_rank(cfg):
    """Each rank sees different iteration, stall and persist times; one allreduce per window
    makes every rank take the same decisions, and k reacts to the slowest rank."""
    import time
    cfg = dict(cfg, policy={"mode": "auto", "overhead": "0.05", "warmup": "3", "mtbf": "3600"})
    decisions = []
    with veloc.init(cfg, comm) as c:
        for it in range(1, 61):
            time.sleep(0.001 * (1 + rank % 2) * (2 if 20 <= it < 35 else 1))
            go = c.need_checkpoint(it)
            decisions.append(go)
            if go:
                c.policy.record_snapshot(0.0004 * (rank + 1))
                c.policy.record_persist(0.002 * (rank + 1))
        k = c.policy.k
        last = c.policy.last_decision
    every = comm.allgather((decisions, k, last["Ti"], last["stall"]))
    assert all(e == every[0] for e in every)
    assert sum(decisions) >= 3 and decisions.index(True) == 3      # first call + a warm-up of 3
    assert last["stall"] == pytest.approx(0.0004 * size, rel=1e-6)  # the slowest rank's stall


def test_compressed_persistent_with_partner_lost_node_then_all_scratch(cfg):
    """[compress] next to [partner]: a lost node comes back raw from its partner copies;
    with every node's scratch gone, every rank reads its compressed persistent copy."""
    from veloc.config import node_id
    cfg = dict(cfg, compress={"enabled": "true", "codec": "zstd"}, partner={"enabled": "true"})
    write_versions(cfg, [1, 2])
    assert my_file(cfg, 2, "persistent").with_suffix(".vcz").exists()
    assert not my_file(cfg, 2, "persistent").exists()
    lost = comm.bcast(node_id() if rank == size - 1 else None, root=size - 1)
    comm.Barrier()
    if rank == size - 1:
        shutil.rmtree(cfg["scratch"].format(node=lost))
    comm.Barrier()
    assert restart_newest(cfg) == (2, "partner" if node_id() == lost else "scratch")
    nodes = set(comm.allgather(node_id()))
    if rank == 0:
        for node in nodes:
            shutil.rmtree(cfg["scratch"].format(node=node), ignore_errors=True)
    comm.Barrier()
    assert restart_newest(cfg) == (2, "persistent")
