"""Failure domains, partner rings, erasure groups and the rotated stripe layout (no MPI)."""
import itertools
import random

import numpy as np
import pytest

from veloc.config import load_config
from veloc.redundancy import topology as topo
from veloc.redundancy.erasure_codec import make_codec
from veloc.redundancy.striping import canonical, losses, rebuild_plan
from veloc.errors import ConfigError


def own(nodes):
    return [(n, n) for n in nodes]


def test_natural_order_and_default_domain():
    assert sorted(["n10", "n2", "n1"], key=topo.natural_key) == ["n1", "n2", "n10"]
    assert topo.check_nodes([("n10", "a"), ("n2", "b")]) == [("n2", "b"), ("n10", "a")]
    cfg = load_config({"scratch": "/s"}, environ={})
    assert topo.domain_of(cfg, "n3") == "n3"
    cfg = load_config({"scratch": "/s"}, environ={"VELOC_FAILURE_DOMAIN": "rack2"})
    assert topo.domain_of(cfg, "n3") == "rack2"


def test_duplicate_node_ids_are_refused():
    with pytest.raises(topo.TopologyError, match="n1.*two engines"):
        topo.check_nodes([("n1", "a"), ("n1", "b")])


def test_default_partners_form_a_ring():
    pairs = own(["n3", "n0", "n2", "n1"])
    assert topo.partners(pairs) == {"n0": "n1", "n1": "n2", "n2": "n3", "n3": "n0"}
    assert topo.owners_of(topo.partners(pairs), "n1") == ["n0"]


def test_partners_cross_domains():
    pairs = [("a0", "r0"), ("a1", "r0"), ("b0", "r1"), ("b1", "r1"), ("c0", "r2"), ("c1", "r2")]
    mapping = topo.partners(pairs)
    domain = dict(pairs)
    assert all(domain[n] != domain[p] for n, p in mapping.items())
    assert sorted(mapping.values()) == sorted(mapping)          # balanced domains: a permutation
    assert mapping == topo.partners(list(reversed(pairs)))     # independent of input order


def test_unbalanced_domains_still_get_foreign_partners():
    pairs = [("a0", "big"), ("a1", "big"), ("a2", "big"), ("b0", "small")]
    mapping = topo.partners(pairs)
    assert mapping["b0"].startswith("a") and all(mapping[a] == "b0" for a in ("a0", "a1", "a2"))


def test_one_domain_cannot_have_partners():
    with pytest.raises(topo.TopologyError, match="at least two failure domains") as info:
        topo.partners([("n0", "rack"), ("n1", "rack")])
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("n,size,expect", [(4, 4, [4]), (8, 4, [4, 4]), (10, 4, [5, 5]), (3, 4, [3]),
                                           (9, 3, [3, 3, 3]), (7, 2, [3, 2, 2])])
def test_group_sizes(n, size, expect):
    found = topo.groups(own([f"n{i}" for i in range(n)]), size)
    assert sorted(map(len, found), reverse=True) == sorted(expect, reverse=True)
    assert sorted(x for g in found for x in g) == sorted(f"n{i}" for i in range(n))


def test_groups_span_distinct_domains():
    pairs = [(f"n{r}{i}", f"rack{r}") for r in range(4) for i in range(3)]   # 4 racks x 3 nodes
    found = topo.groups(pairs, 4)
    domain = dict(pairs)
    assert len(found) == 3 and all(len({domain[n] for n in g}) == len(g) == 4 for g in found)
    shuffled = pairs[:]
    random.Random(3).shuffle(shuffled)
    assert topo.groups(shuffled, 4) == found


def test_impossible_groups_are_explained():
    with pytest.raises(topo.TopologyError, match="'rack0' holds 3 nodes"):
        topo.groups([("a", "rack0"), ("b", "rack0"), ("c", "rack0"), ("d", "rack1")], 2)
    with pytest.raises(topo.TopologyError, match="at least 4 nodes"):
        topo.groups(own(["n0", "n1", "n2"]), 4, min_size=4)
    with pytest.raises(topo.TopologyError, match="group_size"):
        topo.groups(own(["n0", "n1"]), 1)


@pytest.mark.parametrize("g,m", [(g, m) for g in range(3, 9) for m in range(1, g - 1)])
def test_rotated_layout(g, m):
    k = g - m
    positions = {i: [] for i in range(g)}
    for s in range(g):
        data, parity = topo.data_members(s, g, m), topo.parity_members(s, g, m)
        assert sorted(data + parity) == list(range(g))
        for t, d in enumerate(data):
            assert topo.data_position(d, s, g, m) == t
            positions[d].append(t)
        for j, p in enumerate(parity):
            assert topo.data_position(p, s, g, m) is None and (s, j) in topo.held_parity(p, g, m)
    assert all(sorted(ts) == list(range(k)) for ts in positions.values())
    for lost in itertools.combinations(range(g), m):
        assert max(topo.stripe_losses(g, m, lost)) <= m and not topo.unrecoverable(g, m, lost)
    for lost in itertools.combinations(range(g), m + 1):
        assert topo.unrecoverable(g, m, lost)


def test_lost_parity_counts():
    # XOR over 4 members: member 1 holds the parity of stripe 1, which carries data of member 0
    assert topo.unrecoverable(4, 1, {0}, {(1, 0)}) == {0: [1]}
    assert topo.unrecoverable(4, 1, {0}, {(0, 0)}) == {}       # stripe 0 holds no data of member 0
    assert topo.unrecoverable(4, 2, {0}, {(1, 0)}) == {}       # RS with 2 parity absorbs both


@pytest.mark.parametrize("scheme,g,m", [("xor", 3, 1), ("xor", 5, 1), ("rs", 4, 2), ("rs", 6, 3)])
def test_layout_encodes_and_rebuilds_bit_exact(scheme, g, m):
    """The module's striping, simulated without MPI: encode every stripe, lose members, rebuild."""
    k = g - m
    codec = make_codec(scheme, k, m)
    rng = np.random.default_rng(g * 10 + m)
    lengths = [int(x) for x in rng.integers(0, 5000, size=g)]
    chunk = max(1, -(-max(lengths) // k))
    blocks = [np.zeros(k * chunk, np.uint8) for _ in range(g)]
    for b, n in zip(blocks, lengths):
        b[:n] = rng.integers(0, 256, n, dtype=np.uint8)
    chunk_of = lambda i, t: blocks[i][t * chunk:(t + 1) * chunk]
    parity = {}
    for s in range(g):
        out = codec.encode([chunk_of(d, t) for t, d in enumerate(topo.data_members(s, g, m))])
        parity.update(((s, j), p) for j, p in enumerate(out))
    for lost in itertools.combinations(range(g), m):
        ok = {p for p in parity if topo.parity_members(p[0], g, m)[p[1]] not in lost}
        rebuilt = {x: np.zeros(k * chunk, np.uint8) for x in lost}
        for x, s, chosen in rebuild_plan(g, m, set(lost), ok):
            assert len(chosen) == k and all(src not in lost for _, src, _, _ in chosen)
            given = {idx: chunk_of(src, pos) if kind == "data" else parity[(s, pos)]
                     for idx, src, kind, pos in chosen}
            t = topo.data_position(x, s, g, m)
            rebuilt[x][t * chunk:(t + 1) * chunk] = codec.decode(given, chunk)[t]
        for x in lost:
            assert rebuilt[x].tobytes() == blocks[x].tobytes()


def _record(stamp, nodes, m=1):
    return {"stamp": stamp, "m": m, "members": [{"node": n, "manifests": [{"rank": i}]} for i, n in enumerate(nodes)]}


def test_canonical_record_and_losses():
    a, stale = _record("a", ["n0", "n1", "n2"]), _record("old", ["n0", "n1", "n2"])
    chosen = canonical([a, None, a, stale])
    assert all(chosen[n] is a for n in ("n0", "n1", "n2"))
    oks = [{(0, 0)}, set(), set(), {(2, 0)}]
    lost, lost_parity = losses(a, ["n0", "n1", "n3", "n2"], oks, {"n1"})
    assert lost == {1} and lost_parity == set()
    lost, lost_parity = losses(a, ["n0", "n2"], [{(0, 0)}, set()], set())
    assert lost == {1} and lost_parity == {(2, 0)}


def test_segments_cover_a_chunk_of_the_concatenated_files():
    from veloc.redundancy.striping import segments
    sizes = [5, 0, 3, 10]
    data = np.arange(sum(sizes))
    parts = np.split(data, np.cumsum(sizes)[:-1])
    for start in range(0, 24, 4):
        got = np.full(4, -1)
        for i, off, at, n in segments(sizes, start, 4):
            assert n > 0
            got[at:at + n] = parts[i][off:off + n]
        want = np.full(4, -1)
        tail = data[start:start + 4]
        want[:tail.size] = tail
        assert got.tolist() == want.tolist()


def _erasure(**keys):
    from veloc.engine.module import EngineContext
    from veloc.engine.modules.erasure import ErasureModule
    top = {k: keys.pop(k) for k in list(keys) if k == "ec_interval"}
    cfg = load_config({"scratch": "/s", **top, "erasure": {"enabled": True, **keys}}, environ={})
    return ErasureModule(EngineContext(cfg, "n0"))


def test_erasure_section_and_interval():
    from veloc.engine.module import CHECKPOINT, Command
    cmd = lambda v: Command(CHECKPOINT, "x", v, [0], 1)
    m = _erasure(scheme="rs")
    assert (m.scheme, m.m, m.group_size, m.priority, m.interval) == ("rs", 2, 4, 40, 0)
    assert [m.due(cmd(v)) for v in range(3)] == [True] * 3
    assert [_erasure(every=2).due(cmd(v)) for v in range(1)] == [True]
    never = _erasure(ec_interval=-1)
    assert not any(never.due(cmd(v)) for v in range(3))
    timed = _erasure(ec_interval=3600)      # decided by node 0 (here: the only node)
    assert [timed.due(cmd(v)) for v in range(3)] == [True, False, False]
    assert _erasure(interval=0, ec_interval=3600).interval == 0   # [erasure] interval wins
    bad = _erasure(scheme="xor", parity=2)
    with pytest.raises(ConfigError, match="parity = 2 with scheme = xor"):
        raise bad._problem
    with pytest.raises(ConfigError, match="scheme"):
        load_config({"scratch": "/s", "erasure": {"scheme": "raid5"}}, environ={})
