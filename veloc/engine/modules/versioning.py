"""Versioning module (priority 90): garbage collection of old versions.

Runs last in the node's engine after each checkpoint. Keeps the newest
``scratch_versions`` versions of each local rank on scratch and ``max_versions`` on
persistent (VELOC's keys; 0 = keep all). It never deletes the newest version that is
complete at a level (every rank's manifest present), so a failed newer checkpoint can
never cost the last good one. Scratch files go to the recycle pool for reuse.
"""
from veloc.storage.debris import collect_engine
from veloc.engine.module import Module
from veloc.config_keys import module_keys
from veloc.faults import fault_point


class VersioningModule(Module):
    name = "versioning"
    config_keys = module_keys(90)
    collects_old_versions = True

    def checkpoint(self, cmd):
        cfg = self.ctx.config
        shared = {}     # persistent: a version's local ranks go together (one node record)
        for rank in cmd.ranks:
            self._collect(self.ctx.scratch(rank), cmd, rank, cfg.scratch_versions, self.ctx.pool(rank))
            persistent = self.ctx.persistent(rank)
            if persistent is not None:
                self._collect(persistent, cmd, rank, cfg.max_versions, None, shared)
        for (_, version), (store, ranks) in sorted(shared.items()):
            store.remove_ranks(cmd.name, version, ranks)
        collect_engine(self.ctx, cmd.name, cmd.ranks, before=cmd.version, logger=self.ctx.log)
        return True

    def _collect(self, store, cmd, rank, keep, pool, batch=None):
        if keep <= 0:
            return
        versions = store.versions(cmd.name)
        mine = sorted((v for v, ranks in versions.items() if rank in ranks), reverse=True)
        protected = set(mine[:keep])
        complete = [v for v, ranks in versions.items() if len(ranks) >= cmd.nranks]
        if store.level == "persistent" and complete:
            protected.add(max(complete))   # persistent is shared: completeness is visible
        for version in mine:
            if version not in protected:
                self.ctx.log.info("versioning: removing %s v%d rank %d from %s", cmd.name, version, rank,
                                  store.level)
                fault_point("versioning")
                if batch is None:
                    store.remove(cmd.name, version, rank, pool=pool)
                else:
                    batch.setdefault((str(store.root), version), (store, []))[1].append(rank)
