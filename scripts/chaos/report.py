"""Counting the cycles' verdicts per config and per kill target, as JSON and a table.

Called by the driver (``scripts/chaos.py``) after every cycle (the JSON is rewritten
each time, so an interrupted campaign still leaves its numbers) and at the end.
"""
import json
import os

COUNTS = ("cycles", "torn", "lost", "hang", "leftover", "debris", "error")
FATAL = ("torn", "lost", "hang", "leftover", "error")


def target_key(cycle):
    if cycle["target"] == "point":
        return f"point:{cycle['point']}"
    return cycle["target"]


def tally(records):
    """``(totals, by_config, by_target)``: counts of cycles with each kind of failure."""
    totals = dict.fromkeys(COUNTS, 0)
    by_config, by_target = {}, {}
    for rec in records:
        for table, key in ((by_config, rec["cycle"]["config"]), (by_target, target_key(rec["cycle"]))):
            row = table.setdefault(key, dict.fromkeys(COUNTS, 0))
            row["cycles"] += 1
            for what in COUNTS[1:]:
                row[what] += bool(rec["verdict"][what])
        totals["cycles"] += 1
        for what in COUNTS[1:]:
            totals[what] += bool(rec["verdict"][what])
    return totals, by_config, by_target


def failed(totals, strict_debris):
    return any(totals[k] for k in FATAL) or (strict_debris and totals["debris"] > 0)


def table(totals, by_config, by_target):
    width = max([len(k) for k in list(by_config) + list(by_target)] + [12])
    head = f"{'':{width}}  " + "  ".join(f"{c:>8}" for c in COUNTS)
    lines = []
    for title, rows in (("per config", by_config), ("per kill target", by_target)):
        lines += [f"{title}:", head]
        lines += [f"{k:{width}}  " + "  ".join(f"{row[c]:>8}" for c in COUNTS) for k, row in sorted(rows.items())]
        lines.append("")
    lines.append(f"{'TOTAL':{width}}  " + "  ".join(f"{totals[c]:>8}" for c in COUNTS))
    return "\n".join(lines)


def write_json(path, meta, records):
    totals, by_config, by_target = tally(records)
    doc = {**meta, "totals": totals, "by_config": by_config, "by_target": by_target, "cycles": records}
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    return totals, by_config, by_target
