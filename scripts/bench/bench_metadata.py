#!/usr/bin/env python
"""Metadata cost of one checkpoint: files and metadata system calls per version, per level,
at 1, 2, 4, 8 and 16 virtual nodes.

For each node count V and each ``--ranks-per-node`` P, one sync-mode job of V x P ranks (MPMD, one
``VELOC_NODE_ID`` per virtual node; scratch per node on tmpfs, persistent shared on disk)
writes versions 1 and 2 (so scratch files are recycled, as in a long run), then version 3
between two marker calls, all under ``strace -f``. Counted for version 3 only:

* files: entries in the version folders, per level (scratch summed over the nodes);
* metadata operations: path-based calls (open/create, stat, rename, unlink, mkdir, rmdir,
  directory listings) that name the level's tree, between the markers, over every process
  and thread of the job, per level.

The last lines fit ``files = a * ranks + b * nodes`` and the same for operations, the
formula given in docs/ARCHITECTURE.md (two ranks-per-node values tell the per-rank and
per-node terms apart); the cost model there extrapolates it.

    python scripts/bench/bench_metadata.py --ranks-per-node 1,2    # 1..16 nodes, 1 and 2 ranks each
    python scripts/bench/bench_metadata.py --nodes 1,2,4 --ranks-per-node 2 --json out.json
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchlib import find_mpiexec

APP = textwrap.dedent("""
    import os, sys
    import numpy as np
    from mpi4py import MPI
    import veloc
    comm = MPI.COMM_WORLD
    client = veloc.init(sys.argv[1], comm)
    data = np.arange(8192, dtype=np.float64) + comm.Get_rank()
    client.protect("data", data)
    for v in (1, 2):
        client.checkpoint("meta", v)
    comm.Barrier()
    try:
        os.stat("/veloc-bench-mark-begin")
    except OSError:
        pass
    client.checkpoint("meta", 3)
    comm.Barrier()
    try:
        os.stat("/veloc-bench-mark-end")
    except OSError:
        pass
    client.finalize()
""")
PATH_CALLS = {"open", "openat", "creat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
              "faccessat2", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat",
              "rmdir", "readlink", "readlinkat", "chmod", "fchmodat", "truncate", "utimensat"}
LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2,4,8,16", help="virtual node counts (comma separated)")
    p.add_argument("--ranks-per-node", default="1,2", help="ranks per virtual node (comma separated)")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/tmp")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def run_job(nodes, per_node, work):
    """Run the job under strace; return ``(trace lines, scratch root, persistent root)``."""
    scratch, persistent = work["shm"] / "scratch", work["disk"] / "persistent"
    cfg = work["disk"] / "veloc.ini"
    cfg.write_text(f"scratch = {scratch}/{{node}}\npersistent = {persistent}\nmode = sync\n"
                   "max_versions = 0\nscratch_versions = 2\n")
    app = work["disk"] / "app.py"
    app.write_text(APP)
    cmd = [find_mpiexec()]
    for n in range(nodes):
        cmd += ["-n", str(per_node), "-env", "VELOC_NODE_ID", f"n{n}", sys.executable, str(app), str(cfg)]
        if n < nodes - 1:
            cmd.append(":")
    trace = work["disk"] / "trace.txt"
    full = ["strace", "-f", "-qq", "-e", "trace=" + ",".join(sorted(PATH_CALLS)), "-o", str(trace), *cmd]
    subprocess.run(full, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return trace.read_text(errors="replace").splitlines(), scratch, persistent


def count_ops(lines, roots):
    """``{root: path-based calls naming it}`` between the markers."""
    begin = next(i for i, line in enumerate(lines) if "veloc-bench-mark-begin" in line)
    end = max(i for i, line in enumerate(lines) if "veloc-bench-mark-end" in line)
    out = {str(r): 0 for r in roots}
    for line in lines[begin:end]:
        m = LINE.match(line)
        if not m or m.group(2) not in PATH_CALLS:
            continue
        for root in out:
            if root in m.group(3):
                out[root] += 1
    return out


def count_files(root, nodes):
    """Entries of version 3's folders under ``root`` (per node folders when present)."""
    folders = [root / f"n{n}" / "meta" / "v3" for n in range(nodes)] if (root / "n0").is_dir() \
        else [root / "meta" / "v3"]
    return sum(len(os.listdir(f)) for f in folders if f.is_dir())


def fit(rows, key):
    """Least squares ``key = a * ranks + b * nodes`` over the rows (two unknowns)."""
    sxx = sum(r["ranks"] ** 2 for r in rows)
    syy = sum(r["nodes"] ** 2 for r in rows)
    sxy = sum(r["ranks"] * r["nodes"] for r in rows)
    sxz = sum(r["ranks"] * r[key] for r in rows)
    syz = sum(r["nodes"] * r[key] for r in rows)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-9:           # ranks proportional to nodes: one unknown per rank
        return sxz / sxx, 0.0
    return (sxz * syy - syz * sxy) / det, (sxx * syz - sxy * sxz) / det


def main(argv=None):
    args = parse_args(argv)
    if shutil.which("strace") is None:
        sys.exit("bench_metadata: needs strace (apt install strace)")
    rows = []
    runs = [(nodes, int(per)) for per in args.ranks_per_node.split(",") for nodes in map(int, args.nodes.split(","))]
    for nodes, per_node in runs:
        work = {"shm": Path(tempfile.mkdtemp(prefix="vmeta-", dir=args.shm_dir)),
                "disk": Path(tempfile.mkdtemp(prefix="vmeta-", dir=args.disk_dir))}
        try:
            lines, scratch, persistent = run_job(nodes, per_node, work)
            ops = count_ops(lines, [scratch, persistent])
            row = {"nodes": nodes, "ranks": nodes * per_node,
                   "scratch_files": count_files(scratch, nodes), "persistent_files": count_files(persistent, nodes),
                   "scratch_ops": ops[str(scratch)], "persistent_ops": ops[str(persistent)]}
        finally:
            for path in work.values():
                shutil.rmtree(path, ignore_errors=True)
        rows.append(row)
        print(f"nodes={row['nodes']:3d} ranks={row['ranks']:3d}  files: scratch {row['scratch_files']:4d} "
              f"persistent {row['persistent_files']:4d}   metadata ops: scratch {row['scratch_ops']:5d} "
              f"persistent {row['persistent_ops']:5d}", flush=True)
    print("\nper version (least squares over the rows):")
    formulas = {}
    for key in ("scratch_files", "persistent_files", "scratch_ops", "persistent_ops"):
        a, b = fit(rows, key)
        formulas[key] = {"per_rank": round(a, 2), "per_node": round(b, 2)}
        print(f"  {key:17s} = {a:6.2f} x ranks + {b:6.2f} x nodes")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "formulas": formulas,
                                               "ranks_per_node": args.ranks_per_node}, indent=1))


if __name__ == "__main__":
    main()
