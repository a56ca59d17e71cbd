"""Compress module (priority 20): compressed copies for the persistent level.

Runs in the node's engine (sync-mode leader rank or active backend), after the checksum
module and before partner, erasure and flush. For each local rank it encodes the scratch
rank file ``r<rank>.vck`` into a compressed sidecar ``r<rank>.vcz`` in the same scratch
version folder (``veloc/storage/compressed_file.py``: independent blocks, the codec of
each region in its header) and records it in the rank's scratch manifest, under this
module's entry: file name, stored size and the digest of the *stored* bytes (computed
while writing), raw size and each region's codec. The flush module then copies the
sidecar instead of the raw file (``[compress] levels`` holds ``persistent``, the
default and only level that stores compressed data), and the persistent manifest lists
it as a ``compressed`` file, so every later read checks the stored bytes before decoding.

Scratch, partner and erasure keep the raw file, so they restore in place without a
decode. ``codec = auto`` measures each region (:func:`~veloc.storage.compressed_file.plan_codecs`);
when no region shrinks, no sidecar is written and the flush copies the raw file as
without compression, so incompressible data costs only the probe. A region the user
protected with ``lossy=("zfp", bound)`` is stored with zfp within ``bound``.

It acts on the versions the flush copies: nothing without a persistent level or with
the flush off, and by default on every ``[flush] every``-th version (``[compress]
every`` overrides it). With a time-based flush (``persistent_interval`` or ``[flush]
interval`` > 0) it cannot know in advance which versions the flush will take, so it
compresses every ``every``-th version.
"""
import logging

from veloc.config_keys import Key, byte_size, choice, integer, module_keys
from veloc.errors import CheckpointError, ConfigError, VelocError
from veloc.faults import fault_point
from veloc.storage.compressed_copy import compressed_record, sidecar_name  # noqa: F401  (re-exported)
from veloc.storage.compressed_file import plan_codecs, write_compressed
from veloc.storage.hashing import DEFAULT_ALGORITHM
from veloc.engine.module import Module
from veloc.storage.rankfile import RankFile


log = logging.getLogger("veloc.compress")


def _compressed_levels(key, raw):
    names = tuple(n.strip() for n in str(raw).split(",") if n.strip())
    if not names or any(n != "persistent" for n in names):
        raise ConfigError(f"config key '{key}' = {raw!r}: accepted: persistent (scratch, partner and erasure "
                          "keep raw files, so they restore in place without a decode)")
    return names


def check_compress_keys(section, source=""):
    """Cross-key checks of ``[compress]``: a level the codec takes, its library installed."""
    where = f" in {source}" if source else ""
    codec, level = section.get("codec"), section.get("level")
    ranges = {"zstd": (-7, 22), "blosc2": (0, 9), "lz4": (1, 65537), "auto": (1, 9), "none": (None, None)}
    low, high = ranges.get(codec, (None, None))
    if level is not None and low is not None and not low <= level <= high:
        raise ConfigError(f"config key 'compress.level' = {level}{where}: codec {codec} takes levels "
                          f"{low}..{high}")
    if section.get("enabled") and codec not in (None, "none"):
        from veloc.storage.codecs import codec_names, get_codec
        wanted = ("zstd", "blosc2") if codec == "auto" else (codec,)
        errors = []
        for name in wanted:
            try:
                get_codec(name)
                return
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key 'compress.codec' = {codec}{where}: {errors[0]} "
                          f"(registered: {', '.join(codec_names())})")


class CompressModule(Module):
    name = "compress"
    config_keys = module_keys(20, codec=Key(choice("auto", "zstd", "lz4", "blosc2", "none"), "auto"),
                              level=Key(integer(), None), block_size=Key(byte_size(64 << 10, 1 << 30), 4 << 20),
                              levels=Key(_compressed_levels, ("persistent",)))

    @classmethod
    def check_config(cls, section, top, source):
        check_compress_keys(section, source)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.codec = self.section["codec"]
        self.level = self.section["level"]
        self.block_size = self.section["block_size"]
        self.levels = self.section["levels"]
        flush = ctx.config.section("flush")
        if "every" not in ctx.config.raw.get(self.name, {}):
            self.every = flush["every"]          # compress the versions the flush copies
        interval = flush.get("interval")
        interval = ctx.config.persistent_interval if interval is None else interval
        self.flushed = ctx.config.persistent is not None and interval >= 0 and flush.get("enabled") is not False
        if self.enabled and self.flushed and flush.get("format") == "hdf5":
            # the HDF5 format writes its datasets from the raw rank file: no sidecar to make
            log.warning("[compress] is enabled but [flush] format = hdf5 stores uncompressed datasets; "
                        "compression applies to format = native only")
            self.flushed = False

    def default_enabled(self):
        return False

    def checkpoint(self, cmd):
        if not self.flushed or not self.due(cmd):
            return False
        self.for_each_rank(cmd.ranks, lambda rank: self._compress_rank(cmd, rank))
        return True

    def _compress_rank(self, cmd, rank):
        store = self.ctx.scratch(rank)
        manifest = store.read_manifest(cmd.name, cmd.version, rank)
        entry = manifest.file("regions") if manifest is not None else None
        if entry is None:
            return
        vdir = store.version_dir(cmd.name, cmd.version)
        checksum = manifest.checksum or DEFAULT_ALGORITHM
        params = {"codec": self.codec, "level": self.level, "block_size": self.block_size,
                  "levels": list(self.levels)}
        try:
            mapped = cmd.mapped.get(vdir / entry.name) if cmd.mapped is not None else None
            with RankFile(vdir / entry.name, mapped=mapped) as rankfile:
                plan = plan_codecs(rankfile, self.codec, self.level)
                if all(name == "none" for name in plan.values()):
                    params["stored"] = "raw"
                else:
                    source = entry.digest if manifest.checksum else None
                    size, digest = write_compressed(rankfile, vdir / sidecar_name(rank), plan, self.level,
                                                    self.block_size, durable=store.durable,
                                                    checksum=checksum, source_digest=source)
                    lossy = {str(r["id"]): float(r["lossy"][1]) for r in rankfile.meta["regions"]
                             if plan.get(r["id"]) == "zfp"}
                    params.update(file=sidecar_name(rank), size=size, digest=digest, checksum=checksum,
                                  raw_size=rankfile.size, codecs={str(k): v for k, v in plan.items()},
                                  lossy_error_bounds=lossy)
        except VelocError:
            raise
        except OSError as exc:
            raise CheckpointError(f"compress: cannot write {vdir / sidecar_name(rank)} for rank {rank}: "
                                  f"{exc.strerror or exc}") from exc
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"compress: encoding {vdir / entry.name} of rank {rank} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if params.get("stored") == "raw":
            return               # nothing to record: the flush copies the raw file as it is
        manifest.record_module(self.name, **params)
        fault_point("compress")
        store.commit_manifest(manifest)
