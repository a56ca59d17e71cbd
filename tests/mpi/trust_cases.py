"""Regression cases for the trust invariants; run under mpiexec by test_under_mpiexec.py.

Every rank runs this pytest module; each test is collective over COMM_WORLD and works for
any number of ranks and virtual nodes (VELOC_NODE_ID per rank). Failures are injected
at the exact step the fault-injection campaign found them (a full scratch while a rank
commits its manifest, a partner transfer or an erasure encode that dies after the data
moved), so each case is deterministic.
"""
import errno
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import veloc
from veloc.config import node_id
from veloc.storage.levels import LevelStore
from veloc.errors import CheckpointError

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
nodes = sorted(set(comm.allgather(node_id())))
last_node = comm.bcast(node_id() if rank == size - 1 else None, root=size - 1)


@pytest.fixture
def cfg():
    base = comm.bcast(tempfile.mkdtemp(prefix="veloc-trust-", dir="/dev/shm") if rank == 0 else None)
    pers = comm.bcast(tempfile.mkdtemp(prefix="veloc-trust-p-") if rank == 0 else None)
    yield {"scratch": base + "/{node}", "persistent": pers, "scratch_versions": 1, "max_versions": 1}
    comm.Barrier()
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(pers, ignore_errors=True)


def state(version, run=0):
    return np.arange(512, dtype=np.float64) * (rank + 1) + version + 1000 * run


def write(cfg, versions, run=0, restart=False):
    """One job: optionally restart, then checkpoint ``versions``; returns the restored version."""
    with veloc.init(cfg, comm) as c:
        a = np.zeros(512)
        c.protect("a", a)
        restored = None
        if restart:
            restored = c.restart_test("t")
            if restored is not None:
                c.restart("t", restored)
        for v in versions:
            a[:] = state(v, run)
            c.checkpoint("t", v)
    return restored


def restore(cfg):
    """``(version, level, data matches which run or None)`` of a fresh restart."""
    with veloc.init(cfg, comm) as c:
        a = np.zeros(512)
        c.protect("a", a)
        v = c.restart_test("t")
        if v is None:
            return None, None, None
        c.restart("t", v)
        run = next((r for r in range(3) if np.array_equal(a, state(v, r))), None)
        return v, c.last_restart.level, run


def checkpoint_fails(cfg, version, match):
    """One job whose checkpoint of ``version`` must raise a CheckpointError matching ``match``
    on every rank."""
    with veloc.init(cfg, comm) as c:
        a = np.zeros(512)
        c.protect("a", a)
        a[:] = state(version)
        with pytest.raises(CheckpointError, match=match):
            c.checkpoint("t", version)


def lose_node(cfg, node):
    """Delete the whole scratch folder of virtual node ``node`` (its first rank does)."""
    first = min(r for r, n in enumerate(comm.allgather(node_id())) if n == node)
    comm.Barrier()
    if rank == first:
        shutil.rmtree(cfg["scratch"].format(node=node))
    comm.Barrier()


def test_full_scratch_at_manifest_commit_raises_everywhere_names_the_rank(cfg, monkeypatch):
    """Bug: ENOSPC while the last rank committed its scratch manifest escaped as a raw
    OSError on that rank only, and the others waited forever in the agreement."""
    write(cfg, [1])
    real = LevelStore.commit_manifest

    def full(self, manifest):
        if manifest.version == 2 and self.level == "scratch":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest_path("t", 2, rank)))
        return real(self, manifest)

    if rank == size - 1:
        monkeypatch.setattr(LevelStore, "commit_manifest", full)
    with veloc.init(cfg, comm) as c:
        c.protect("a", np.zeros(512))
        with pytest.raises(CheckpointError) as info:
            c.checkpoint("t", 2)
    text = str(info.value)
    assert f"rank {size - 1}" in text and "No space left on device" in text, text
    assert "r%d.manifest.json" % (size - 1) in text, text
    monkeypatch.undo()
    assert restore(cfg)[:2] == (1, "scratch")


def test_failure_in_user_code_path_is_a_veloc_error_everywhere(cfg, monkeypatch):
    """Not only OS errors: anything that goes wrong inside checkpoint() on one rank is a
    CheckpointError on every rank, and the version is discarded everywhere."""
    write(cfg, [1])
    from veloc.regions import Region
    real = Region.snapshot

    def broken(self):
        raise MemoryError("cannot map the region (injected)")

    if rank == 0:
        monkeypatch.setattr(Region, "snapshot", broken)
    with veloc.init(cfg, comm) as c:
        c.protect("a", np.zeros(512))
        with pytest.raises(CheckpointError, match="rank 0.*injected"):
            c.checkpoint("t", 2)
    monkeypatch.setattr(Region, "snapshot", real)
    assert restore(cfg)[:2] == (1, "scratch")


def test_fresh_run_supersedes_an_old_runs_higher_versions(cfg):
    """Bug: a fresh run's v20 was deleted by versioning at once because an earlier run of
    the same name had v600, and a restart went back to the old run."""
    write(cfg, [598, 600], run=0)
    write(cfg, [20], run=1)            # did not restart
    assert restore(cfg) == (20, "scratch", 1)
    write(cfg, [40], run=1)
    assert restore(cfg) == (40, "scratch", 1)
    comm.Barrier()
    left = sorted(p.name for p in (Path(cfg["persistent"]) / "t").iterdir())
    # v20 only while another node's copy of v40 was still in flight at collection time
    assert left in (["v40"], ["v20", "v40"]), left


def test_restarted_run_supersedes_the_crashed_runs_orphans(cfg):
    """The crashed run left v3 on every rank but the last: the restart goes back to v2,
    and the next run's own v3 must not be mixed with the orphan copies."""
    cfg = dict(cfg, scratch_versions=2, max_versions=2)
    write(cfg, [1, 2, 3], run=0)
    if rank == size - 1:
        (Path(cfg["scratch"].format(node=node_id())) / "t" / "v3" / f"r{rank}.manifest.json").unlink()
        LevelStore("persistent", cfg["persistent"]).uncommit("t", 3, rank)     # out of its node's record
    comm.Barrier()
    assert write(cfg, [3, 4], run=1, restart=True) == 2
    assert restore(cfg) == (4, "scratch", 1)


def test_partner_keeps_the_last_version_when_the_next_transfer_dies(cfg, monkeypatch):
    """Bug: with scratch_versions = 1 the partner copy of v1 was uncommitted before v2's
    was committed; a transfer dying in between, then a lost node, lost v1 for good."""
    if len(nodes) < 2:
        pytest.skip("needs two virtual nodes")
    cfg = dict(cfg, partner={"enabled": True})
    del cfg["persistent"]
    write(cfg, [1])
    from veloc.redundancy import transfer
    real = transfer.IncomingFile.commit

    def dies(self, *args, **kwargs):
        if "/v2/" in str(self.path):
            raise OSError(errno.EIO, "Input/output error (injected mid-transfer)", str(self.path))
        return real(self, *args, **kwargs)

    if node_id() == last_node:
        monkeypatch.setattr(transfer.IncomingFile, "commit", dies)
    checkpoint_fails(cfg, 2, "injected mid-transfer")
    monkeypatch.undo()
    # the node whose partner copies the failing node holds loses its own scratch
    owner = None
    if rank == size - 1:
        owner, = [p.name for p in (Path(cfg["scratch"].format(node=last_node)) / ".partner").iterdir()]
    lose_node(cfg, comm.bcast(owner, root=size - 1))
    v, level, run = restore(cfg)
    assert (v, run) == (1, 0)


def test_xor_keeps_the_last_version_when_the_next_encode_dies(cfg, monkeypatch):
    """Bug: with scratch_versions = 1 the oldest parity was taken as the victim before the
    new parity was committed; an encode dying in between, then a lost node, lost v1."""
    if len(nodes) < 3:
        pytest.skip("XOR needs three or more virtual nodes")
    cfg = dict(cfg, erasure={"enabled": True, "scheme": "xor", "group_size": len(nodes)})
    del cfg["persistent"]
    write(cfg, [1])
    from veloc.redundancy.striping import GroupStore
    real = GroupStore.commit

    def dies(self, record, *args, **kwargs):
        if record.version == 2:
            raise OSError(errno.EIO, "Input/output error (injected before the parity commit)")
        return real(self, record, *args, **kwargs)

    if node_id() == last_node:
        monkeypatch.setattr(GroupStore, "commit", dies)
    checkpoint_fails(cfg, 2, "injected before the parity commit")
    monkeypatch.undo()
    lose_node(cfg, nodes[0])
    v, level, run = restore(cfg)
    assert (v, run) == (1, 0)
