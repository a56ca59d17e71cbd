"""The ``veloc`` command-line tool: list, verify and inspect checkpoints; drain backends.

Run by a user or a job script on any node, outside the application (also as
``python -m veloc``): it reads the level trees named by the application's configuration
(scratch, partner copies, erasure groups, persistent) and the rank files (``.vck``) in
them, never changes a checkpoint and never unpickles anything. Subcommands are listed in
``COMMANDS`` (name, help, arguments, runner); ``main`` dispatches and turns every error
into one line on stderr. Exit status: 0 success, 1 a copy failed verification, 2 a
usage, configuration or file error.
"""
import argparse
import json
import os
import sys
from collections import Counter, namedtuple
from dataclasses import asdict

from veloc.cli.export import export_args, run_export
from veloc.cli.export import seconds_arg as _seconds
from veloc.reader_view import rank_ranges
from veloc.cli.inspect import describe_rankfile, extract_region, parse_region_id
from veloc.cli.levels import (UsageError, checkpoint_states, fields_of, levels_reached, nodes_on_disk, open_levels,
                         verify_version)
from veloc.cli.plan import plan_args, run_plan
from veloc.config import load_config, node_id
from veloc.errors import VelocError
from veloc.names import check_name, check_node_id
from veloc.progress import EVERY, ProgressReporter

Command = namedtuple("Command", "name help arguments run")
NODE_LOCAL = ("scratch", "partner")


# -- argument types and shared arguments ----------------------------------------------
def _version(text):
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"version must be a non-negative integer, got {text!r}")
    return int(text)


def _rank_list(text):
    """``0-3,8`` -> {0, 1, 2, 3, 8}."""
    ranks = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi or lo)
            if lo < 0 or hi < lo:
                raise ValueError
            ranks.update(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rank list {text!r}: use e.g. 0-3,8") from None
    return ranks


def _cfg_arg(p):
    p.add_argument("cfg", metavar="CFG", help="the application's veloc INI configuration file "
                   "(VELOC_<KEY> environment overrides apply)")


def _where_args(p):
    where = p.add_mutually_exclusive_group()
    where.add_argument("--node", action="append", metavar="N",
                       help="node identity whose scratch to read, for {node} in paths; repeat for several "
                            "nodes (default: VELOC_NODE_ID, else the host name)")
    where.add_argument("--all-nodes", action="store_true",
                       help="read the scratch (and partner and erasure trees) of every node whose scratch "
                            "folder exists on this machine (virtual nodes: {node} in the scratch path)")
    p.add_argument("--ranks", type=_rank_list, metavar="LIST",
                   help="ranks to look for where a level path contains {rank}, e.g. 0-3,8 "
                        "(default: the ranks found on disk and in the other levels)")


def _ls_args(p):
    p.epilog = ("LEVEL: scratch, partner (copies the chosen nodes hold for others), erasure (group records "
                "and the chosen nodes' parity blocks), persistent. STATE: complete (every rank the manifests "
                "expect is present, every file has its recorded size, content digests recorded), "
                "truncated (a file is shorter or longer than its manifest says), partial (ranks or files "
                "missing, or an unreadable manifest; node-local levels hold only the chosen nodes' share), "
                "unchecksummed (complete but without content digests). Sizes are checked, contents are "
                "not: use verify.")
    _cfg_arg(p)
    p.add_argument("name", nargs="?", metavar="NAME", help="only this checkpoint (default: all)")
    _where_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _verify_args(p):
    p.epilog = ("Prints OK, FAIL (the copy exists but is corrupt) or MISSING per rank (per node for erasure "
                "parity blocks), level and version; partner copies and parity blocks are checked against "
                "their digests too. Exit status 1 if any copy FAILs, 2 on a usage or configuration error.")
    _cfg_arg(p)
    p.add_argument("name", metavar="NAME", help="checkpoint name")
    p.add_argument("version", nargs="?", type=_version, metavar="VERSION",
                   help="only this version (default: every version found)")
    _where_args(p)


def _show_args(p):
    p.add_argument("file", metavar="FILE", help="a rank file (r<rank>.vck, or compressed r<rank>.vcz)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _extract_args(p):
    p.add_argument("file", metavar="FILE", help="a rank file (r<rank>.vck)")
    p.add_argument("id", metavar="ID", help="region id: an int if all digits (or, if there is no such int "
                   "id, the name made of those digits), else a name")
    p.add_argument("--as-name", action="store_true", help="take ID as a region name even if it is all digits")
    p.add_argument("out", metavar="OUT", help="output file (.npy), created with mode 0600")
    p.add_argument("--allow-pickle", action="store_true",
                   help="for a pickled region, write its raw pickle bytes (.pkl); never unpickled here")


# -- helpers --------------------------------------------------------------------------
def _levels(args):
    config = load_config(args.cfg)
    if args.all_nodes:
        nodes = nodes_on_disk(config)
    else:
        nodes = [check_node_id(n) for n in args.node] if args.node else [node_id()]
    return nodes, open_levels(config, nodes, args.ranks)


def _where(levels, nodes):
    return "; ".join(f"{lvl.name} {lvl.template}" + (f" on node {','.join(nodes)}"
                                                     if "node" in fields_of(lvl.template) else "")
                     for lvl in levels)


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(rows, indent=""):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- commands -------------------------------------------------------------------------
def _ls(args):
    nodes, levels = _levels(args)
    if args.name is not None:
        names = [check_name(args.name, error=UsageError)]
    else:
        names = sorted({n for lvl in levels for n in lvl.checkpoint_names()})
    states = [s for name in names for s in checkpoint_states(levels, name)]
    if args.name is not None and not states:
        raise UsageError(f"no checkpoint named {args.name!r} at any level ({_where(levels, nodes)})")
    if args.json:
        print(json.dumps([asdict(s) for s in states], indent=1))
        return 0
    for lvl in levels:
        print(f"# {_where([lvl], nodes)}")
    if not states:
        print("no checkpoints")
        return 0
    rows = [("NAME", "LEVEL", "VERSION", "RANKS", "NRANKS", "SIZE", "STATE")]
    rows += [(s.name, s.level, str(s.version), rank_ranges(s.ranks, empty="-"), str(s.nranks), _size(s.size), s.state)
             for s in states]
    _table(rows)
    for s in states:
        if s.missing:
            print(f"{s.name} v{s.version} {s.level}: ranks {rank_ranges(s.missing)} of {s.nranks} have no copy")
        for problem in s.problems:
            print(f"{s.name} v{s.version} {s.level}: {problem}")
        if s.compressed:
            print(f"{s.name} v{s.version} {s.level}: ranks {rank_ranges(s.compressed)} stored compressed (.vcz)")
    print("versions and the levels holding a complete copy:")
    for (name, version), held in levels_reached(states).items():
        print(f"  {name} v{version}: {' '.join(held) if held else 'no complete copy at any level'}")
    if any(s.missing and s.level in NODE_LOCAL for s in states):
        print(f"note: the node-local levels ({', '.join(NODE_LOCAL)}) show the share of node(s) "
              f"{', '.join(nodes)} only: run ls on every node, or use --all-nodes for virtual nodes")
    return 0


def _verify(args):
    nodes, levels = _levels(args)
    name = check_name(args.name, error=UsageError)
    versions = sorted({v for lvl in levels for v in lvl.versions(name)}, reverse=True)
    if not versions:
        raise UsageError(f"no checkpoint named {name!r} at any level ({_where(levels, nodes)})")
    if args.version is not None:
        if args.version not in versions:
            raise UsageError(f"no copy of {name} v{args.version} at any level ({_where(levels, nodes)}); "
                             f"versions found: {', '.join(map(str, versions))}")
        versions = [args.version]
    counts = Counter()
    for version in versions:
        for status, level, who, detail in verify_version(levels, name, version):
            counts[status] += 1
            print(f"{status:<7} {level:<10} {name} v{version} {who}: {detail}")
    print(f"{name}: {counts['OK']} OK, {counts['FAIL']} FAIL, {counts['MISSING']} missing")
    return 1 if counts["FAIL"] else 0


def _show(args):
    info = describe_rankfile(args.file)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"file     {info['file']} ({info['size']} bytes, format {info['format']})")
    print(f"name     {info['name']}")
    print(f"version  {info['version']}")
    print(f"rank     {info['rank']}")
    print(f"regions  {len(info['regions'])}")
    packed = info.get("compressed")
    if packed:
        print(f"stored   compressed: {info['size']} of {info['raw_size']} bytes "
              f"({info['raw_size'] / max(1, info['size']):.1f}x), blocks of {info['block_size']} bytes")
    if info["regions"]:
        rows = [("ID", "KIND", "DTYPE", "SHAPE", "ORDER", "NBYTES", "OFFSET")
                + (("CODEC", "STORED", "RATIO") if packed else ())]
        rows += [(repr(r["id"]), r["kind"], r["dtype"], "-" if r["kind"] == "pickle" else str(tuple(r["shape"])),
                  "-" if r["kind"] == "pickle" else r["order"], str(r["nbytes"]), str(r["offset"]))
                 + ((r["codec"] + (f" (lossy, abs error <= {r['error_bound']:g})" if r["error_bound"] else ""),
                     str(r["stored"]), f"{r['nbytes'] / max(1, r['stored']):.1f}x") if packed else ())
                 for r in info["regions"]]
        _table(rows, indent="  ")
    return 0


def _extract(args):
    region_id = args.id if args.as_name else parse_region_id(args.id)
    done = extract_region(args.file, region_id, args.out, allow_pickle=args.allow_pickle)
    if done["kind"] == "pickle":
        print(f"wrote the raw pickle bytes of region {done['id']!r} ({done['nbytes']} bytes) to {args.out}")
    else:
        print(f"wrote region {done['id']!r} ({done['dtype']} {tuple(done['shape'])}, order {done['order']}) "
              f"to {args.out}")
    return 0


def _drain_args(p):
    _cfg_arg(p)
    p.add_argument("--timeout", type=_seconds, metavar="S", help="give up after S seconds (default: wait)")
    p.add_argument("--progress", type=_seconds, default=EVERY, metavar="S",
                   help=f"print the versions and bytes still pending and the rate every S seconds of "
                        f"waiting (default {EVERY:g})")


def _drain(args):
    from veloc_backend.control import drain
    reporter = ProgressReporter(args.progress, emit=lambda line: print(line, flush=True), where="pending: ")
    done = drain(args.cfg, timeout=args.timeout, progress=reporter)
    for failure in done["failures"]:
        print(f"failed: {failure.get('group')}: {failure.get('error')}", file=sys.stderr)
    print("drained" if done["drained"] else f"not drained: {done['pending']} item(s) still pending")
    return 0 if done["drained"] and not done["failures"] else 1


def _status(args):
    from veloc_backend.control import format_status, status
    print(format_status(status(args.cfg)))
    return 0


COMMANDS = [
    Command("ls", "list checkpoint versions per level, with ranks, size and state", _ls_args, _ls),
    Command("verify", "verify the checksums of every rank's copy at every level", _verify_args, _verify),
    Command("show", "print the header of a rank file: name, version, rank, regions", _show_args, _show),
    Command("extract", "write one array region of a rank file to a .npy file", _extract_args, _extract),
    Command("export", "write one version, from any level, to one HDF5 file with global datasets", export_args,
            run_export),
    Command("drain", "wait until this node's backend (async mode) has nothing pending", _drain_args, _drain),
    Command("status", "show each backend of the job on this machine: queue, failures, log", _cfg_arg, _status),
    Command("plan", "measure each configured level's checkpoint cost and model the intervals", plan_args, run_plan),
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="veloc", description="Inspect veloc checkpoints: list versions per level, verify checksums, "
        "show a rank file's regions, extract a region to .npy, export a version to HDF5; drain and show "
        "async backends.",
        epilog="exit status: 0 success, 1 a copy failed verification, 2 usage/configuration/file error. "
        "Scratch is node-local: ls/verify read the scratch, partner and erasure trees of this node "
        "(or --node N, or --all-nodes for every virtual node on this machine).")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks of errors (debugging)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _os_message(exc):
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)


def main(argv=None):
    """Entry point of the ``veloc`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:          # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except BrokenPipeError:            # `veloc ls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.traceback:
            raise
        if isinstance(exc, (UsageError, VelocError)):
            message = str(exc)
        elif isinstance(exc, OSError):
            message = _os_message(exc)
        else:
            message = f"unexpected {type(exc).__name__}: {exc} (rerun with --traceback to see where)"
        print(f"veloc {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
