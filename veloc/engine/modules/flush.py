"""Flush module (priority 50): level 4, persistent storage (POSIX files on a parallel FS).

Runs in the node's engine. On CHECKPOINT it copies each local rank's verified scratch
files to ``persistent`` and commits them with one record per node (per persistent folder
where ``{node}``/``{rank}`` give ranks their own; atomic: the files synced, the folder
synced once, the record written as temp + fsync + rename + directory fsync; see
``veloc.storage.node_records``). A rank whose copy failed is left out of the record and
its error raised once the others are committed. The copy is written with O_DIRECT from
the engine's mapping of the scratch file, kept from the file's earlier turns in the
rotation (``[flush] direct_io``; ``veloc.storage.hashing.MappedFiles``): no page-cache
copy, no writeback, no page-table population per flush, and no second hash of data
whose digest is known. The commit record carries each copy's fingerprint, so a restart
reads and hashes an unchanged copy in one pass; ranks are flushed in parallel (``max_parallelism``). On RESTART it copies them back to scratch, verifying
digests on the way. ``[flush] format`` chooses how a version is stored there
(``native`` copies, or ``hdf5`` files: ``veloc.storage.formats``). Frequency: ``[flush]
every = N`` versions and/or ``persistent_interval`` seconds (VELOC's key: 0 = every version, < 0 = never); a
time-based decision is taken by node 0 and shared, so every node flushes the same
versions.

With ``[compress]`` (priority 20) having written a compressed sidecar for a rank, the
native format copies that instead of the raw rank file (the persistent manifest lists
it as a ``compressed`` file), and a restore to scratch rebuilds the raw rank file from
it (``veloc.storage.compressed_copy``).
"""

from veloc.config_keys import Key, boolean, choice, integer, module_keys
from veloc.errors import CheckpointError, ConfigError, CorruptCheckpointError
from veloc.faults import fault_point
from veloc.storage.compressed_copy import restore_compressed
from veloc.storage.formats import copy_verified, make_writer, version_complete
from veloc.engine.module import Module
from veloc.engine.modules.scratch import remove_versions_from, verify_copy


def check_flush_format(flush, top, source=""):
    """``[flush] format = hdf5`` needs h5py, and one persistent folder for the whole job
    (its per-version ``global.h5`` refers to every rank's file)."""
    if flush.get("format") != "hdf5":
        return
    where = f" in {source}" if source else ""
    try:
        import h5py  # noqa: F401
    except ImportError:
        raise ConfigError(f"[flush] format = hdf5{where} needs h5py, which is not installed: "
                          "pip install 'veloc[hdf5]' (or use format = native)") from None
    persistent = top.get("persistent") or ""
    if "{node}" in persistent or "{rank" in persistent:
        raise ConfigError(f"[flush] format = hdf5{where} needs one persistent folder shared by every rank, "
                          f"but persistent = {persistent!r} has a {{node}}/{{rank}} placeholder: remove it "
                          "or use format = native")


class FlushModule(Module):
    name = "flush"
    config_keys = module_keys(50, interval=Key(integer(), None), direct_io=Key(boolean, True),
                              format=Key(choice("native", "hdf5"), "native"))
    level = "persistent"

    @classmethod
    def check_config(cls, section, top, source):
        check_flush_format(section, top, source)

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
        results = self.for_each_rank(cmd.ranks, lambda rank: _outcome(self._flush_rank, cmd, rank))
        by_root = {}
        for rank, (out, _) in zip(cmd.ranks, results):
            if out is not None:
                store = self.ctx.persistent(rank)
                by_root.setdefault(str(store.root), (store, []))[1].append(out)
        for store, manifests in by_root.values():
            store.commit_record(manifests)
        failure = next((error for _, error in results if error is not None), None)
        if failure is not None:
            raise failure
        self.writer.finish_version(self.ctx, cmd)
        return True

    def _flush_rank(self, cmd, rank):
        """Write ``rank``'s copy at persistent (not yet committed); return its manifest."""
        manifest = self.ctx.scratch(rank).read_manifest(cmd.name, cmd.version, rank)
        if manifest is None:
            raise CheckpointError(f"flush of {cmd.name} v{cmd.version}: rank {rank} has no committed "
                                  f"scratch copy on node {self.ctx.node}")
        out = self.writer.write_rank(self.ctx, cmd, rank, manifest)
        out.record_module(self.name, every=self.every, interval=self.interval, format=self.writer.name)
        fault_point("flush")          # once per rank, its files written, the node's record not yet
        return out

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
            if manifest.file("compressed") is not None:
                out = restore_compressed(manifest, src, dst, self.ctx.node)
            else:
                copy_verified(manifest, src, dst, "restore")
                out = manifest.copy_for("scratch", node=self.ctx.node)
            dst.commit_manifest(out)
        return True


def _outcome(work, *args):
    """``(result, None)``, or ``(None, the exception)`` when ``work`` raised one."""
    try:
        return work(*args), None
    except Exception as exc:        # raised by the caller once the other ranks are committed
        return None, exc
