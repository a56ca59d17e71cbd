"""Checksum module (priority 10): content digest of every file of the scratch copy.

Runs in the node's engine (sync leader or backend) right after the application ranks
committed their scratch copies; it re-commits each rank's scratch manifest with the
digests, which every later copy carries and every read verifies.
"""
from veloc.storage.hashing import digest_file
from veloc.engine.module import Module
from veloc.config_keys import Key, choice, module_keys
from veloc.faults import fault_point


class ChecksumModule(Module):
    name = "checksum"
    config_keys = module_keys(10, algorithm=Key(choice("xxh3_128", "xxh3_64"), "xxh3_128"))

    def __init__(self, ctx):
        super().__init__(ctx)
        self.algorithm = self.section["algorithm"]

    def default_enabled(self):
        return self.ctx.config.chksum

    def checkpoint(self, cmd):
        self.for_each_rank(cmd.ranks, lambda rank: self._digest_rank(cmd, rank))
        return True

    def _digest_rank(self, cmd, rank):
        store = self.ctx.scratch(rank)
        manifest = store.read_manifest(cmd.name, cmd.version, rank)
        if manifest is None:
            return
        vdir = store.version_dir(cmd.name, cmd.version)
        for entry in manifest.files:
            entry.digest = digest_file(vdir / entry.name, self.algorithm, mapped_files=cmd.mapped)
        manifest.checksum = self.algorithm
        manifest.record_module(self.name, algorithm=self.algorithm)
        fault_point("checksum")
        store.commit_manifest(manifest)
        cmd.fresh_digests.add(rank)
