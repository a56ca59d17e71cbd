"""Table rows, markdown and plots of run_all.py, from each benchmark's own JSON.

Every row is a ratio against a limit measured in the same run (``np.copyto`` of the same
bytes, or the raw file operation named in ``reference``), or a loop-time overhead against
a plain run of the same interleaved pair; ``spread`` gives the range over repetitions or
pairs and ``load`` the 1-minute load average around the run.
"""
import statistics

MIB = 1 << 20

CHECKPOINT_ROWS = [  # summary key, label, limit key ("x limit" = limit median time / our median time)
    ("np_save_cold", "np.save to a fresh tmpfs file (the naive way)", None),
    ("ckpt_local_first", "local write, v1 (first checkpoint)", "np_save_cold"),
    ("ckpt_local_fresh", "local write, v2-v3 (rotation filling)", "np_save_cold"),
    ("ckpt_local_steady", "local write, steady (recycled files)", None),
    ("checkpoint_call", "checkpoint() call, steady", None),
    ("restart_total_scratch", "restart_test + restart, from scratch", "preadv_tmpfs"),
    ("restart_total_persistent_warm", "restart_test + restart, persistent (page cache)", "disk_read_warm"),
    ("restart_total_persistent_cold", "restart_test + restart, persistent (evicted)", "disk_read_cold_same"),
]


def _row(bench, measurement, ratio, reference, spread="", n="", load=""):
    return {"benchmark": bench, "measurement": measurement, "ratio": ratio, "reference": reference,
            "spread": spread, "n": n, "load": load}


def _range(values, fmt="{:.2f}"):
    return f"{fmt.format(min(values))}..{fmt.format(max(values))}" if values else ""


def _checkpoint_rows(name, data):
    out = []
    mode = data.get("mode", "?")
    for size, result in sorted(data.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        table = result["summary"]
        load = "/".join(f"{x:.1f}" for x in result.get("load_average", ()))
        for key, label, limit in CHECKPOINT_ROWS:
            row = table.get(key)
            if not row or row.get("x_memcpy") is None:
                continue
            x = row["x_memcpy"]
            # the spread of the ratio, from the best and worst repetition's time
            spread = _range([x * row["median_s"] / row["best_s"], x * row["median_s"] / row["worst_s"]])
            what = f"{label}, {int(size) // MIB} MiB/rank, {mode}"
            out.append(_row(name, what, x, "np.copyto", spread, row["n"], load))
            if limit and table.get(limit, {}).get("median_s"):
                # against the limit: its median time over ours (same bytes per rank; both
                # medians of the slowest rank), not a ratio of two copyto ratios, whose
                # references drift apart as numpy's arrays move to huge pages
                out.append(_row(name, what, table[limit]["median_s"] / row["median_s"], limit, "",
                                row["n"], load))
    return out


def _blocking_rows(name, data):
    out = []
    for r in data.get("blocking", []):
        copy, iso = r["copyto"], r["isolated"]
        ratios = [copy[i] / t for i, t in enumerate(iso)]
        size = f"{r['size'] // MIB} MiB/rank"
        for i in range(min(3, len(ratios))):
            out.append(_row(name, f"async checkpoint() v{i + 1}, {size}", ratios[i], "np.copyto", "", 1))
        if len(ratios) > 3:
            out.append(_row(name, f"async checkpoint() steady v4-v{len(ratios)}, {size}",
                            statistics.median(ratios[3:]), "np.copyto", _range(ratios[3:]), len(ratios) - 3))
        b2b = [copy[len(iso) + i] / t for i, t in enumerate(r.get("back_to_back", []))]
        if b2b:
            out.append(_row(name, f"async checkpoint() back to back, {size}", statistics.median(b2b),
                            "np.copyto", _range(b2b), len(b2b)))
    return out


def heat_overheads(data):
    """``(whole-loop overheads, steady overheads, in-checkpoint share)`` per pair of a heat run."""
    heat = data.get("heat") or {}
    pairs = list(zip(heat.get("plain", []), heat.get("async", [])))
    whole = [a["loop"] / p["loop"] - 1 for p, a in pairs]
    steady = [a["steady_loop"] / p["steady_loop"] - 1 for p, a in pairs]
    inside = [a["steady_ckpt"] / p["steady_loop"] for p, a in pairs]
    return whole, steady, inside


def _heat_rows(name, data):
    whole, steady, inside = heat_overheads(data)
    if not whole:
        return []
    pct = "{:+.1%}"
    return [_row(name, "heat loop overhead, steady", statistics.median(steady), "plain run of the pair",
                 _range(steady, pct), len(steady)),
            _row(name, "heat loop overhead, whole loop", statistics.median(whole), "plain run of the pair",
                 _range(whole, pct), len(whole)),
            _row(name, "  of which inside checkpoint(), steady", statistics.median(inside),
                 "plain run of the pair", _range(inside, pct), len(inside))] + _heat_cpu_rows(name, data)


def _heat_cpu_rows(name, data):
    heat = data.get("heat") or {}
    pairs = [(p, a) for p, a in zip(heat.get("plain", []), heat.get("async", [])) if "ranks_cpu" in a]
    if not pairs:
        return []
    total = [(a["ranks_cpu"] + sum(a.get("backend_cpu", {}).values())) / p["ranks_cpu"] - 1 for p, a in pairs]
    return [_row(name, "heat CPU-time overhead, ranks + backend, whole run", statistics.median(total),
                 "plain run of the pair", _range(total, "{:+.1%}"), len(total),
                 "/".join(f"{a.get('load', 0):.1f}" for _, a in pairs))]


def _interleaved_rows(name, data):
    s, pct = data.get("summary") or {}, "{:+.1%}"
    if not s:
        return []
    n, load = len(s["overhead"]), f"{min(s['loads']):.1f}..{max(s['loads']):.1f}"
    what = (f"{data['args']['mib']} MiB/rank, blocks of {data['args']['periods']} x {data['args']['every']} it., "
            + ("scratch only" if data["args"].get("no_persistent") else "scratch + persistent"))
    return [_row(name, f"heat overhead, A/B blocks in one job, {what}", s["median_overhead"],
                 "plain block of the pair", _range(s["overhead"], pct), n, load),
            _row(name, "  of which inside checkpoint() and the block's final wait", s["median_inside"],
                 "plain block of the pair", _range(s["inside"], pct), n, load),
            _row(name, "heat CPU-time overhead of the ranks, A/B blocks", s["median_cpu_overhead"],
                 "plain block of the pair", _range(s["cpu_overhead"], pct), n, load)] + _floor_rows(name, s, n, load)


def _floor_rows(name, s, n, load):
    """The F blocks of the same job: the floor (the same bytes copied once and written once
    with O_DIRECT, nothing else) and veloc's overhead beyond it."""
    if "floor_overhead" not in s:
        return []
    pct = "{:+.1%}"
    return [_row(name, "floor overhead: one memcpy (+ one O_DIRECT write) of the same bytes, F/B blocks",
                 s["median_floor_overhead"], "plain block of the triple", _range(s["floor_overhead"], pct), n, load),
            _row(name, "overhead beyond the floor, A/F blocks", s["median_beyond_floor"], "floor block of the triple",
                 _range(s["beyond_floor"], pct), n, load)]


def _training_interleaved_rows(name, data):
    s, pct = data.get("summary") or {}, "{:+.1%}"
    if not s:
        return []
    a = data["args"]
    n, load = len(s["overhead"]), f"{min(s['loads']):.1f}..{max(s['loads']):.1f}"
    what = f"{data['state_bytes'] >> 20} MiB state/rank, {a['mode']}, policy {a['policy']}"
    out = [_row(name, f"training overhead, A/B blocks of {a['block']} steps in one job, {what}",
                s["median_overhead"], "plain block of the pair", _range(s["overhead"], pct), n, load),
           _row(name, "training CPU-time overhead of the ranks, A/B blocks", s["median_cpu_overhead"],
                "plain block of the pair", _range(s["cpu_overhead"], pct), n, load)]
    if s["stall_x_copyto"]:
        out.append(_row(name, "training stall per checkpoint, A/B blocks", statistics.median(s["stall_x_copyto"]),
                        "np.copyto (time ratio: lower is better)", _range(s["stall_x_copyto"]), n, load))
    return out


def training_overheads(runs):
    """``{policy: steady overheads per pair}`` of a bench_training run."""
    plain = {r["pair"]: r for r in runs if r["kind"] == "plain"}
    out = {}
    for kind in ("fixed", "auto"):
        out[kind] = [r["timed_seconds"] / plain[r["pair"]]["timed_seconds"] - 1
                     for r in runs if r["kind"] == kind and r["pair"] in plain]
    return out


def _training_rows(name, runs):
    out = []
    for kind, values in training_overheads(runs).items():
        stalls = [s / r["copyto_seconds"] for r in runs if r["kind"] == kind for s in r["stalls"][1:]]
        load = "/".join(f"{r['load']:.1f}" for r in runs if r["kind"] == kind)
        if values:
            out.append(_row(name, f"training loop overhead, steady, policy {kind}", statistics.median(values),
                            "plain run of the triple", _range(values, "{:+.1%}"), len(values), load))
        if stalls:
            out.append(_row(name, f"training stall per checkpoint, policy {kind}", statistics.median(stalls),
                            "np.copyto (time ratio: lower is better)", _range(stalls), len(stalls), load))
    return out


def _snapshot_rows(name, data):
    x = data.get("x_copyto", {})
    load = f"{data.get('load_average', 0):.1f}"
    return [_row(name, f"snapshot {k}, {data['mib']} MiB", v, "np.copyto (time ratio: lower is better)",
                 "", data["rounds"], load) for k, v in x.items() if k != "copyto"]


ROW_MAKERS = {"checkpoint_sync": _checkpoint_rows, "checkpoint_async": _checkpoint_rows,
              "async_blocking": _blocking_rows, "async_heat": _heat_rows,
              "async_heat_scratch_only": _heat_rows, "async_interleaved": _interleaved_rows,
              "async_interleaved_scratch_only": _interleaved_rows,
              "training": _training_rows, "training_interleaved": _training_interleaved_rows,
              "snapshot": _snapshot_rows}


def rows(benchmarks):
    """Table rows from run_all's ``{name: record}`` (records with ``data``)."""
    out = []
    for name, record in benchmarks.items():
        maker = ROW_MAKERS.get(name)
        if record.get("ok") and maker is not None and record.get("data") is not None:
            out.extend(maker(name, record["data"]))
    return out


def _fmt(row):
    r = row["ratio"]
    if "overhead" in row["measurement"] or "inside" in row["measurement"]:
        return f"{r:+.1%}"
    return f"{r:.2f}x"


def markdown(doc):
    lines = [f"# veloc benchmarks ({'quick' if doc.get('quick') else 'full'} run)", "",
             f"`{doc['command']}` on {doc['host']} ({doc['cpus']} CPUs, python {doc['python']}), "
             f"started {doc['started_utc']}, load average at start "
             f"{'/'.join(f'{x:.2f}' for x in doc['load_at_start'])}.", "",
             "Ratios are medians over repetitions (or interleaved pairs) against a limit measured in "
             "the same run; `x` ratios: higher is faster unless the reference says otherwise. "
             "Against `np.copyto`: the median over repetitions of (the copy timed right before) / "
             "(the operation); against a named limit (`np_save_cold`, `preadv_tmpfs`, `disk_read_*`): "
             "the limit's median time / the operation's. "
             "Overheads: loop time with checkpoints / plain loop time of the same pair - 1.", "",
             "| benchmark | measurement | ratio | against | spread | n | load |",
             "|---|---|---|---|---|---|---|"]
    for row in doc.get("rows", []):
        lines.append(f"| {row['benchmark']} | {row['measurement']} | {_fmt(row)} | {row['reference']} | "
                     f"{row['spread']} | {row['n']} | {row['load']} |")
    lines += ["", "| benchmark | status | seconds | load before/after | command |", "|---|---|---|---|---|"]
    for name, r in doc.get("benchmarks", {}).items():
        status = "ok" if r.get("ok") else f"FAILED: {r.get('error', '')}"
        lines.append(f"| {name} | {status} | {r.get('seconds', '')} | {r.get('load_before', 0):.1f}/"
                     f"{r.get('load_after', 0):.1f} | `{r.get('command', '')}` |")
    lines.append("")
    lines.append("Benchmarks without a JSON of their own (redundancy, erasure_codecs, async_levels) report "
                 "their ratios in their logs (`<name>.log` next to this file).")
    return "\n".join(lines) + "\n"


def plots(doc, out):
    """Draw the main figures into ``out``; return messages saying what was drawn or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: plots skipped (pip install 'veloc[bench]', then "
                f"run_all.py --replot --out {out})"]
    messages = []
    benches = doc.get("benchmarks", {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name, style in (("checkpoint_sync", "-"), ("checkpoint_async", "--")):
        data = (benches.get(name) or {}).get("data")
        if not data:
            continue
        mode = data.get("mode", name)
        sizes = sorted(int(s) for s in data["sizes"])
        for key, label in (("checkpoint_call", f"checkpoint() steady, {mode}"),
                           ("ckpt_local_first", f"local write v1, {mode}"),
                           ("memcpy", f"np.copyto (limit), {mode} run")):
            pts = [(s / MIB, 1e3 * data["sizes"][str(s)]["summary"][key]["median_s"]) for s in sizes
                   if key in data["sizes"][str(s)]["summary"]]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=label)
                drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("MiB per rank")
        ax.set_ylabel("blocking time, ms (median, slowest rank)")
        ax.set_title("checkpoint() blocking time per size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "blocking_vs_size.png", dpi=120)
        messages.append(f"wrote {out / 'blocking_vs_size.png'}")
    else:
        messages.append("no checkpoint_sync/async data: blocking_vs_size.png skipped")
    plt.close(fig)

    bars = []
    for name, label in (("async_heat", "heat, async, persistent on"),
                        ("async_heat_scratch_only", "heat, async, scratch only")):
        data = (benches.get(name) or {}).get("data")
        if data:
            whole, steady, _ = heat_overheads(data)
            if steady:
                bars.append((label + " (steady)", steady))
                bars.append((label + " (whole loop)", whole))
    for name, label in (("async_interleaved", "heat, async, A/B blocks in one job"),
                        ("async_interleaved_scratch_only", "heat, async, scratch only, A/B blocks"),
                        ("training_interleaved", "training, policy auto, A/B blocks")):
        summary = ((benches.get(name) or {}).get("data") or {}).get("summary")
        if summary:
            bars.append((label, summary["overhead"]))
    data = (benches.get("training") or {}).get("data")
    if data:
        for kind, values in training_overheads(data).items():
            if values:
                bars.append((f"training, policy {kind} (steady)", values))
    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(bars) + 1.5))
        meds = [100 * statistics.median(v) for _, v in bars]
        lo = [m - 100 * min(v) for m, (_, v) in zip(meds, bars)]
        hi = [100 * max(v) - m for m, (_, v) in zip(meds, bars)]
        ax.barh(range(len(bars)), meds, xerr=[lo, hi], capsize=4)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.axvline(3, color="gray", linestyle=":", label="3 % target")
        ax.set_xlabel("loop-time overhead, % (median, bars: min..max over pairs)")
        ax.set_title("overhead per configuration")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "overhead_per_config.png", dpi=120)
        plt.close(fig)
        messages.append(f"wrote {out / 'overhead_per_config.png'}")
    else:
        messages.append("no heat or training data: overhead_per_config.png skipped")
    return messages
