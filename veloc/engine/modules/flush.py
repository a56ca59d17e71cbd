"""Flush module (priority 50): level 4, persistent storage (POSIX files on a parallel FS).

Runs in the node's engine. On CHECKPOINT it copies each local rank's verified scratch
files to ``persistent`` and commits a manifest there (atomic: temp + fsync + rename +
directory fsync). The copy is written with O_DIRECT from the mapping the checksum module
made of the file moments before (``[flush] direct_io``): no page-cache copy, no
writeback, and no second hash of data whose digest was just computed; ranks are flushed
in parallel (``max_parallelism``). On RESTART it copies them back to scratch, verifying
digests on the way. ``[flush] format`` chooses how a version is stored there
(``native`` copies, or ``hdf5`` files: ``veloc.engine.formats``). Frequency: ``[flush] every = N`` versions and/or
``persistent_interval`` seconds (VELOC's key: 0 = every version, < 0 = never); a
time-based decision is taken by node 0 and shared, so every node flushes the same
versions.
"""

from ...errors import CheckpointError, CorruptCheckpointError
from ...faults import fault_point
from ..formats import copy_verified, make_writer, version_complete
from ..module import Module
from .scratch import remove_versions_from, verify_copy


class FlushModule(Module):
    name = "flush"
    level = "persistent"

    def __init__(self, ctx):
        super().__init__(ctx)
        interval = self.section.get("interval")
        self.interval = ctx.config.persistent_interval if interval is None else interval
        self.direct_io = self.section["direct_io"]
        self.writer = make_writer(self.section) if self.enabled else None

    def default_enabled(self):
        return self.ctx.config.persistent is not None and self.ctx.config.persistent_interval >= 0

    def checkpoint(self, cmd):
        if not self.due(cmd):
            return False
        self.for_each_rank(cmd.ranks, lambda rank: self._flush_rank(cmd, rank))
        self.writer.finish_version(self.ctx, cmd)
        return True

    def _flush_rank(self, cmd, rank):
        manifest = self.ctx.scratch(rank).read_manifest(cmd.name, cmd.version, rank)
        if manifest is None:
            raise CheckpointError(f"flush of {cmd.name} v{cmd.version}: rank {rank} has no committed "
                                  f"scratch copy on node {self.ctx.node}")
        out = self.writer.write_rank(self.ctx, cmd, rank, manifest)
        out.record_module(self.name, every=self.every, interval=self.interval, format=self.writer.name)
        fault_point("flush")
        self.ctx.persistent(rank).commit_manifest(out)

    def supersede(self, name, threshold, ranks):
        return remove_versions_from(self.ctx.persistent, name, threshold, ranks)

    def available(self, name, ranks):
        out = {}
        for rank in ranks:
            store = self.ctx.persistent(rank)
            out[rank] = {v for v in store.rank_versions(name, rank)
                         if version_complete(store.version_dir(name, v), rank)} if store else set()
        return out

    def verify(self, name, version, ranks):
        out = {}
        for rank in ranks:
            store = self.ctx.persistent(rank)
            if store is not None and not version_complete(store.version_dir(name, version), rank):
                out[rank] = (f"{name} v{version} at persistent is incomplete: its HDF5 files lack "
                             f"{store.version_dir(name, version)}/global.h5 (not every rank's copy was flushed)")
                continue
            out[rank] = verify_copy(store, name, version, rank, self.ctx.nranks)
        return out

    def restore(self, name, version, ranks):
        for rank in ranks:
            src = self.ctx.persistent(rank)
            manifest = src.read_manifest(name, version, rank)
            if manifest is None:
                raise CorruptCheckpointError(f"no persistent copy of {name} v{version} for rank {rank}")
            dst = self.ctx.scratch(rank)
            copy_verified(manifest, src, dst, "restore")
            dst.commit_manifest(manifest.copy_for("scratch", node=self.ctx.node))
        return True
