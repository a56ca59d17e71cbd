"""The table bench_checkpoint.py prints: raw per-rank times in, one line per measurement out.

``raw[key][rank][rep]`` are seconds; a key with ``#ref`` holds the ``np.copyto`` times
taken right before each repetition of the measurement it pairs with. Rank 0 calls
:func:`summarize` and :func:`report` once per size.
"""
import statistics

from benchlib import human

ROWS = [  # key, label, limit key for "x limit"
    ("memcpy", "np.copyto -> preallocated (memcpy)", None),
    ("np_save_cold", "np.save -> fresh tmpfs file, cold", None),
    ("np_save_hot", "np.save -> fresh tmpfs file, hot", None),
    ("write_fresh_cold", "os.write -> fresh tmpfs file, cold", None),
    ("write_fresh_hot", "os.write -> fresh tmpfs file, hot", None),
    ("pwrite_allocated", "os.pwrite -> allocated tmpfs file", None),
    ("disk_write_cold", "os.write+fsync -> fresh disk file, cold", None),
    ("disk_write_hot", "os.write+fsync -> fresh disk file, hot", None),
    ("disk_write_direct", "O_DIRECT write+fsync -> fresh disk file", None),
    ("preadv_tmpfs", "preadv tmpfs file -> array", None),
    ("disk_read_warm", "preadv disk file (page cache) -> array", None),
    ("disk_read_cold", "preadv disk file (evicted) -> array", None),
    ("disk_read_cold_same", "preadv own persistent file (evicted)", None),
    ("ckpt_local_first", "ckpt begin+mem (local write), v1", "write_fresh_cold"),
    ("ckpt_local_fresh", "ckpt begin+mem, v2-v3 (fresh pages)", "write_fresh_cold"),
    ("ckpt_local_steady", "ckpt begin+mem, steady (recycled)", "pwrite_allocated"),
    ("ckpt_end_first", "checkpoint_end, v1", "disk_write_direct"),
    ("ckpt_end_steady", "checkpoint_end, steady", "disk_write_direct"),
    ("ckpt_wait_steady", "checkpoint_wait for the previous, steady", "disk_write_direct"),
    ("ckpt_total_first", "begin+mem+end, v1", None),
    ("ckpt_total_steady", "begin+mem+end, steady", None),
    ("checkpoint_call", "checkpoint() call, steady", None),
    ("restart_test_scratch", "restart_test, scratch", None),
    ("restart_read_scratch", "restart, scratch", "preadv_tmpfs"),
    ("restart_total_scratch", "restart_test+restart, scratch", "preadv_tmpfs"),
    ("restart_test_scratch_onread", "restart_test, scratch, verify on read", None),
    ("restart_read_scratch_onread", "restart, scratch, verify on read", "preadv_tmpfs"),
    ("restart_total_scratch_onread", "test+restart, scratch, verify on read", "preadv_tmpfs"),
    ("restart_total_persistent_warm", "restart_test+restart, persistent warm", "disk_read_warm"),
    ("restart_total_persistent_cold", "restart_test+restart, persistent cold", "disk_read_cold_same"),
]


def slowest(raw):
    """Per repetition, the slowest rank's time."""
    return [max(reps) for reps in zip(*raw)]


def summarize(raw, pair):
    """``{key: {"n", "median_s", "best_s", "x_memcpy"}}`` from ``raw[key][rank][rep]``."""
    out = {}
    for key, per_rank in raw.items():
        if "#ref" in key:
            continue
        t = slowest(per_rank)
        row = {"n": len(t), "median_s": statistics.median(t), "best_s": min(t), "worst_s": max(t)}
        if key == "memcpy":
            row["x_memcpy"] = 1.0
        elif key in pair and pair[key] in raw:
            ref = slowest(raw[pair[key]])
            ratios = [r / x for r, x in zip(ref, t) if x > 0]
            row["x_memcpy"] = statistics.median(ratios)
            row["x_memcpy_range"] = [min(ratios), max(ratios)]
        out[key] = row
    return out


def report(args, nranks, nbytes, summary, extra, load):
    lines = ["", f"## {human(nbytes)} per rank, {nranks} ranks, mode {args.mode}, {args.reps} reps, "
             f"settle {args.settle:g} s; load average before/after {load[0]:.2f}/{load[1]:.2f}"]
    hdr = (f"{'measurement':40} {'n':>2} {'GB/s/rank':>9} {'best':>6} {'worst':>6} {'x memcpy':>8} "
           f"{'range':>11} {'x limit':>7}  limit")
    lines += [hdr, "-" * len(hdr)]
    for key, label, limit in ROWS:
        row = summary.get(key)
        if row is None or (key == "ckpt_wait_steady" and args.mode == "sync"):
            continue                      # sync mode: nothing runs in the background
        if args.mode == "async" and key.startswith("ckpt_end"):
            limit = None                  # async: checkpoint_end only hands the version over
        gbs, best, worst = (nbytes / row[k] / 1e9 for k in ("median_s", "best_s", "worst_s"))
        ratio = row.get("x_memcpy")
        cell = ""
        if limit and ratio and summary.get(limit, {}).get("x_memcpy"):
            cell = f"{ratio / summary[limit]['x_memcpy']:7.2f}  {limit}"
        lo, hi = row.get("x_memcpy_range", (ratio, ratio)) if ratio is not None else (float("nan"),) * 2
        lines.append(f"{label:40} {row['n']:2d} {gbs:9.2f} {best:6.2f} {worst:6.2f} "
                     f"{ratio if ratio is not None else float('nan'):8.3f} {lo:5.2f}-{hi:5.2f} {cell}")
    ms = {k: 1e3 * r["median_s"] for k, r in summary.items()}
    small = ["ckpt_wait_steady", "ckpt_begin_steady", "ckpt_mem_steady", "ckpt_end_steady", "call_wait",
             "drain", "restart_test_scratch", "restart_read_scratch", "restart_test_persistent_warm",
             "restart_read_persistent_warm", "restart_test_persistent_cold", "restart_read_persistent_cold"]
    lines.append("medians (ms, slowest rank): " + ", ".join(f"{k}={ms[k]:.1f}" for k in small if k in ms))
    if extra.get("engine_timings"):
        per = {}
        for _name, version, module, secs in extra["engine_timings"]:
            if version > 3:
                per.setdefault(module, []).append(secs)
        lines.append("engine modules on the leader, steady versions, medians over all local ranks' files "
                     "(ms, diagnostic): " + ", ".join(f"{m}={1e3 * statistics.median(v):.0f}"
                                                      for m, v in per.items()))
    return "\n".join(lines)
