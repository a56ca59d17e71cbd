"""The backend's journal (veloc_backend.journal) and journaled work queue (veloc_backend.workqueue)."""
import json
import threading
import time

import pytest
from veloc_backend.journal import Journal
from veloc_backend import workqueue as wq
pytestmark = pytest.mark.timeout(60)


def test_add_done_replay(tmp_path):
    path = tmp_path / "j" / "n0.journal"
    j = Journal(path)
    a = j.add({"x": 1})
    b = j.add({"x": 2})
    c = j.add({"x": 3})
    j.done(b)
    assert [i for i, _ in j.pending()] == [a, c]
    # no close(): as if the backend was killed
    j2 = Journal(path)
    assert j2.pending() == [(a, {"x": 1}), (c, {"x": 3})]
    d = j2.add({"x": 4})
    assert d > c                           # ids never collide with replayed ones
    j2.done([a, c, d])
    j2.close()
    assert Journal(path).pending() == []


def test_torn_last_line_and_garbage_are_skipped(tmp_path):
    path = tmp_path / "n0.journal"
    j = Journal(path)
    j.add({"x": 1})
    with open(path, "ab") as f:
        f.write(b'{"op":"add","id":7,"it')          # crash during a write
    j2 = Journal(path)
    assert [it for _, it in j2.pending()] == [{"x": 1}]
    j2.add({"x": 2})
    assert [it for _, it in Journal(path).pending()] == [{"x": 1}, {"x": 2}]
    with open(path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"op": "weird", "id": 99}).encode() + b"\n")
    assert [it for _, it in Journal(path).pending()] == [{"x": 1}, {"x": 2}]


def test_compaction_keeps_only_pending(tmp_path):
    path = tmp_path / "n0.journal"
    j = Journal(path, compact_every=10)
    ids = [j.add({"n": n}) for n in range(50)]
    for i in ids[:45]:
        j.done(i)
    lines = path.read_text().splitlines()
    assert len(lines) < 20                            # compacted on the way
    assert [it["n"] for _, it in Journal(path).pending()] == [45, 46, 47, 48, 49]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_concurrent_appends(tmp_path):
    j = Journal(tmp_path / "c.journal", compact_every=7)

    def work(k):
        for n in range(50):
            i = j.add({"k": k, "n": n})
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


def item(group, rank, size, order=None):
    out = {"group": group, "group_size": size, "rank": rank}
    if order:
        out["order"] = order
    return out


def test_aggregation_per_group(tmp_path):
    ex = Recorder()
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=2).start()
    try:
        q.submit(item("heat/1", 0, 3))
        q.submit(item("heat/1", 1, 3))
        time.sleep(0.2)
        assert ex.batches == [] and q.status()["waiting"]["heat/1"]["have"] == 2
        q.submit(item("heat/1", 2, 3))
        assert q.wait_groups(["heat/1"], timeout=5)[0]["heat/1"]["ok"]
        (batch,) = ex.batches
        assert sorted(it["rank"] for it in batch.items) == [0, 1, 2] and batch.complete
        assert q.drain(timeout=5) and len(q.journal) == 0
    finally:
        q.stop(5)


def test_bounded_parallelism_and_ordering(tmp_path):
    ex = Recorder(delay=0.1)
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=2).start()
    try:
        for v in range(6):
            q.submit(item(f"a/{v}", 0, 1, order="a"))
            q.submit(item(f"b/{v}", 0, 1))
        assert q.drain(timeout=10)
        assert ex.max_active <= 2
        assert [b.group for b in ex.batches if b.group.startswith("a/")] == [f"a/{v}" for v in range(6)]
    finally:
        q.stop(5)


def test_failure_recorded_and_first_failure_kept(tmp_path):
    ex = Recorder(fail_groups={"h/2"})
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex, workers=1).start()
    try:
        for v in (1, 2, 3):
            q.submit(item(f"h/{v}", 0, 1, order="h"))
        res, _ = q.wait_groups(["h/1", "h/2", "h/3"], timeout=5)
        assert res["h/1"]["ok"] and res["h/3"]["ok"]
        assert not res["h/2"]["ok"] and "flush failed" in res["h/2"]["error"]
        assert [f["group"] for f in q.failures] == ["h/2"]
        assert q.status()["counts"]["failed"] == 1
        assert len(q.journal) == 0           # a failed item is finished, not retried forever
    finally:
        q.stop(5)


def test_duplicate_key_queued_once(tmp_path):
    ex = Recorder()
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), ex).start()
    try:
        it = dict(item("g/1", 0, 2), key="rank0-g/1")
        assert q.submit(it)[0] is not None
        assert q.submit(dict(it))[0] is None
        q.submit(dict(item("g/1", 1, 2), key="rank1-g/1"))
        assert q.wait_groups(["g/1"], timeout=5)[0]["g/1"]["items"] == 2
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
        assert q2.wait_groups(["v/1"], timeout=5)[0]["v/1"]["ok"]
        assert q2.busy() == 1                 # v/2 still waits for its second rank
        assert q2.release_incomplete(reason="test") == 1
        res = q2.wait_groups(["v/2"], timeout=5)[0]["v/2"]
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
    left = [it["group"] for _, it in Journal(path).pending()]
    assert left == ["s/1", "s/2", "s/3"]


def test_wait_unknown_group_returns_at_once(tmp_path):
    q = wq.WorkQueue(Journal(tmp_path / "q.journal"), Recorder()).start()
    try:
        t0 = time.monotonic()
        assert q.wait_groups(["never"], timeout=5) == ({}, ["never"])
        assert time.monotonic() - t0 < 1
        assert q.drain(timeout=0.1)
    finally:
        q.stop(5)
