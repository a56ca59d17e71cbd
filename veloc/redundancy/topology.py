"""Failure domains, partner rings and erasure groups: pure functions, no I/O, no MPI.

Who calls what: the ``[partner]`` and ``[erasure]`` modules, in every node's engine (the
sync-mode node leader or the node's active backend). Each engine allgathers
``(node id, failure domain)`` over ``ctx.peers`` and calls these functions on the same
list, so every node computes the same partners, groups and stripe layout.

Failure domains
---------------
A node is identified by ``VELOC_NODE_ID`` (else its host name). The top-level config key
``failure_domain`` names *this node's* domain (free text, e.g. a rack or a power zone);
it is set per node through the environment, ``VELOC_FAILURE_DOMAIN=rack3``, which
overrides the file. Unset, every node is its own domain. Nodes in one domain are assumed
to fail together, so a partner and the members of an erasure group are always in
pairwise distinct domains.

Partners
--------
Nodes are put on a ring that interleaves the domains (round robin over domains, largest
first; nodes in natural order inside a domain). A node's partner is the next node on the
ring in another domain. With one node per domain this is simply ``n0 -> n1 -> ... -> n0``.

Erasure groups
--------------
``G = max(1, n // group_size)`` groups. Nodes are dealt round robin to the groups in
domain-major order, so the nodes of one domain land in different groups; group sizes
differ by at most one (every group has at least ``group_size`` nodes when
``n >= group_size``). Impossible when a domain holds more than ``G`` nodes.

Striping inside a group of ``g`` members with ``m`` parity blocks (``k = g - m`` data
blocks per stripe; rotated like RAID-5/6, so no member holds only parity): there are
``g`` stripes. Stripe ``s`` keeps its parity ``j`` (``0 <= j < m``) on member
``(s + j) % g`` and takes data position ``t`` (``0 <= t < k``) from member
``(s + m + t) % g``. Each member's data block is cut into ``k`` equal chunks; chunk ``t``
goes to the one stripe where the member sits at data position ``t``. Losing any ``m``
members loses at most ``m`` blocks of every stripe.
"""
import re

from veloc.errors import ConfigError


class TopologyError(ConfigError):
    """The nodes and failure domains of the job cannot form the requested partners/groups."""


def natural_key(text):
    """Sort key putting ``n2`` before ``n10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def domain_of(config, node):
    """This node's failure domain: ``failure_domain`` (file or ``VELOC_FAILURE_DOMAIN``), else the node."""
    value = getattr(config, "failure_domain", None)
    return str(value) if value else node


def check_nodes(pairs):
    """Validate ``[(node, domain)]`` (one entry per engine) and return it in natural node order."""
    pairs = [(str(n), str(d)) for n, d in pairs]
    seen = {}
    for node, domain in pairs:
        if node in seen:
            raise TopologyError(f"node id {node!r} is used by two engines: give every node its own "
                                "VELOC_NODE_ID (or run one engine per host)")
        seen[node] = domain
    return sorted(pairs, key=lambda p: natural_key(p[0]))


def _by_domain(pairs):
    domains = {}
    for node, domain in check_nodes(pairs):
        domains.setdefault(domain, []).append(node)
    # largest domains first, then by name: deterministic and balanced
    return sorted(domains.items(), key=lambda kv: (-len(kv[1]), natural_key(kv[0])))


def ring(pairs):
    """The interleaved ring order of the nodes (round robin over domains, largest first)."""
    columns = [nodes for _, nodes in _by_domain(pairs)]
    out = []
    for i in range(max((len(c) for c in columns), default=0)):
        out.extend(c[i] for c in columns if i < len(c))
    return out


def partners(pairs):
    """``{node: partner node}``: the next node on the ring in another failure domain.

    Raises :class:`TopologyError` if the job has fewer than two domains.
    """
    domain = dict(check_nodes(pairs))
    order = ring(pairs)
    if len(set(domain.values())) < 2:
        where = f"one failure domain ({next(iter(domain.values()))!r})" if domain else "no node"
        raise TopologyError(
            f"partner copies need nodes in at least two failure domains; the job's {len(order)} node(s) "
            f"are all in {where}: set VELOC_FAILURE_DOMAIN per node, or disable [partner]")
    out = {}
    for pos, node in enumerate(order):
        for step in range(1, len(order)):
            other = order[(pos + step) % len(order)]
            if domain[other] != domain[node]:
                out[node] = other
                break
    return out


def owners_of(partner_map, holder):
    """Nodes whose partner is ``holder`` (the copies ``holder`` keeps), in natural order."""
    return sorted((n for n, p in partner_map.items() if p == holder), key=natural_key)


def groups(pairs, group_size, min_size=2):
    """Erasure groups: a list of node lists (each in natural order), ordered by first member.

    Every group's members are in distinct failure domains and number at least
    ``min_size``; raises :class:`TopologyError` naming the limit otherwise.
    """
    if group_size < 2:
        raise TopologyError(f"erasure group_size = {group_size}: must be >= 2")
    by_domain = _by_domain(pairs)
    n = sum(len(nodes) for _, nodes in by_domain)
    count = max(1, n // group_size)
    biggest_domain, biggest = (by_domain[0][0], len(by_domain[0][1])) if by_domain else ("", 0)
    if biggest > count:
        raise TopologyError(
            f"failure domain {biggest_domain!r} holds {biggest} nodes but the job's {n} nodes form only "
            f"{count} group(s) of group_size = {group_size}: members of a group must be in distinct "
            "domains; lower [erasure] group_size or spread the nodes over more domains")
    out = [[] for _ in range(count)]
    pos = 0
    for _, nodes in by_domain:
        for node in nodes:
            out[pos % count].append(node)
            pos += 1
    out = [sorted(g, key=natural_key) for g in out]
    small = min(len(g) for g in out) if out else 0
    if small < min_size:
        raise TopologyError(
            f"erasure groups need at least {min_size} nodes in distinct failure domains; this job's "
            f"{n} node(s) in {len(by_domain)} domain(s) give a group of {small}: use more nodes, a "
            "smaller parity count, or disable [erasure]")
    return sorted(out, key=lambda g: natural_key(g[0]))


# ----------------------------------------------------------------------- striping

def parity_members(stripe, g, m):
    """Member indices holding parity 0..m-1 of ``stripe``."""
    return [(stripe + j) % g for j in range(m)]


def data_members(stripe, g, m):
    """Member indices at data positions 0..k-1 of ``stripe``."""
    return [(stripe + m + t) % g for t in range(g - m)]


def data_position(member, stripe, g, m):
    """The data position of ``member`` in ``stripe`` (also its chunk index), or ``None``."""
    t = (member - stripe - m) % g
    return t if t < g - m else None


def held_parity(member, g, m):
    """``[(stripe, j)]``: the parity blocks stored by ``member``."""
    return [((member - j) % g, j) for j in range(m)]


def stripe_losses(g, m, lost_members, lost_parity=()):
    """Blocks lost per stripe: data of lost members plus lost parity ``(stripe, j)``.

    A lost member's parity counts as lost too.
    """
    lost_members, lost_parity = set(lost_members), set(lost_parity)
    out = []
    for s in range(g):
        data = sum(1 for d in data_members(s, g, m) if d in lost_members)
        par = sum(1 for j, p in enumerate(parity_members(s, g, m)) if p in lost_members or (s, j) in lost_parity)
        out.append(data + par)
    return out


def unrecoverable(g, m, lost_members, lost_parity=()):
    """Lost members whose data cannot be rebuilt: ``{member: [stripes with > m losses]}``."""
    losses = stripe_losses(g, m, lost_members, lost_parity)
    out = {}
    for member in sorted(set(lost_members)):
        bad = [s for s in range(g) if data_position(member, s, g, m) is not None and losses[s] > m]
        if bad:
            out[member] = bad
    return out
