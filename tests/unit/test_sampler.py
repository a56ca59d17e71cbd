"""ResumableSampler: epoch-seeded order, global cursor, resume and re-shard on any world size."""
import itertools

import numpy as np
import pytest

from veloc.data import ResumableSampler
from veloc.errors import ConfigError, RestartError


def samplers(n, world_size, **kw):
    return [ResumableSampler(n, rank=r, world_size=world_size, **kw) for r in range(world_size)]


def draw_lockstep(ranks, steps):
    """Every rank takes ``steps`` indices (fewer at the end of the epoch), like a training loop."""
    its = [iter(s) for s in ranks]
    return [list(itertools.islice(it, steps)) for it in its], its


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(100, seed=7), ResumableSampler(100, seed=7)
    b.set_epoch(3)
    b.set_epoch(0)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ResumableSampler(100, seed=8)) != list(ResumableSampler(100, seed=7))
    epoch0, epoch1 = ResumableSampler(100, seed=7).order(0), ResumableSampler(100, seed=7).order(1)
    assert sorted(epoch0) == list(range(100)) and not np.array_equal(epoch0, epoch1)
    assert list(ResumableSampler(5, shuffle=False, rank=1, world_size=2)) == [1, 3]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_epoch_is_a_partition(world_size):
    ranks = samplers(103, world_size, seed=1)
    assert sum(len(s) for s in ranks) == 103
    got = [list(s) for s in ranks]
    assert sorted(itertools.chain(*got)) == list(range(103))
    assert all(s.consumed == 103 for s in ranks)


@pytest.mark.parametrize("before", [1, 2, 3, 4])
@pytest.mark.parametrize("after", [1, 2, 3, 4])
@pytest.mark.parametrize("steps", [0, 1, 13, 25, 26])
def test_restart_mid_epoch_yields_exactly_the_remainder(before, after, steps):
    n = 103
    ranks = samplers(n, before, seed=5)
    for s in ranks:
        s.set_epoch(2)
    taken, _ = draw_lockstep(ranks, steps)
    states = [s.state_dict() for s in ranks]
    assert all(st == states[0] for st in states)              # identical on every rank
    consumed = states[0]["consumed"]
    assert consumed == min(n, steps * before)
    order = ranks[0].order()
    assert sorted(itertools.chain(*taken)) == sorted(order[:consumed].tolist())
    resumed = samplers(n, after, seed=5)
    for s in resumed:
        s.load_state_dict(states[0])
        s.set_epoch(2)                                          # the loop sets the same epoch again
    rest = [list(s) for s in resumed]
    flat = list(itertools.chain(*rest))
    assert len(flat) == len(set(flat)) == n - consumed        # no duplicates, nothing lost
    assert set(flat) == set(order[consumed:].tolist())
    assert set(flat).isdisjoint(itertools.chain(*taken))
    assert all(len(s) == 0 and s.consumed == n for s in resumed)


def test_restart_twice_across_world_sizes():
    n, seen = 50, []
    ranks = samplers(n, 4, seed=3)
    for world_size, steps in [(4, 3), (3, 4), (2, 5)]:
        taken, _ = draw_lockstep(ranks, steps)
        seen += list(itertools.chain(*taken))
        state = ranks[0].state_dict()
        ranks = samplers(n, {4: 3, 3: 2, 2: 1}[world_size], seed=3)
        for s in ranks:
            s.load_state_dict(state)
    seen += list(ranks[0])
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_lockstep_batches_and_resume(world_size):
    n, batch = 50, 3
    ranks = samplers(n, world_size, seed=9)
    gens = [s.iter_batches(batch) for s in ranks]
    first = [next(g) for g in gens]
    assert all(len(b) == batch for b in first)
    state = ranks[0].state_dict()
    assert state["consumed"] == world_size * batch
    resumed = samplers(n, world_size, seed=9)
    for s in resumed:
        s.load_state_dict(state)
    rest = [list(s.iter_batches(batch)) for s in resumed]
    assert len({len(r) for r in rest}) == 1                     # every rank gets as many batches
    got = np.concatenate([*first, *itertools.chain(*rest)])
    full_rounds = n // (world_size * batch) * world_size * batch
    assert len(got) == len(set(got.tolist())) == full_rounds
    assert set(got.tolist()) == set(ranks[0].order()[:full_rounds].tolist())
    assert all(s.consumed == n for s in resumed)


def test_drop_last_gives_equal_lengths():
    ranks = samplers(10, 3, drop_last=True)
    assert [len(s) for s in ranks] == [3, 3, 3]
    assert sorted(itertools.chain(*map(list, ranks))) == sorted(ranks[0].order()[:9].tolist())


def test_next_epoch_starts_over():
    s = ResumableSampler(10)
    list(s)
    assert len(s) == 0 and list(s) == []
    s.set_epoch(1)
    assert len(s) == 10 and sorted(s) == list(range(10))


@pytest.mark.parametrize("kwargs, what", [({"n": -1}, "n"), ({"n": 10, "rank": 2, "world_size": 2}, "rank"),
                                           ({"n": 10, "world_size": 0}, "world_size"), ({"n": 1.5}, "n"),
                                           ({"n": 10, "seed": -3}, "seed")])
def test_bad_arguments(kwargs, what):
    with pytest.raises(ConfigError, match=what):
        ResumableSampler(**kwargs)


@pytest.mark.parametrize("state, what", [
    ({"epoch": 0, "consumed": 3, "n": 11, "seed": 0, "shuffle": True}, "n = 11"),
    ({"epoch": 0, "consumed": 3, "n": 10, "seed": 1, "shuffle": True}, "seed = 1"),
    ({"epoch": 0, "consumed": 30, "n": 10, "seed": 0, "shuffle": True}, "out of range"),
    ({"epoch": 0, "n": 10, "seed": 0, "shuffle": True}, "consumed"),
])
def test_bad_state(state, what):
    with pytest.raises(RestartError, match=what):
        ResumableSampler(10).load_state_dict(state)
