"""Restart on another rank count: a job of M ranks restores a version written by N ranks
in the HDF5 format, when every region it protects is global or replicated.

Mixed into :class:`veloc.restart.RestartMixin`; every method runs on each application
rank and the ``_reshape_*`` agreements are collective over the client's communicator,
called by every rank in the same order (from ``restart_test`` and ``restart_begin``), so
a refusal on one rank is learned by all of them and nobody waits.

How a version is agreed (newest first, only versions newer than what a same-size
restart would take): rank 0 lists the persistent versions that have a ``global.h5``
(complete HDF5 versions) and reads that file's description (writer rank count, regions
and how each is laid out); every rank checks its protected regions against it (a
region neither global nor replicated in the checkpoint would have to be redistributed:
refused, naming it); the N rank files are verified (manifest, sizes, digests), old rank
``r`` by new rank ``r mod M``, so each file is hashed once. Restoring then reads each
global region's slab (this rank's ``global_shape``/``offset`` as protected now) as a
hyperslab through ``global.h5``'s virtual dataset straight into the protected array,
and a replicated region from the lowest-numbered intact rank file. A version with
routed files (file-based mode) restores on its own rank count only.
"""
import logging
import re

import numpy as np

from veloc.storage.hdf5_format import GLOBAL_FILE, GlobalFile, Hdf5RankFile, rank_file_name
from veloc.storage.levels import LevelStore
from veloc.storage.rankfile import RegionInfo, dtype_descr
from veloc.engine.modules.scratch import verify_copy
from veloc.errors import RestartError, VelocError

log = logging.getLogger("veloc.restart")
_VDIR = re.compile(r"v(\d+)")


class ReshapeReader:
    """This rank's view of a version written on another rank count: the calls restart
    makes on a rank file (``regions``, ``region``, ``as_array``, ``read_into``,
    ``bytes_view``, ``close``), answered from ``global.h5`` and one replica rank file."""

    def __init__(self, plan, regions):
        self.path = plan["path"]
        self._global = GlobalFile(plan["path"])
        self._replica = None
        self._how = {}
        self.regions = []
        try:
            for region_id, region in regions.items():
                desc = self._global.regions.get(region_id)
                if desc is None:
                    continue
                if desc["how"] == "replicated":
                    if self._replica is None:
                        self._replica = Hdf5RankFile(plan["replica"])
                    info = self._replica.region(region_id)
                else:
                    shape = tuple(region.obj.shape)
                    info = RegionInfo(region_id, "array", desc["dtype"], shape, desc["order"], 0,
                                      int(np.prod(shape, dtype=np.int64)) * region.obj.dtype.itemsize,
                                      desc["dtype_name"], tuple(desc["global_shape"]),
                                      tuple(region.layout["global_offset"]))
                if info is not None:
                    self._how[region_id] = desc["how"]
                    self.regions.append(info)
        except BaseException:
            self.close()
            raise

    def region(self, region_id):
        for info in self.regions:
            if info.id == region_id:
                return info
        return None

    def as_array(self, info):
        if self._how[info.id] == "replicated":
            return self._replica.as_array(info)
        out = np.empty(info.shape, info.numpy_dtype(), order=info.order)
        self._global.read_slab(info.id, info.global_offset, out)
        return out

    def read_into(self, info, out):
        """Fill ``out`` in place: a hyperslab read through the virtual dataset, no temporary."""
        if self._how[info.id] == "replicated":
            self._replica.read_into(info, out)
        elif out.flags.c_contiguous if info.order == "C" else out.flags.f_contiguous:
            self._global.read_slab(info.id, info.global_offset, out)
        else:
            np.copyto(out, self.as_array(info), casting="no")

    def bytes_view(self, info):
        return self._replica.bytes_view(info)

    def load_bytes(self, info):
        """The bytes of region ``info`` (a pickled object), as a read-only view."""
        return self.bytes_view(info)

    def close(self):
        if self._replica is not None:
            self._replica.close()
        self._global.close()


class ReshapeMixin:
    """The agreements and the open of a restart on another rank count."""

    def _reshape_root(self):
        return self.config.persistent_dir(self.node, 0)

    def _reshape_newest(self, name, max_version, floor):
        """Collective: the newest version newer than ``floor`` (``None``: any) and not above
        ``max_version`` that this job restores from a job of another size, or ``None``;
        its plan is kept for ``restart_begin``."""
        self._reshape_plans = {}
        candidates = None
        if self.comm.Get_rank() == 0:
            candidates = self._reshape_candidates(name, max_version, floor)
        for version in self.comm.bcast(candidates, root=0):
            plan, reason = self._reshape_agree(name, version)
            if plan is not None:
                self._reshape_plans[(name, version)] = plan
                return version
            if reason and self.comm.Get_rank() == 0:
                log.warning("%s v%d is not restorable on this job's %d ranks: %s", name, version,
                            self.comm.Get_size(), reason)
        return None

    def _reshape_candidates(self, name, max_version, floor):
        """Rank 0: versions with a ``global.h5`` at persistent, newest first."""
        root = self._reshape_root()
        if root is None:
            return []
        try:
            entries = list((root / name).iterdir())
        except OSError:
            return []
        out = []
        for vdir in entries:
            m = _VDIR.fullmatch(vdir.name)
            if not m:
                continue
            version = int(m.group(1))
            if ((floor is None or version > floor) and (max_version is None or version <= max_version)
                    and (vdir / GLOBAL_FILE).is_file()):
                out.append(version)
        return sorted(out, reverse=True)

    def _reshape_agree(self, name, version):
        """Collective: ``(plan, None)`` when every rank can restore ``version`` of ``name``
        from its HDF5 files at persistent on this job's rank count, else ``(None, why)``
        (``why`` is ``None`` for a version of this job's own size: not a reshape)."""
        root = self._reshape_root()
        vdir = None if root is None else LevelStore("persistent", root).version_dir(name, version)
        desc = None
        if self.comm.Get_rank() == 0:
            desc = self._reshape_describe(vdir)
        desc = self.comm.bcast(desc, root=0)
        if "error" in desc:
            return None, desc["error"]
        nranks, size = desc["nranks"], self.comm.Get_size()
        if nranks == size:
            return None, None
        failure = self.host.first_failure(self._reshape_check_regions(name, version, desc))
        if failure is not None:
            return None, f"rank {failure[0]}: {failure[1]}"
        mine, routed = [], None
        store = LevelStore("persistent", root)
        for old in range(self.comm.Get_rank(), nranks, size):
            reason = verify_copy(store, name, version, old)
            if reason is None and not (vdir / rank_file_name(old)).is_file():
                reason = f"{vdir / rank_file_name(old)} is missing: rank {old}'s copy is not in HDF5"
            if reason is None and any(f.kind != "regions" for f in store.read_manifest(name, version, old).files):
                routed = (f"writer rank {old} routed files (file-based mode), which cannot be "
                          "redistributed to another rank count")
            if reason is not None:
                mine.append((old, reason))
        failure = self.host.first_failure(routed)
        if failure is not None:
            return None, failure[1]
        bad = dict(item for part in self.comm.allgather(mine) for item in part)
        intact = [r for r in range(nranks) if r not in bad]
        needs_all = any(self.regions[i].layout.get("global_shape") for i in self.regions)
        if (needs_all and bad) or not intact:
            old, reason = min(bad.items())
            return None, f"the copy of writer rank {old} is not intact: {reason}"
        return {"path": str(vdir / GLOBAL_FILE), "nranks": nranks,
                "replica": str(vdir / rank_file_name(intact[0]))}, None

    @staticmethod
    def _reshape_describe(vdir):
        """Rank 0: what ``global.h5`` of a version says, or ``{"error": why}``."""
        if vdir is None or not (vdir / GLOBAL_FILE).is_file():
            return {"error": None}     # not an HDF5 version: nothing to say about it
        try:
            with GlobalFile(vdir / GLOBAL_FILE) as g:
                return {"nranks": g.nranks, "regions": g.regions, "local": g.local_regions}
        except VelocError as exc:
            return {"error": str(exc)}

    def _reshape_check_regions(self, name, version, desc):
        """This rank: ``None`` if every protected region can be restored from ``desc``, else
        why not, naming the region."""
        local = {item["id"]: item["reason"] for item in desc["local"]}
        where = f"{name} v{version} (written by {desc['nranks']} ranks, restarting on {self.comm.Get_size()})"
        for region_id, region in self.regions.items():
            stored = desc["regions"].get(region_id)
            if stored is None:
                why = local.get(region_id, "it is not in the checkpoint")
                return (f"region {region_id!r} of {where} cannot be redistributed: {why}. Only regions "
                        "protected with global_shape=/offset= or replicated=True restore on another rank count")
            pickled = region.kind == "pickle"
            if pickled != (stored["kind"] == "pickle"):
                return f"region {region_id!r} of {where} is stored as {stored['kind']}, protected as {region.kind}"
            if stored["how"] == "replicated":
                if not pickled and (dtype_descr(region.obj.dtype) != stored["dtype"]
                                    or list(region.obj.shape) != list(_shape(stored))):
                    return (f"replicated region {region_id!r} of {where} holds {stored['dtype']} "
                            f"{tuple(_shape(stored))}, the protected array is {region.obj.dtype} "
                            f"{tuple(region.obj.shape)}")
                continue
            gshape = region.layout.get("global_shape")
            if gshape is None:
                return (f"region {region_id!r} of {where} is a global array {tuple(stored['global_shape'])}: "
                        "protect it with global_shape= and offset= (this rank's slab) to restore it here")
            order = "C" if region.obj.flags.c_contiguous else "F"
            if region.obj.flags.c_contiguous and region.obj.flags.f_contiguous:
                order = stored["order"]        # laid out alike in both orders
            if (list(gshape) != list(stored["global_shape"]) or order != stored["order"]
                    or dtype_descr(region.obj.dtype) != stored["dtype"]):
                return (f"global region {region_id!r} of {where} is {stored['dtype']} "
                        f"{tuple(stored['global_shape'])} ({stored['order']} order); protected as "
                        f"{region.obj.dtype} {tuple(gshape)} ({order} order)")
        return None

    def _reshape_open(self, name, version, plan):
        """Collective: open the plan's files on every rank; raise RestartError everywhere if
        any rank cannot."""
        reader, error = None, None
        try:
            reader = ReshapeReader(plan, self.regions)
        except (VelocError, OSError) as exc:
            error = f"rank {self.rank}: cannot open {plan['path']}: {exc}"
        failure = self.host.first_failure(error)
        if failure is not None:
            if reader is not None:
                reader.close()
            raise RestartError(f"restart of {name!r} v{version} on another rank count failed on rank "
                               f"{failure[0]}: {failure[1]}")
        log.info("rank %d: restoring %s v%d (written by %d ranks) through %s", self.rank, name, version,
                 plan["nranks"], plan["path"])
        return reader

    def _reshape_fallback(self, name, version):
        """Collective, after a same-size restart of ``version`` was refused on some rank:
        ``(reader, None)`` to restore it on this rank count instead, or ``(None, why)``."""
        plan = getattr(self, "_reshape_plans", {}).get((name, version))
        why = None
        if plan is None:
            plan, why = self._reshape_agree(name, version)
        if plan is None:
            return None, why
        return self._reshape_open(name, version, plan), None


def _shape(stored):
    return stored.get("shape", ())


