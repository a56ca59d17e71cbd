"""Erasure module (priority 40): level 3, XOR or Reed-Solomon parity across node groups.

Who calls what: every node's engine (sync-mode node leader, or the node's active
backend) runs this module; all its methods are collective over ``ctx.peers`` and are
called by every engine in the same order, even with an empty rank list.

Config ``[erasure]``: ``enabled``, ``priority`` (40), ``every`` (versions),
``scheme = xor | rs``, ``group_size`` (4), ``parity`` (rs only; default 2),
``interval`` (seconds; default VELOC's top-level ``ec_interval``: 0 = every version,
< 0 = never, > 0 = at most once per interval, decided by node 0 for all nodes), and
``backend`` (force a codec backend; default: the fastest one here).

CHECKPOINT: nodes form groups in distinct failure domains (``veloc.redundancy.topology``);
each group encodes its members' scratch copies of the version into parity blocks
spread over all members (``veloc.redundancy.striping``), and every member commits the same
group record. XOR tolerates one lost member per group, RS ``parity`` of them.

RESTART: ``available`` is optimistic (a rank's version counts when the group record
survives and enough parity blocks remain, assuming the other members' data comes back
from scratch or partner); ``verify`` is exact (members with pending ranks are lost;
every parity block is checked against its digest); ``restore`` rebuilds the lost
members' blocks from the survivors' scratch data and parity, checks them, commits the
scratch manifests, then re-encodes the group so the version is protected again.
"""
import json

import numpy as np

from veloc.config_keys import Key, choice, integer, module_keys, text
from veloc.errors import CheckpointError, ConfigError, CorruptCheckpointError, RestartError
from veloc.faults import fault_point
from veloc.redundancy.erasure_codec import make_codec
from veloc.storage.hashing import digest_buffer
from veloc.engine.module import Module
from veloc.redundancy.striping import (DIGEST, FORMAT, GroupStore, canonical, digest_files, encode_exchange, held_parity_all,
                        losses, manifests_of, member_index, open_files, ranks_of, rebuild_exchange, rebuild_plan,
                        write_ranks)
from veloc.redundancy.topology import TopologyError, domain_of, groups, held_parity, unrecoverable
from veloc.redundancy.transfer import close_all, gather, local, node_scratch, settle


class ErasureModule(Module):
    name = "erasure"
    config_keys = module_keys(40, scheme=Key(choice("xor", "rs"), "xor"), group_size=Key(integer(2), 4),
                              parity=Key(integer(1), None), interval=Key(integer(), None), backend=Key(text, None))
    collective = True
    level = "erasure"

    def __init__(self, ctx):
        super().__init__(ctx)
        sec = self.section
        self.scheme = sec.get("scheme") or "xor"
        parity = sec.get("parity")
        self.m = 1 if self.scheme == "xor" else (2 if parity is None else parity)
        self.group_size = sec.get("group_size") or 4
        self.backend = sec.get("backend")
        interval = sec.get("interval")
        self.interval = ctx.config.ec_interval if interval is None else interval
        self._problem = None
        if self.scheme == "xor" and parity not in (None, 1):
            self._problem = ConfigError(f"[erasure] parity = {parity} with scheme = xor: XOR has exactly one "
                                        "parity block; use scheme = rs for more")
        self._topology = None
        self._codecs = {}
        self._local = set()
        self._complete = {}     # name -> versions whose group record every member committed

    def default_enabled(self):
        return False

    # -- helpers ---------------------------------------------------------------------
    def _store(self):
        return GroupStore(node_scratch(self.ctx.config, self.ctx.node) / ".erasure")

    def _my_group(self):
        """Collective on first use: this node's group (node ids) per the topology."""
        if self._topology is None:
            pairs = self.ctx.peers.allgather((self.ctx.node, domain_of(self.ctx.config, self.ctx.node)))
            try:
                found = groups(pairs, self.group_size, min_size=self.m + 2)
                self._topology = next(g for g in found if self.ctx.node in g)
            except TopologyError as exc:
                self._topology = exc
        if isinstance(self._topology, TopologyError):
            raise self._topology
        return self._topology

    def _codec(self, scheme, k, m, backend):
        """A cached codec (building one may load a native library)."""
        key = (scheme, k, m, backend)
        if key not in self._codecs:
            self._codecs[key] = make_codec(scheme, k, m, backend=backend)
        return self._codecs[key]

    # -- CHECKPOINT ------------------------------------------------------------------
    def checkpoint(self, cmd):
        if self._problem is not None:       # not raised at construction: only leaders build engines
            raise self._problem
        if not self.due(cmd):
            return False
        self.require_peers(cmd)
        group = self._my_group()
        self._local.update(cmd.ranks)
        self._encode(cmd.name, cmd.version, cmd.ranks, group, CheckpointError, recycle=True)
        # _encode returned on every node: every member committed the version's record
        self._complete.setdefault(cmd.name, set()).add(cmd.version)
        error = local(self._collect, cmd.name)[1]
        if error:
            self.ctx.log.warning("erasure: garbage collection of %s failed: %s", cmd.name, error)
        return True

    def _encode(self, name, version, ranks, group, error_cls, code=None, recycle=False):
        """Collective: encode ``group`` (node ids; ``None`` = this node sits out) for a version.

        ``code`` = (scheme, m, backend), default the configured ones. ``recycle``: the new
        parity files take over those of the version garbage collection drops next.
        """
        peers, node, store = self.ctx.peers, self.ctx.node, self._store()
        scheme, m, backend = code or (self.scheme, self.m, self.backend)
        what = f"erasure coding of {name} v{version}"

        def describe():
            if group is None:
                return None
            manifests = []
            for rank in sorted(ranks):
                manifest = self.ctx.scratch(rank).read_manifest(name, version, rank)
                if manifest is None:
                    raise CheckpointError(f"rank {rank} has no committed scratch copy of {name} v{version}")
                manifests.append(json.loads(manifest.to_bytes()))
            return {"node": node, "domain": domain_of(self.ctx.config, node), "group": list(group),
                    "manifests": manifests, "length": sum(f["size"] for x in manifests for f in x["files"])}

        info = gather(peers, node, *local(describe), error_cls, what)
        by_node = {i["node"]: (idx, i) for idx, i in enumerate(info) if i}

        def setup():
            if group is None:
                return None
            for n in group:
                if n not in by_node or by_node[n][1]["group"] != list(group):
                    raise CheckpointError(f"group {list(group)}: node {n} is missing or sees another group")
            g = len(group)
            k = g - m
            chunk = max(1, -(-max(by_node[n][1]["length"] for n in group) // k))
            codec = self._codec(scheme, k, m, backend)
            store.uncommit(name, version)
            victim = (store.take_victim(name, version, self.ctx.config.scratch_versions,
                                        complete=self._complete.get(name, set())) if recycle else (None, []))
            files = open_files(self.ctx.scratch, manifests_of(by_node[node][1]))
            return [by_node[n][0] for n in group], group.index(node), k, chunk, codec, victim, files

        state, error = local(setup)
        try:
            settle(peers, node, error, error_cls, what)
            fault_point("erasure_encode")
            result = None
            if state is not None:
                peer, me, k, chunk, codec, victim, files = state
                sizes = [[f["size"] for x in by_node[n][1]["manifests"] for f in x["files"]] for n in group]
                parity, digests = encode_exchange(peers.comm, peer, me, files, sizes, k, m, chunk, codec)
                # per-file digests (checksum module) already pin the data; else digest the block
                undigested = any(not f.get("digest") for x in by_node[node][1]["manifests"] for f in x["files"])
                result = {"digest": digest_files(files) if undigested else None, "parity": digests}
        finally:
            if state is not None:
                close_all(state[-1])
        final = gather(peers, node, result, None, error_cls, what)

        def commit():
            if state is None:
                return
            members = [{"node": n, "domain": by_node[n][1]["domain"], "length": by_node[n][1]["length"],
                        "digest": final[by_node[n][0]]["digest"], "manifests": by_node[n][1]["manifests"]}
                       for n in group]
            table = [final[p]["parity"] for p in peer]
            record = {"format": FORMAT, "name": name, "version": version, "scheme": scheme, "m": m, "k": k,
                      "backend": codec.backend, "code": getattr(codec, "code", codec.backend),
                      "chunk": chunk, "parity_len": int(parity[(me, 0)].size), "members": members,
                      "parity": table}
            record["stamp"] = digest_buffer(json.dumps(record, sort_keys=True).encode(), DIGEST)[:16]
            store.commit(record, parity, reuse=victim[1])
            if victim[0] is not None:
                store.remove_version(name, victim[0])

        settle(peers, node, local(commit)[1], error_cls, what)

    def _collect(self, name):
        keep = self.ctx.config.scratch_versions
        if keep > 0:
            store = self._store()
            for version in store.versions(name)[:-keep]:
                store.remove_version(name, version)

    def supersede(self, name, threshold, ranks):
        store = self._store()
        removed = {v for v in store.versions(name) if v >= threshold}
        for version in removed:
            store.remove_version(name, version)
        return removed

    # -- RESTART ---------------------------------------------------------------------
    def _records(self, name, version, ranks):
        """Collective: ``[(node, record or None, wanted ranks)]`` by peer index."""
        record, error = local(self._store().read_record, name, version)
        if error:
            self.ctx.log.warning("erasure: %s", error)
        return self.ctx.peers.allgather((self.ctx.node, record, sorted(ranks)))

    def available(self, name, ranks):
        if not self.peers_connected():
            return {}
        self._local.update(ranks)
        store, node, mine = self._store(), self.ctx.node, {}
        for version in store.versions(name):
            try:
                rec = store.read_record(name, version)
            except CorruptCheckpointError:
                continue
            nodes = [e["node"] for e in rec["members"]]
            ok = node in nodes and len(store.parity_intact(rec, nodes.index(node), deep=False)) == rec["m"]
            mine[version] = (rec["stamp"], nodes, rec["m"], ok,
                             {e["node"]: [x["rank"] for x in e["manifests"]] for e in rec["members"]})
        tables = self.ctx.peers.allgather((node, mine))
        out, hopeless = {r: set() for r in ranks}, {}
        for version in {v for _, t in tables for v in t}:
            candidates = [(idx, t[version]) for idx, (_, t) in enumerate(tables)
                          if version in t and node in t[version][1]]
            if not candidates:
                continue
            counts = {}
            for idx, entry in candidates:
                counts.setdefault(entry[0], [0, idx, entry])[0] += 1
            stamp, nodes, m, _, owned = max(counts.values(), key=lambda c: (c[0], -c[1]))[2]
            good = {nodes.index(n) for n, t in tables if version in t and t[version][0] == stamp and t[version][3]}
            lost_parity = {p for i in range(len(nodes)) if i not in good for p in held_parity(i, len(nodes), m)}
            if not unrecoverable(len(nodes), m, {nodes.index(node)}, lost_parity):
                for rank in set(owned.get(node, [])) & set(ranks):
                    out[rank].add(version)
            elif any(not self.ctx.scratch(r).manifest_path(name, version, r).exists()
                     for r in set(owned.get(node, [])) & set(ranks)):
                gone = [n for i, n in enumerate(nodes) if i not in good]
                hopeless[version] = f"group {nodes} lost the parity of {gone}, more than {m} per stripe"
        if hopeless:
            newest = max(hopeless)
            self.ctx.log.warning("erasure: node %s cannot rebuild %s version(s) %s; v%d: %s", node, name,
                                 sorted(hopeless), newest, hopeless[newest])
        return out

    def verify(self, name, version, ranks):
        if not self.peers_connected():
            return {r: "no erasure level (single node)" for r in ranks}
        table = self._records(name, version, ranks)
        if not any(want for _, _, want in table):
            return {}
        chosen = canonical([rec for _, rec, _ in table])
        wanting = {n for n, _, want in table if want}
        mine = chosen.get(self.ctx.node)
        ok = set()
        if mine is not None and any(e["node"] in wanting for e in mine["members"]):
            ok = self._store().parity_intact(mine, member_index(mine, self.ctx.node))
        oks = self.ctx.peers.allgather(ok)
        out = {}
        for rank in ranks:
            out[rank] = self._verdict(name, version, rank, mine, table, oks, wanting)
        return out

    def _verdict(self, name, version, rank, rec, table, oks, wanting):
        node = self.ctx.node
        if rec is None:
            return f"no erasure group record of {name} v{version} covers node {node}"
        if rank not in ranks_of(rec, node):
            return f"erasure group of {name} v{version} does not hold rank {rank} for node {node}"
        written = {m["rank"]: m["nranks"] for e in rec["members"] for m in e["manifests"]}
        if self.ctx.nranks is not None and written[rank] != self.ctx.nranks:
            return (f"{name} v{version} at erasure was written by a job of {written[rank]} ranks, "
                    f"this job has {self.ctx.nranks}")
        lost, lost_parity = losses(rec, [n for n, _, _ in table], oks, wanting)
        if member_index(rec, node) not in unrecoverable(len(rec["members"]), rec["m"], lost, lost_parity):
            return None
        names = [rec["members"][i]["node"] for i in sorted(lost)]
        return (f"erasure: group {[e['node'] for e in rec['members']]} of {name} v{version} lost member(s) "
                f"{names} and {len(lost_parity)} more parity block(s); {rec['scheme']} with {rec['m']} "
                f"parity block(s) per stripe cannot rebuild node {node}")

    def restore(self, name, version, ranks):
        if not self.peers_connected():
            return False
        peers, node, store = self.ctx.peers, self.ctx.node, self._store()
        what = f"erasure rebuild of {name} v{version}"
        table = self._records(name, version, ranks)
        nodes = [n for n, _, _ in table]
        chosen = canonical([rec for _, rec, _ in table])
        rec = chosen.get(node)

        def status():
            if rec is None:
                return set(), set()
            have = {r for r in ranks_of(rec, node) if r not in ranks
                    and self.ctx.scratch(r).manifest_path(name, version, r).exists()}
            return store.parity_intact(rec, member_index(rec, node)), have

        stats = gather(peers, node, *local(status), RestartError, what)
        oks = [s[0] for s in stats]
        wanting = {n for n, _, want in table if want}
        missing = {n for (n, _, _), (_, have) in zip(table, stats) if n in chosen
                   and not set(ranks_of(chosen[n], n)) <= have and n not in wanting}
        for n in sorted(wanting):
            if n not in chosen:
                raise RestartError(f"{what}: no group record covers node {n}")
            r = chosen[n]
            lost, lost_parity = losses(r, nodes, oks, wanting | missing)
            bad = unrecoverable(len(r["members"]), r["m"], lost, lost_parity)
            if bad:
                raise RestartError(f"{what}: group {[e['node'] for e in r['members']]} lost too many blocks "
                                   f"(members {sorted(bad)} cannot be rebuilt)")
        plan, lost, lost_parity = [], set(), set()
        if rec is not None:
            names = [e["node"] for e in rec["members"]]
            lost, lost_parity = losses(rec, nodes, oks, wanting | missing)
            if wanting & set(names):
                plan = [p for p in rebuild_plan(len(names), rec["m"], lost, set(held_parity_all(rec) - lost_parity))
                        if names[p[0]] in nodes]
        me = member_index(rec, node) if rec is not None else None

        def prepare():
            if not plan:
                return None
            k, chunk = rec["k"], rec["chunk"]
            codec = self._codec(rec["scheme"], k, rec["m"], rec["backend"])
            manifests = manifests_of(rec["members"][me])
            if me in lost:
                return codec, manifests, [], np.zeros(k * chunk, dtype=np.uint8)
            if not any(src == me and kind == "data" for _, _, b in plan for _, src, kind, _ in b):
                return codec, manifests, [], None
            files = open_files(self.ctx.scratch, manifests)
            expected = rec["members"][me]["digest"]
            if expected and digest_files(files) != expected:
                close_all(files)
                raise CorruptCheckpointError(f"node {node}'s scratch data of {name} v{version} no longer "
                                             "matches what was encoded")
            return codec, manifests, files, None

        state, error = local(prepare)
        try:
            settle(peers, node, error, RestartError, what)
            if state is not None:
                codec, manifests, files, block = state
                peer = [nodes.index(e["node"]) if e["node"] in nodes else -1 for e in rec["members"]]
                sizes = [[f.size for x in manifests_of(e) for f in x.files] for e in rec["members"]]
                rebuild_exchange(peers.comm, peer, me, plan, files, sizes, lambda s, j: store.read_parity(rec, s, j),
                                 rec["chunk"], rec["k"], codec, block)
        finally:
            if state is not None:
                close_all(state[2])

        def finish():
            if state is None or me not in lost:
                return
            entry = rec["members"][me]
            if entry["digest"] and digest_buffer(block[:entry["length"]], DIGEST) != entry["digest"]:
                raise CorruptCheckpointError(f"rebuilt block of node {node} does not match its recorded digest")
            have = stats[peers.index][1]
            write_ranks(self.ctx.scratch, manifests, block, node, set(ranks_of(rec, node)) - have)
            self.ctx.log.info("erasure: rebuilt %s v%d of node %s from its group", name, version, node)

        settle(peers, node, local(finish)[1], RestartError, what)
        # Re-protect: re-encode a damaged group once every member has its data back.
        members = {e["node"] for e in rec["members"]} if rec is not None else set()
        again = bool(members and (lost or lost_parity) and members <= set(nodes)
                     and (wanting & members or not missing & members))
        self._encode(name, version, ranks_of(rec, node) if again else [],
                     [e["node"] for e in rec["members"]] if again else None, RestartError,
                     code=(rec["scheme"], rec["m"], rec["backend"]) if again else None)
        if again and me == 0:
            self.ctx.log.info("erasure: re-encoded %s v%d for group %s", name, version, sorted(members))
        return True
