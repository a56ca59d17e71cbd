"""Partner module (priority 30): level 2, a copy of each node's files on a partner node.

Who calls what: every node's engine (sync-mode node leader, or the node's active
backend) runs this module; all its methods are collective over ``ctx.peers`` and are
called by every engine in the same order, even with an empty rank list.

CHECKPOINT: each node ships the files of its ranks' committed scratch copies of the
version to its partner (``veloc.redundancy.topology.partners``: the next node in another
failure domain) over MPI; the partner stores them under its own scratch as
``<scratch>/.partner/<owner node>/<name>/v<version>/r<rank>.*`` (a :class:`LevelStore`
of level ``partner``) and commits each rank's manifest atomically, after checking the
carried digests. No engine ever reads another node's scratch. Copies older than the
newest ``scratch_versions`` (when > 0) are dropped from the partner tree.

RESTART: ``available`` / ``verify`` ask every node which copies it holds (verify checks
them deep); ``restore`` ships the chosen copies back to the owners' fresh scratch,
verifies and commits them, then re-protects: every local rank whose scratch copy of the
version is present but whose partner lost its copy ships it again. Survives the loss of
any single node's scratch (of any number of nodes as long as no node and its partner
are both lost). ``<scratch>`` is ``transfer.node_scratch``: the scratch path up to ``{rank}``.
"""
from veloc.config_keys import module_keys
from veloc.errors import CheckpointError, CorruptCheckpointError, RestartError
from veloc.faults import fault_point
from veloc.storage.levels import LevelStore
from veloc.storage.manifest import verify_files
from veloc.engine.module import Module
from veloc.redundancy.topology import TopologyError, domain_of, partners
from veloc.redundancy.transfer import (TAG_PARTNER, Exchange, IncomingFile, OutgoingFile, close_all, gather, local,
                        node_scratch, settle)
from veloc.engine.modules.scratch import verify_copy


class PartnerModule(Module):
    name = "partner"
    config_keys = module_keys(30)
    collective = True
    level = "partner"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._topology = None    # (nodes by peer index, {node: partner}) once known
        self._local = set()      # ranks this engine has served (for re-protection)
        self._complete = {}      # name -> versions whose partner copies every node committed

    def default_enabled(self):
        return False

    # -- helpers ---------------------------------------------------------------------
    def _root(self):
        return node_scratch(self.ctx.config, self.ctx.node) / ".partner"

    def _store(self, owner):
        return LevelStore("partner", self._root() / owner)

    def _owners(self):
        try:
            return sorted(p.name for p in self._root().iterdir() if p.is_dir())
        except OSError:
            return []

    def _find(self, name, version, rank):
        """The partner store holding ``rank``'s copy of a version here, or ``None``."""
        for owner in self._owners():
            store = self._store(owner)
            if store.manifest_path(name, version, rank).exists():
                return store
        return None

    def _nodes(self):
        """Collective on first use: ``(node ids by peer index, {node: partner} or error)``."""
        if self._topology is None:
            pairs = self.ctx.peers.allgather((self.ctx.node, domain_of(self.ctx.config, self.ctx.node)))
            try:
                self._topology = ([n for n, _ in pairs], partners(pairs))
            except TopologyError as exc:
                self._topology = ([n for n, _ in pairs], exc)
        return self._topology

    def _partner_index(self):
        nodes, mapping = self._nodes()
        if isinstance(mapping, TopologyError):
            raise mapping
        return nodes.index(mapping[self.ctx.node])

    # -- CHECKPOINT ------------------------------------------------------------------
    def checkpoint(self, cmd):
        if not self.due(cmd):
            return False
        self.require_peers(cmd)
        self._local.update(cmd.ranks)
        dest = self._partner_index()          # same TopologyError on every node
        self._ship(cmd.name, cmd.version, cmd.ranks, dest, CheckpointError)
        # _ship returned on every node: the version's partner copies are committed everywhere
        self._complete.setdefault(cmd.name, set()).add(cmd.version)
        error = local(self._collect, cmd.name)[1]
        if error:
            self.ctx.log.warning("partner: garbage collection of %s failed: %s", cmd.name, error)
        return True

    def _ship(self, name, version, ranks, dest, error_cls):
        """Collective: send ``ranks``' scratch copies of a version to peer ``dest``."""
        def outgoing():
            out = []
            for rank in sorted(ranks):
                manifest = self.ctx.scratch(rank).read_manifest(name, version, rank)
                if manifest is None:
                    raise CheckpointError(f"rank {rank} has no committed scratch copy of {name} v{version}")
                out.append(manifest)
            return out

        mine, error = local(outgoing)
        what = f"partner copy of {name} v{version}"
        plans = gather(self.ctx.peers, self.ctx.node, (dest, mine), error, error_cls, what)
        me = self.ctx.peers.index
        sends = [(dest, m, self.ctx.scratch(m.rank)) for m in mine]
        recvs = [(src, m, self._store(m.node)) for src, (d, manifests) in enumerate(plans) if d == me
                 for m in manifests]
        self._transfer(sends, recvs, "partner", error_cls, what)

    def _transfer(self, sends, recvs, level, error_cls, what):
        """Collective: ``sends`` = [(dest, manifest, source store)], ``recvs`` = [(source,
        manifest, destination store)]; destination manifests are committed at ``level``."""
        peers, node = self.ctx.peers, self.ctx.node
        files = []

        def prepare():
            for _, manifest, store in recvs:
                store.remove(manifest.name, manifest.version, manifest.rank)   # uncommit first
                vdir = store.version_dir(manifest.name, manifest.version)
                old, reuse = self._victim(store, manifest) if level == "partner" else (None, {})
                files.extend(IncomingFile(vdir / e.name, e.size, store.durable, reuse.get(e.name))
                             for e in manifest.files)
                if old is not None:
                    store.remove(manifest.name, old, manifest.rank)
            for _, manifest, store in sends:
                vdir = store.version_dir(manifest.name, manifest.version)
                files.extend(OutgoingFile(vdir / e.name, e.size) for e in manifest.files)

        error = local(prepare)[1]
        try:
            settle(peers, node, error, error_cls, what)
            fault_point("partner_transfer")
            incoming = [f for f in files if isinstance(f, IncomingFile)]
            outgoing = [f for f in files if isinstance(f, OutgoingFile)]
            ex = Exchange(peers.comm, TAG_PARTNER)
            pos = 0
            for src, manifest, _ in recvs:
                for _ in manifest.files:
                    ex.recv(incoming[pos].view, src)
                    pos += 1
            pos = 0
            for dest, manifest, _ in sends:
                for _ in manifest.files:
                    ex.send(outgoing[pos].view, dest)
                    pos += 1
            ex.wait()

            def finish():
                pos = 0
                for _, manifest, store in recvs:
                    for entry in manifest.files:
                        incoming[pos].commit(manifest.checksum, entry.digest)
                        pos += 1
                    copy = manifest.copy_for(level, node=node if level == "scratch" else manifest.node)
                    if level == "partner":
                        copy.record_module(self.name, holder=node)
                    store.commit_manifest(copy)
            error = local(finish)[1]
        finally:
            close_all(files)
        settle(peers, node, error, error_cls, what)

    def _victim(self, store, manifest):
        """The copy that garbage collection drops once ``manifest``'s version is in: its
        version and ``{file name: path}``, uncommitted here so its files can be reused.

        Only while a newer copy of the same rank stays committed that every node's partner
        committed (this engine saw that version's transfer finish everywhere): the partner
        level never goes without a complete version, even for the length of a transfer.
        So with ``scratch_versions = 1`` the new copy takes fresh space and the old one is
        dropped only after the new one is committed on every node."""
        keep = self.ctx.config.scratch_versions
        name, rank = manifest.name, manifest.rank
        older = sorted(v for v in store.rank_versions(name, rank) if v != manifest.version)
        if keep <= 0 or len(older) < keep:
            return None, {}
        if not set(older[1:]) & self._complete.get(name, set()):
            return None, {}
        victim = older[0]
        store.manifest_path(name, victim, rank).unlink(missing_ok=True)
        vdir = store.version_dir(name, victim)
        return victim, {e.name: vdir / e.name for e in manifest.files if (vdir / e.name).is_file()}

    def _collect(self, name):
        keep = self.ctx.config.scratch_versions
        if keep <= 0:
            return
        for owner in self._owners():
            store = self._store(owner)
            by_rank = {}
            for version, ranks in store.versions(name).items():
                for rank in ranks:
                    by_rank.setdefault(rank, []).append(version)
            for rank, versions in by_rank.items():
                for version in sorted(versions, reverse=True)[keep:]:
                    store.remove(name, version, rank)

    def supersede(self, name, threshold, ranks):
        """This node's partner tree: every owner's copies ``>= threshold`` (each node of the
        job cleans its own tree)."""
        removed = set()
        for owner in self._owners():
            store = self._store(owner)
            for version, owner_ranks in store.versions(name).items():
                if version >= threshold:
                    for rank in owner_ranks:
                        store.remove(name, version, rank)
                    removed.add(version)
        return removed

    # -- RESTART ---------------------------------------------------------------------
    def available(self, name, ranks):
        if not self.peers_connected():
            return {}
        self._local.update(ranks)
        held = {}
        for owner in self._owners():
            for version, owner_ranks in self._store(owner).versions(name).items():
                for rank in owner_ranks:
                    held.setdefault(rank, set()).add(version)
        tables = self.ctx.peers.allgather(held)
        return {r: set().union(*(t.get(r, set()) for t in tables)) for r in ranks}

    def verify(self, name, version, ranks):
        if not self.peers_connected():
            return {r: "no partner level (single node)" for r in ranks}
        requests = self.ctx.peers.allgather(sorted(ranks))
        wanted = sorted({r for req in requests for r in req})
        if not wanted:
            return {}
        found = {}
        for rank in wanted:
            store = self._find(name, version, rank)
            if store is not None:
                found[rank] = verify_copy(store, name, version, rank, self.ctx.nranks)
        tables = self.ctx.peers.allgather(found)
        out = {}
        for rank in ranks:
            reasons = [t[rank] for t in tables if rank in t]
            if any(r is None for r in reasons):
                out[rank] = None
            elif reasons:
                out[rank] = "partner: " + "; ".join(reasons)
            else:
                out[rank] = f"no partner copy of {name} v{version} rank {rank} on any node"
        return out

    def restore(self, name, version, ranks):
        if not self.peers_connected():
            return False
        peers, node, me = self.ctx.peers, self.ctx.node, self.ctx.peers.index
        requests = peers.allgather(sorted(ranks))
        wanted = {r for req in requests for r in req}

        def inventory():
            intact, held = {}, set()
            for owner in self._owners():
                store = self._store(owner)
                for rank in store.versions(name).get(version, []):
                    try:
                        manifest = store.read_manifest(name, version, rank)
                        verify_files(manifest, store.version_dir(name, version), deep=rank in wanted)
                    except CorruptCheckpointError:
                        continue
                    held.add(rank)
                    if rank in wanted and rank not in intact:
                        intact[rank] = (manifest, owner)
            return intact, held

        what = f"partner restore of {name} v{version}"
        tables = gather(peers, node, *local(inventory), RestartError, what)
        sends, recvs, missing = [], [], []
        for requester, req in enumerate(requests):
            for rank in req:
                holder = next((h for h, (intact, _) in enumerate(tables) if rank in intact), None)
                if holder is None:
                    missing.append(rank)
                    continue
                manifest, owner = tables[holder][0][rank]
                if holder == me:
                    sends.append((requester, manifest, self._store(owner)))
                if requester == me:
                    recvs.append((holder, manifest, self.ctx.scratch(rank)))
        if missing:
            raise RestartError(f"{what}: no intact partner copy of rank(s) {sorted(missing)} on any node")
        self._transfer(sends, recvs, "scratch", RestartError, what)
        self._reprotect(name, version, set(ranks), tables)
        return True

    def _reprotect(self, name, version, restored, tables):
        """Collective: ship local ranks whose partner no longer holds the version."""
        nodes, mapping = self._nodes()
        if isinstance(mapping, TopologyError):
            return
        dest = nodes.index(mapping[self.ctx.node])
        held_at_dest = tables[dest][1]

        def todo():
            out = []
            for rank in sorted(self._local | restored):
                if rank in held_at_dest:
                    continue
                if self.ctx.scratch(rank).manifest_path(name, version, rank).exists():
                    out.append(rank)
            return out

        ranks, error = local(todo)
        if error:
            self.ctx.log.warning("partner: cannot re-protect %s v%d: %s", name, version, error)
        if not any(self.ctx.peers.allgather(bool(ranks))):
            return
        self._ship(name, version, ranks or [], dest, RestartError)
        if ranks:
            self.ctx.log.info("partner: re-protected %s v%d of rank(s) %s on node %s",
                              name, version, ranks, nodes[dest])
