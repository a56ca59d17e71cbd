"""The backend's journal (veloc_backend.journal) and journaled work queue (veloc_backend.workqueue)."""
import json
import threading
import time

import pytest
from veloc.work_item import WorkItem
from veloc_backend.journal import Journal
from veloc_backend import workqueue as wq
pytestmark = pytest.mark.timeout(60)


def item(label, rank=0, size=1, order="engine"):
    """Rank ``rank``'s item (of ``size`` local ranks) for ``label`` = "name/version"."""
    name, version = label.split("/")
    out = WorkItem.command("CHECKPOINT", name, int(version), rank=rank, nranks=size,
                           local_ranks=range(size), session="t", seq=1)
    return out if order == "engine" else out.replace(order=order)


def G(label):
    """The group of ``label``'s items."""
    return item(label).group


def test_add_done_replay(tmp_path):
    path = tmp_path / "j" / "n0.journal"
    j = Journal(path)
    x1, x2, x3, x4 = (item(f"x/{n}") for n in (1, 2, 3, 4))
    a = j.add(x1)
    b = j.add(x2)
    c = j.add(x3)
    j.done(b)
    assert [i for i, _ in j.pending()] == [a, c]
    # no close(): as if the backend was killed
    j2 = Journal(path)
    assert j2.pending() == [(a, x1), (c, x3)]
    d = j2.add(x4)
    assert d > c                           # ids never collide with replayed ones
    j2.done([a, c, d])
    j2.close()
    assert Journal(path).pending() == []
    with pytest.raises(TypeError, match="WorkItem"):
        j2.add({"x": 1})


def test_torn_last_line_and_garbage_are_skipped(tmp_path, caplog):
    path = tmp_path / "n0.journal"
    j = Journal(path)
    j.add(item("x/1"))
    with open(path, "ab") as f:
        f.write(b'{"op":"add","id":7,"it')          # crash during a write
    j2 = Journal(path)
    assert j2.pending() == [(1, item("x/1"))]
    j2.add(item("x/2"))
    assert [it for _, it in Journal(path).pending()] == [item("x/1"), item("x/2")]
    bad_item = dict(item("x/3").to_wire(), rank=-5)
    with open(path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"op": "weird", "id": 99}).encode() + b"\n"
                + json.dumps({"op": "add", "id": 100, "item": bad_item}).encode() + b"\n"
                + json.dumps({"op": "add", "id": 101, "item": [1]}).encode() + b"\n")
    caplog.clear()
    j3 = Journal(path)
    assert [it for _, it in j3.pending()] == [item("x/1"), item("x/2")]
    assert "item field 'rank'" in caplog.text and "line 5" in caplog.text
    assert j3.add(item("x/4")) == 102                       # ids stay past every line seen


def test_journal_of_the_previous_version_still_replays(tmp_path):
    """A journal line as the backend wrote it before items were typed (pid, verified: null)."""
    path = tmp_path / "old.journal"
    old = {"kind": "VERIFY", "name": "heat", "version": 4, "rank": 1, "nranks": 2, "local_ranks": [0, 1],
           "session": "0f3a9c12be77", "group": "heat/v4/VERIFY/0f3a9c12be77-9", "group_size": 2,
           "order": "engine", "key": "heat/v4/VERIFY/0f3a9c12be77-9/r1", "job_nodes": ["n0"],
           "verified": None, "pid": 4242}
    path.write_text(json.dumps({"op": "add", "id": 3, "item": old}) + "\n")
    ((rid, got),) = Journal(path).pending()
    assert rid == 3 and got.kind == "VERIFY" and got.pid == 4242 and got.local_ranks == (0, 1)
    assert got.to_wire() == {k: v for k, v in old.items() if v is not None}


def test_compaction_keeps_only_pending(tmp_path):
    path = tmp_path / "n0.journal"
    j = Journal(path, compact_every=10)
    ids = [j.add(item(f"n/{n}")) for n in range(50)]
    for i in ids[:45]:
        j.done(i)
    lines = path.read_text().splitlines()
    assert len(lines) < 20                            # compacted on the way
    assert [it.version for _, it in Journal(path).pending()] == [45, 46, 47, 48, 49]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_concurrent_appends(tmp_path):
    j = Journal(tmp_path / "c.journal", compact_every=7)

    def work(k):
        for n in range(50):
            i = j.add(item(f"k{k}/{n}"))
            if n % 2:
                j.done(i)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(Journal(tmp_path / "c.journal").pending()) == 100


# ------------------------------------------------------------------ queue

class Recorder:
    """Test executor: records batches, optionally slow or failing."""

    def __init__(self, delay=0.0, fail_groups=()):
        self.delay, self.fail_groups = delay, set(fail_groups)
        self.batches, self.active, self.max_active = [], 0, 0
        self.lock = threading.Lock()

    def run(self, batch):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if batch.group in self.fail_groups:
                raise RuntimeError(f"module flush failed on {batch.group}")
            with self.lock:
                self.batches.append(batch)
            return {"timings": {"checksum": 0.001, "flush": self.delay}}
        finally:
            with self.lock:
                self.active -= 1


def test_aggregation_per_group(tmp_path):
    ex = Recorder()
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=2).start()
    try:
        q.submit(item("heat/1", 0, 3))
        q.submit(item("heat/1", 1, 3))
        time.sleep(0.2)
        assert ex.batches == [] and q.status()["waiting"][G("heat/1")]["have"] == 2
        q.submit(item("heat/1", 2, 3))
        assert q.wait_groups([G("heat/1")], timeout=5)[0][G("heat/1")]["ok"]
        (batch,) = ex.batches
        assert sorted(it.rank for it in batch.items) == [0, 1, 2] and batch.complete
        assert q.drain(timeout=5) and len(q.journal) == 0
    finally:
        q.stop(5)


def test_bounded_parallelism_and_ordering(tmp_path):
    ex = Recorder(delay=0.1)
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=2).start()
    try:
        for v in range(6):
            q.submit(item(f"a/{v}", 0, 1, order="a"))
            q.submit(item(f"b/{v}", 0, 1, order=f"b{v}"))
        assert q.drain(timeout=10)
        assert ex.max_active <= 2
        assert [b.group for b in ex.batches if b.group.startswith("a/")] == [G(f"a/{v}") for v in range(6)]
    finally:
        q.stop(5)


def test_failure_recorded_and_first_failure_kept(tmp_path):
    ex = Recorder(fail_groups={G("h/2")})
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=1).start()
    try:
        for v in (1, 2, 3):
            q.submit(item(f"h/{v}", 0, 1, order="h"))
        res, _ = q.wait_groups([G("h/1"), G("h/2"), G("h/3")], timeout=5)
        assert res[G("h/1")]["ok"] and res[G("h/3")]["ok"]
        assert not res[G("h/2")]["ok"] and "flush failed" in res[G("h/2")]["error"]
        assert [f["group"] for f in q.failures] == [G("h/2")]
        assert q.status()["counts"]["failed"] == 1
        assert len(q.journal) == 0           # a failed item is finished, not retried forever
    finally:
        q.stop(5)


def test_duplicate_key_queued_once(tmp_path):
    ex = Recorder()
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex).start()
    try:
        it = item("g/1", 0, 2)
        assert q.submit(it)[0] is not None
        assert q.submit(it.replace(pid=99))[0] is None      # a retry: same key
        q.submit(item("g/1", 1, 2))
        assert q.wait_groups([G("g/1")], timeout=5)[0][G("g/1")]["items"] == 2
    finally:
        q.stop(5)


def test_replay_after_kill_resumes_unfinished(tmp_path):
    path = tmp_path / "q.journal"
    j = Journal(path)
    q = wq.WorkQueue(j, Recorder())         # never started: like a backend killed early
    q.submit(item("v/1", 0, 2))
    q.submit(item("v/1", 1, 2))
    q.submit(item("v/2", 0, 2))             # rank 1 never sent v/2
    ex = Recorder()
    q2 = wq.WorkQueue(Journal(path), ex).start()
    try:
        assert q2.counts["replayed"] == 3
        assert q2.wait_groups([G("v/1")], timeout=5)[0][G("v/1")]["ok"]
        assert q2.busy() == 1                 # v/2 still waits for its second rank
        assert q2.release_incomplete(reason="test") == 1
        res = q2.wait_groups([G("v/2")], timeout=5)[0][G("v/2")]
        assert res["ok"] and not res["complete"]
        assert q2.drain(timeout=5) and len(q2.journal) == 0
    finally:
        q2.stop(5)


def test_stop_leaves_queued_items_journaled(tmp_path):
    path = tmp_path / "q.journal"
    ex = Recorder(delay=0.3)
    q = wq.WorkQueue(Journal(path), ex, workers=1).start()
    for v in range(4):
        q.submit(item(f"s/{v}", 0, 1, order="s"))
    time.sleep(0.1)
    assert q.stop(5)
    with pytest.raises(RuntimeError, match="stopping"):
        q.submit(item("s/9", 0, 1))
    q.journal.close()
    left = [it.group for _, it in Journal(path).pending()]
    assert left == [G("s/1"), G("s/2"), G("s/3")]


def test_wait_unknown_group_returns_at_once(tmp_path):
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), Recorder()).start()
    try:
        t0 = time.monotonic()
        assert q.wait_groups(["never"], timeout=5) == ({}, ["never"])
        assert time.monotonic() - t0 < 1
        assert q.drain(timeout=0.1)
    finally:
        q.stop(5)
