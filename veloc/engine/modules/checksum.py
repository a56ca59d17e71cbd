"""Checksum module (priority 10): content digest of every file of the scratch copy.

Runs in the node's engine (sync leader or backend) right after the application ranks
committed their scratch copies; it re-commits each rank's scratch manifest with the
digests, which every later copy carries and every read verifies, and with each file's
fingerprint (device, inode, size, mtime, ctime) when hashed, so that ``restart_test``
can tell an untouched scratch file from a modified one without hashing it again.
"""
import os

from veloc.storage.hashing import digest_file
from veloc.storage.manifest import file_fingerprint
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
            path = vdir / entry.name
            before = file_fingerprint(os.stat(path))
            entry.digest = digest_file(path, self.algorithm, mapped_files=cmd.mapped)
            # the file's identity when hashed: restart trusts the digest of an unchanged file
            # until the read checks it, instead of hashing the whole file a second time
            entry.fingerprint = before if file_fingerprint(os.stat(path)) == before else None
        manifest.checksum = self.algorithm
        manifest.record_module(self.name, algorithm=self.algorithm)
        fault_point("checksum")
        store.commit_manifest(manifest)
        cmd.fresh_digests.add(rank)
