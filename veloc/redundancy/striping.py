"""Erasure-group data plane: group records, data blocks, and the encode/rebuild exchanges.

Who calls what: the ``[erasure]`` module (veloc/engine/modules/erasure.py) in every
node's engine (sync-mode node leader or active backend). ``GroupStore`` and the block
helpers are local; ``encode_exchange`` and ``rebuild_exchange`` are point-to-point over
``ctx.peers.comm`` between the members of one group (nonblocking uppercase mpi4py on
numpy buffers; see ``veloc.redundancy.transfer``), and must be entered by every member of
the group with the same arguments apart from its own index and buffers.

A member's *data block* is the concatenation of the files of its ranks' scratch copies
(ranks ascending, files in manifest order), zero-padded to ``k * chunk`` bytes where
``chunk = ceil(max member length / k)``; chunk ``t`` of it feeds the stripe where the
member sits at data position ``t`` (``veloc.redundancy.topology``). Encoding sends the
chunks straight from the files' mappings; a rebuild reads survivors' blocks into memory.

The *group record* ``<scratch>/.erasure/<name>/v<version>/group.json`` (the same on
every member; it is the commit record, written last, atomically) holds: scheme,
backend and code of the codec, k, m, chunk, a ``stamp`` identifying the encoding, and
per member its node, failure domain, block length, block digest and its ranks' scratch
manifests (file names, sizes, digests) — enough for any surviving member to tell a
fresh node what its files were. Parity ``j`` of stripe ``s`` is ``s<s>.p<j>.par``
next to it; the record lists the digest of every parity block of the group.
"""
import json
import shutil

import numpy as np

from veloc.errors import CorruptCheckpointError
from veloc.storage.fileio import atomic_write_bytes, make_dirs, remove_quietly
from veloc.storage.hashing import digest_buffer, digest_file, hasher
from veloc.storage.levels import _VDIR
from veloc.storage.manifest import Manifest
from veloc.redundancy.topology import data_members, data_position, held_parity, parity_members
from veloc.redundancy.transfer import TAG_ERASURE, Exchange, OutgoingFile, close_all

RECORD = "group.json"
DIGEST = "xxh3_128"
FORMAT = 1


class GroupStore:
    """The erasure tree of one node: ``<root>/<name>/v<version>/{group.json, s*.p*.par}``."""

    def __init__(self, root, durable=True):
        self.root, self.durable = root, durable

    def version_dir(self, name, version):
        return self.root / name / f"v{int(version)}"

    def parity_path(self, name, version, stripe, j):
        return self.version_dir(name, version) / f"s{int(stripe)}.p{int(j)}.par"

    def versions(self, name):
        """Versions of ``name`` with a committed group record here, ascending."""
        return sorted(version for version, _, committed in self.version_dirs(name) if committed)

    def version_dirs(self, name):
        """``[(version, folder, committed)]`` of every version folder of ``name`` here; a
        folder without a group record is an interrupted encoding or a dropped victim (crash
        debris, ``veloc.storage.debris``, once no encoding runs on this node)."""
        try:
            dirs = list((self.root / name).iterdir())
        except OSError:
            return []
        out = []
        for d in dirs:
            m = _VDIR.fullmatch(d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d, (d / RECORD).exists()))
        return sorted(out)

    def read_record(self, name, version):
        """The committed record or ``None``; CorruptCheckpointError if unreadable."""
        path = self.version_dir(name, version) / RECORD
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CorruptCheckpointError(f"{path}: unreadable erasure group record ({exc})") from None
        if raw.get("format") != FORMAT or (raw.get("name"), raw.get("version")) != (name, version):
            raise CorruptCheckpointError(f"{path}: not the group record of {name} v{version}")
        return raw

    def uncommit(self, name, version):
        remove_quietly(self.version_dir(name, version) / RECORD)

    def commit(self, record, parity, reuse=()):
        """Write ``parity`` ({(stripe, j): array}) then the record (the commit point).

        ``reuse``: uncommitted old parity files whose allocated space the new ones take over.
        """
        name, version = record["name"], record["version"]
        vdir = self.version_dir(name, version)
        make_dirs(vdir)
        reuse = list(reuse)
        for (s, j), block in sorted(parity.items()):
            path = self.parity_path(name, version, s, j)
            # over an allocated file of a collected version: ~3x faster than fresh tmpfs pages
            atomic_write_bytes(path, block, durable=self.durable, reuse=reuse.pop() if reuse else None)
        atomic_write_bytes(vdir / RECORD, json.dumps(record, sort_keys=True).encode(), durable=self.durable)

    def take_victim(self, name, version, keep, complete=()):
        """The version garbage collection drops once ``version`` is in (``keep`` newest kept),
        uncommitted, and its parity files: ``(version or None, [paths])``.

        Only while a newer version in ``complete`` (committed by every member of the group)
        stays: the level never goes without a complete version, even while encoding."""
        older = [v for v in self.versions(name) if v != version]
        if keep <= 0 or len(older) < keep or not set(older[1:]) & set(complete):
            return None, []
        self.uncommit(name, older[0])
        return older[0], sorted(self.version_dir(name, older[0]).glob("s*.p*.par"))

    def parity_intact(self, record, member, deep=True):
        """``{(stripe, j)}`` of ``member``'s parity blocks that match ``record``."""
        g, m = len(record["members"]), record["m"]
        ok = set()
        for s, j in held_parity(member, g, m):
            path = self.parity_path(record["name"], record["version"], s, j)
            try:
                if path.stat().st_size == record["parity_len"] and (
                        not deep or digest_file(path, DIGEST) == record["parity"][s][j]):
                    ok.add((s, j))
            except OSError:
                continue
        return ok

    def read_parity(self, record, stripe, j):
        return np.fromfile(self.parity_path(record["name"], record["version"], stripe, j), dtype=np.uint8)

    def remove_version(self, name, version):
        self.uncommit(name, version)
        shutil.rmtree(self.version_dir(name, version), ignore_errors=True)


def manifests_of(entry):
    """The scratch manifests recorded for one member, as :class:`Manifest` objects."""
    return [Manifest.from_bytes(json.dumps(m).encode(), "erasure group record") for m in entry["manifests"]]


def write_ranks(scratch, manifests, block, node, ranks):
    """Cut ``block`` back into the files of ``ranks``, check digests, commit scratch manifests."""
    offset = 0
    for manifest in manifests:
        store = scratch(manifest.rank)
        if manifest.rank not in ranks:
            offset += sum(e.size for e in manifest.files)
            continue
        store.remove(manifest.name, manifest.version, manifest.rank)
        vdir = store.version_dir(manifest.name, manifest.version)
        make_dirs(vdir)
        for entry in manifest.files:
            data = block[offset:offset + entry.size]
            if manifest.checksum and entry.digest and digest_buffer(data, manifest.checksum) != entry.digest:
                raise CorruptCheckpointError(f"rebuilt {vdir / entry.name}: {manifest.checksum} mismatch")
            atomic_write_bytes(vdir / entry.name, data, durable=store.durable)
            offset += entry.size
        store.commit_manifest(manifest.copy_for("scratch", node=node))


def segments(sizes, start, length):
    """``[(file index, offset in file, offset in chunk, bytes)]`` covering bytes
    ``[start, start + length)`` of the concatenation of files of ``sizes``; whatever lies
    past the end of the files is padding (zeros) and is not covered."""
    out, pos = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(start, pos), min(start + length, pos + size)
        if hi > lo:
            out.append((i, lo - pos, lo - start, hi - lo))
        pos += size
    return out


def open_files(scratch, manifests):
    """Read-only mappings (``transfer.OutgoingFile``) of a member's files, in block order."""
    files = []
    try:
        for manifest in manifests:
            vdir = scratch(manifest.rank).version_dir(manifest.name, manifest.version)
            files.extend(OutgoingFile(vdir / e.name, e.size) for e in manifest.files)
    except BaseException:
        close_all(files)
        raise
    return files


def digest_files(files):
    """Digest of a member's unpadded block, hashed from its files' mappings."""
    h = hasher(DIGEST)
    for f in files:
        h.update(f.view)
    return h.hexdigest()


def encode_exchange(comm, peer, me, files, sizes, k, m, chunk, codec):
    """Collective within one group: returns ``(my parity {(s, j): array}, digests of the
    parity of the stripe I encode)``. ``peer[i]`` is member i's rank in ``comm``;
    ``files`` are my mapped files, ``sizes[i]`` member i's file sizes in block order.
    Chunks travel straight from the senders' file mappings (no staging copy there)."""
    g = len(peer)
    ex = Exchange(comm, TAG_ERASURE)
    stage = np.empty((k, chunk), dtype=np.uint8)
    for t, d in enumerate(data_members(me, g, m)):          # I encode stripe ``me``
        covered = 0
        for _, _, at, n in segments(sizes[d], t * chunk, chunk):
            ex.recv(stage[t, at:at + n], peer[d])
            covered = at + n
        stage[t, covered:] = 0
    mine = sizes[me]
    for s in range(g):
        t = data_position(me, s, g, m)
        if t is not None:
            for i, off, _, n in segments(mine, t * chunk, chunk):
                ex.send(files[i].view[off:off + n], peer[s])
    ex.wait()
    parity = codec.encode(list(stage))
    del stage
    mine = {(me, 0): parity[0]}
    for s, j in held_parity(me, g, m):
        if j:
            mine[(s, j)] = np.empty(parity[0].size, dtype=np.uint8)
            ex.recv(mine[(s, j)], peer[s])
    for j in range(1, m):
        ex.send(parity[j], peer[parity_members(me, g, m)[j]])
    ex.wait()
    return mine, [digest_buffer(p, DIGEST) for p in parity]


def rebuild_plan(g, m, lost, parity_ok):
    """``[(lost member, stripe, [(codec index, source member, kind, j or t)])]``: for every
    stripe holding data of a lost member, the first k surviving blocks to decode it from.
    ``parity_ok`` is the set of intact ``(stripe, j)`` on members not lost."""
    k = g - m
    plan = []
    for x in sorted(lost):
        for s in range(g):
            if data_position(x, s, g, m) is None:
                continue
            blocks = [(t, d, "data", t) for t, d in enumerate(data_members(s, g, m)) if d not in lost]
            blocks += [(k + j, p, "parity", j) for j, p in enumerate(parity_members(s, g, m))
                       if p not in lost and (s, j) in parity_ok]
            plan.append((x, s, sorted(blocks)[:k]))
    return plan


def rebuild_exchange(comm, peer, me, plan, files, sizes, parity_of, chunk, k, codec, block):
    """Collective within one group: survivors send the planned blocks (data chunks straight
    from their mapped ``files``, parity loaded by ``parity_of(s, j)``); every lost member
    decodes its chunks into ``block``, its own buffer of ``k * chunk`` bytes.
    ``sizes[i]`` are member i's file sizes in block order."""
    g = len(peer)
    m = g - k
    ex = Exchange(comm, TAG_ERASURE)
    received, loaded = {}, {}
    for x, s, blocks in plan:
        for index, src, kind, pos in blocks:
            if x == me:
                buf = received.setdefault((s, index), np.empty(chunk, dtype=np.uint8))
                if kind == "parity":
                    ex.recv(buf, peer[src])
                    continue
                covered = 0
                for _, _, at, n in segments(sizes[src], pos * chunk, chunk):
                    ex.recv(buf[at:at + n], peer[src])
                    covered = at + n
                buf[covered:] = 0
            elif src == me and kind == "data":
                for i, off, _, n in segments(sizes[me], pos * chunk, chunk):
                    ex.send(files[i].view[off:off + n], peer[x])
            elif src == me:
                if (s, pos) not in loaded:
                    loaded[(s, pos)] = parity_of(s, pos)
                ex.send(loaded[(s, pos)], peer[x])
    ex.wait()
    for x, s, blocks in plan:
        if x == me:
            data = codec.decode({index: received[(s, index)] for index, _, _, _ in blocks}, chunk)
            t = data_position(me, s, g, m)
            block[t * chunk:(t + 1) * chunk] = data[t]


# -- shared decisions (pure) ---------------------------------------------------------
def canonical(records):
    """``{node: record}``: the record each node belongs to, the same on every engine.

    Records with the most holders win (ties: lowest peer index); a node belongs to the
    first winning record that names it and no node of which is taken yet.
    """
    stamps = {}
    for idx, rec in enumerate(records):
        if rec:
            stamps.setdefault(rec["stamp"], [0, idx, rec])[0] += 1
    taken = {}
    for _, _, rec in sorted(stamps.values(), key=lambda c: (-c[0], c[1])):
        names = [e["node"] for e in rec["members"]]
        if not any(n in taken for n in names):
            taken.update((n, rec) for n in names)
    return taken


def member_index(rec, node):
    return [e["node"] for e in rec["members"]].index(node)


def ranks_of(rec, node):
    for e in rec["members"]:
        if e["node"] == node:
            return [m["rank"] for m in e["manifests"]]
    return []


def held_parity_all(rec):
    g, m = len(rec["members"]), rec["m"]
    return {p for i in range(g) for p in held_parity(i, g, m)}


def losses(rec, nodes, oks, lost_nodes):
    """``(lost member indices, lost parity (stripe, j) of surviving members)``."""
    g, m = len(rec["members"]), rec["m"]
    lost, lost_parity = set(), set()
    for i, e in enumerate(rec["members"]):
        if e["node"] not in nodes or e["node"] in lost_nodes:
            lost.add(i)
            continue
        lost_parity |= set(held_parity(i, g, m)) - set(oks[nodes.index(e["node"])])
    return lost, lost_parity
