#!/usr/bin/env python3
"""End-to-end demo: crash, lose a node, restart, and get the same answer bit for bit.

Runs ``examples/heat.py`` with 4 MPI ranks on 2 virtual nodes (``n0`` and ``n1``, two
ranks each, told apart by ``VELOC_NODE_ID``) under the ``mpiexec`` next to this Python:

1. the uninterrupted reference run, without checkpoints;
2. a run that checkpoints every ``--every`` iterations and in which one rank is killed
   (SIGKILL) after iteration ``--fail-at``;
3. node ``n1`` is "lost": its node-local scratch folder is deleted;
4. the job is restarted: it resumes from the newest version that every rank can still
   restore (ranks of ``n0`` from scratch, ranks of ``n1`` from persistent storage);
5. the final grid is compared bit for bit with the reference.

Prints PASS and exits 0 only when everything went as expected. Writes its own sync-mode
config into a temporary folder (scratch under ``/dev/shm/veloc-demo-<uid>/{node}``,
persistent storage under the temporary folder) unless ``--config`` is given, and removes
everything it created on the way out.
"""
import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HEAT = REPO / "examples" / "heat.py"
NODES = ("n0", "n1")
RANKS_PER_NODE = 2
RESTART_LINE = re.compile(r"^veloc: restarted from version (\d+) \(levels: ([^)]*)\)$", re.M)


def mpiexec():
    """The mpiexec installed next to this interpreter (the mpich wheel), else PATH's."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit("demo: no mpiexec found; install the mpich wheel (pip install mpich)")
    return found


def heat_command(heat_args):
    """MPMD mpiexec command line: ``RANKS_PER_NODE`` ranks on each virtual node."""
    cmd = [mpiexec()]
    for i, node in enumerate(NODES):
        if i:
            cmd.append(":")
        cmd += ["-n", str(RANKS_PER_NODE), "-env", "VELOC_NODE_ID", node,
                sys.executable, str(HEAT), *map(str, heat_args)]
    return cmd


def run_heat(heat_args, expect_failure=False, timeout=120):
    """Run heat.py on the virtual nodes; return its stdout. Exits the demo on surprises."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(heat_command(heat_args), env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DemoFailure(f"heat.py did not finish within {timeout} s")
    took = time.perf_counter() - t0
    failed = proc.returncode != 0
    if failed != expect_failure:
        what = "exited 0 although a rank was supposed to die" if expect_failure \
            else f"exited {proc.returncode}"
        raise DemoFailure(f"heat.py {what}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    for line in proc.stdout.splitlines():
        if line.startswith(("heat:", "veloc:")):
            print(f"      | {line}")
    for line in proc.stderr.splitlines():
        if line.startswith("heat:"):
            print(f"      | {line}")
    print(f"      ({took:.1f} s, exit code {proc.returncode})")
    return proc.stdout


class DemoFailure(Exception):
    """Something did not go as the demo expected; the message says what."""


def default_scratch_root(work):
    """Where the generated config puts node-local scratch: tmpfs when there is one."""
    if Path("/dev/shm").is_dir():
        return Path(f"/dev/shm/veloc-demo-{os.getuid()}")
    return work / "scratch"


def write_config(path, scratch, persistent):
    """A sync-mode config flushing every checkpoint to persistent storage."""
    path.write_text(
        "# written by scripts/demo.py\n"
        f"scratch = {scratch}/{{node}}\n"
        f"persistent = {persistent}\n"
        "mode = sync\n"
        "persistent_interval = 0\n")


def scratch_template(config_path):
    """The ``scratch`` value of an INI file (top-level keys, VELOC style)."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read_string("[top]\n" + Path(config_path).read_text())
    value = parser.get("top", "scratch", fallback=None)
    if not value:
        raise DemoFailure(f"{config_path} has no 'scratch' key")
    return os.path.expanduser(value.strip())


def node_scratch(template, node):
    """Node ``node``'s scratch folder. A per-rank template (``{rank}``) is cut just above
    the first folder that names the rank, so that all of the node's ranks are covered."""
    if "{node}" not in template:
        raise DemoFailure(f"scratch = {template} has no {{node}}: the virtual nodes would share "
                          "one scratch folder and losing one node could not be simulated")
    head = template.split("{rank}")[0]
    if "{rank}" in template:
        head = os.path.dirname(head) if not head.endswith("/") else head
    return Path(head.format(node=node))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="use this INI instead of a generated sync-mode one "
                                    "(its scratch must contain {node})")
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--cols", type=int, default=192)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--fail-at", type=int, default=300)
    p.add_argument("--fail-rank", type=int, default=3)
    p.add_argument("--lose-node", default="n1", choices=NODES)
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    return p.parse_args(argv)


def demo(args, work):
    """Steps 1-5; raises :class:`DemoFailure` on the first thing that goes wrong."""
    scratch_root = default_scratch_root(work)
    if args.config:
        config = Path(args.config).resolve()
    else:
        config = work / "demo.ini"
        shutil.rmtree(scratch_root, ignore_errors=True)   # leftovers of an earlier demo
        write_config(config, scratch_root, work / "persistent")
        print(f"demo: config {config}")
        for line in config.read_text().splitlines()[1:]:
            print(f"      | {line}")
    lost = node_scratch(scratch_template(config), args.lose_node)
    grid = ["--rows", args.rows, "--cols", args.cols, "--steps", args.steps]
    ranks = RANKS_PER_NODE * len(NODES)
    print(f"demo: {ranks} ranks on {len(NODES)} virtual nodes ({', '.join(NODES)}), "
          f"{args.rows}x{args.cols} grid, {args.steps} iterations")

    ref, out = work / "reference.npy", work / "restarted.npy"
    print("[1/5] reference run, no checkpoints")
    run_heat([*grid, "--no-checkpoint", "--out", ref])

    print(f"[2/5] run with a checkpoint every {args.every} iterations; rank {args.fail_rank} "
          f"is killed after iteration {args.fail_at}")
    stdout = run_heat([*grid, "--config", config, "--every", args.every, "--fail-at",
                       args.fail_at, "--fail-rank", args.fail_rank, "--out", out],
                      expect_failure=True)
    if RESTART_LINE.search(stdout):
        raise DemoFailure(f"the first checkpointed run restarted from an old checkpoint: "
                          f"remove the 'heat' checkpoints that {config} points at and retry")
    if out.exists():
        raise DemoFailure("the crashed run wrote its final grid: it did not crash")

    print(f"[3/5] node {args.lose_node} is lost: deleting its scratch folder {lost}")
    if not lost.is_dir():
        raise DemoFailure(f"{lost} does not exist: no checkpoint was written to {args.lose_node}'s scratch")
    shutil.rmtree(lost)

    print("[4/5] restarting the job")
    stdout = run_heat([*grid, "--config", config, "--every", args.every, "--out", out])
    match = RESTART_LINE.search(stdout)
    if not match:
        raise DemoFailure("the restarted run found no checkpoint that every rank could restore "
                          "(does the config have a persistent level, or partner/erasure?)")
    print(f"      restarted from version {match.group(1)}, levels: {match.group(2)}")

    print("[5/5] comparing the final grid with the reference, bit for bit")
    a, b = np.load(ref), np.load(out)
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
        diff = np.abs(a - b).max() if a.shape == b.shape else "shape differs"
        raise DemoFailure(f"final grids differ (max abs difference {diff})")
    print(f"      identical: {a.shape[0]}x{a.shape[1]} float64, sum {a.sum():.6f}")


def main(argv=None):
    """Run the demo; exit status 0 on PASS, 1 on FAIL."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="veloc-demo-"))
    scratch_root = default_scratch_root(work)
    ok = False
    try:
        demo(args, work)
        ok = True
    except DemoFailure as exc:
        print(f"demo: {exc}")
    finally:
        if args.keep:
            print(f"demo: kept {work}" + ("" if args.config else f" and {scratch_root}"))
        else:
            shutil.rmtree(work, ignore_errors=True)
            if args.config:
                print(f"demo: the 'heat' checkpoints written where {args.config} points were left there")
            else:
                shutil.rmtree(scratch_root, ignore_errors=True)
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
