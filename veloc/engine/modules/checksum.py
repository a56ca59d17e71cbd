"""Checksum module (priority 10): content digest of every file of the scratch copy.

Runs in the node's engine (sync leader or backend) right after the application ranks
committed their scratch copies; it re-commits each rank's scratch manifest with the
digests, which every later copy carries and every read verifies, and with each file's
fingerprint (device, inode, size, mtime, ctime) when hashed, so that ``restart_test``
can tell an untouched scratch file from a modified one without hashing it again.

With ``at_write`` (default), each application rank hashes its rank file while copying
it into a recycled scratch file (the steady state), chunk by chunk while the bytes are in
the CPU cache (``veloc.storage.rankfile``), and records digest and fingerprint in its
scratch manifest; this module then hashes only what the rank did not (a fresh rank file,
whose write is bound by page allocation; routed files), so in the steady state the
engine makes no pass over the rank files:
on a node whose cores all run ranks, that pass took CPU time and memory bandwidth from
them, about three times what the fused hash adds to the local write.
"""
import os

from veloc.storage.hashing import digest_file
from veloc.storage.manifest import file_fingerprint
from veloc.engine.module import Module
from veloc.config_keys import Key, boolean, choice, module_keys
from veloc.faults import fault_point


class ChecksumModule(Module):
    name = "checksum"
    config_keys = module_keys(10, algorithm=Key(choice("xxh3_128", "xxh3_64"), "xxh3_128"),
                              at_write=Key(boolean, True))

    @staticmethod
    def write_algorithm(config):
        """The algorithm with which an application rank hashes its rank file while writing
        it (``[checksum] at_write``, default on, and the module enabled), else ``None``.
        Called by each application rank once, at ``init``."""
        section = config.section("checksum") if "checksum" in config.sections else {}
        enabled = section.get("enabled")
        if not (config.chksum if enabled is None else enabled) or not section.get("at_write", True):
            return None
        return section.get("algorithm", "xxh3_128")

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
        hashed_at_write = manifest.checksum == self.algorithm
        for entry in manifest.files:
            if hashed_at_write and entry.digest:
                continue      # the rank hashed it while writing it: no second pass over it
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
