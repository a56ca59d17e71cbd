"""Level 1: node-local scratch, written by the application ranks themselves.

This module only answers for that level (which versions each local rank holds there,
and whether they are intact); it never copies. Runs in the node's engine.
"""
from veloc.errors import CorruptCheckpointError
from veloc.storage.manifest import verify_files
from veloc.engine.module import Module


class ScratchLevel(Module):
    name = "scratch"
    level = "scratch"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.priority = 0

    def available(self, name, ranks):
        return {rank: set(self.ctx.scratch(rank).rank_versions(name, rank)) for rank in ranks}

    def verify(self, name, version, ranks):
        out = {}
        for rank in ranks:
            out[rank] = verify_copy(self.ctx.scratch(rank), name, version, rank, self.ctx.nranks)
        return out

    def restore(self, name, version, ranks):
        return True  # already there: verify() said so

    def supersede(self, name, threshold, ranks):
        return remove_versions_from(lambda rank: self.ctx.scratch(rank), name, threshold, ranks,
                                    pool=self.ctx.pool)


def remove_versions_from(store_of, name, threshold, ranks, pool=None):
    """Remove each rank's copies of ``name`` with versions ``>= threshold`` from its store
    (``store_of(rank)``, or ``None`` where the level is not configured); rank files go
    to ``pool(rank)`` for reuse when given. Returns the versions removed."""
    removed = set()
    for rank in ranks:
        store = store_of(rank)
        if store is None:
            continue
        for version in store.rank_versions(name, rank):
            if version >= threshold:
                store.remove(name, version, rank, pool=pool(rank) if pool else None)
                removed.add(version)
    return removed


def verify_copy(store, name, version, rank, nranks=None):
    """``None`` if ``rank``'s copy of ``name``/``version`` in ``store`` is intact, else why not.

    With ``nranks``, a copy written by a job of another size does not count.
    """
    try:
        manifest = store.read_manifest(name, version, rank)
        if manifest is None:
            return f"no copy of {name} v{version} rank {rank} at {store.level} ({store.root})"
        if nranks is not None and manifest.nranks != nranks:
            return (f"{name} v{version} at {store.level} was written by a job of {manifest.nranks} ranks, "
                    f"this job has {nranks}")
        verify_files(manifest, store.version_dir(name, version))
    except CorruptCheckpointError as exc:
        return str(exc)
    return None
