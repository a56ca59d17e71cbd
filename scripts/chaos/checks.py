"""Judging one chaos cycle after its restart run: restored state, lost versions, debris.

Called by the driver (``scripts/chaos.py``) in its own process once every job of the
cycle has ended. Reads the journals and result files the application wrote
(``tests/e2e/apps/chaos_app.py``) and walks the cycle's scratch and persistent trees.
"""
import json
import re
from pathlib import Path

RANK_FILE = re.compile(r"r(\d+)\.(vck|f\..+)$")
VERSION_DIR = re.compile(r"v\d+$")
NODE_RECORD = re.compile(r"n(\d+)-(\d+)\.commit\.json")     # a node's commit record (persistent)


def required_version(journals, nranks):
    """The newest version every rank recorded as done, or ``None``."""
    if len(journals) < nranks or not all(journals.get(r) for r in range(nranks)):
        return None
    return min(max(journals[r]) for r in range(nranks))


def read_results(folder, nranks):
    """``{rank: result}`` written by the restart run (missing ranks absent)."""
    out = {}
    for rank in range(nranks):
        try:
            out[rank] = json.loads((Path(folder) / f"r{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def judge_restore(results, nranks, required):
    """``(torn, lost, restored version, note)`` from the restart run's results."""
    if len(results) < nranks:
        return False, False, None, f"restart results of ranks {sorted(set(range(nranks)) - set(results))} missing"
    versions = {r["version"] for r in results.values()}
    if len(versions) != 1:
        return True, False, None, f"ranks restored different versions {sorted(map(str, versions))}"
    version = versions.pop()
    bad = sorted(r for r, res in results.items() if not res["exact"])
    if bad:
        return True, False, version, f"ranks {bad} restored v{version} with wrong content"
    if required is not None and (version is None or version < required):
        return False, True, version, f"restored v{version}, but v{required} was reported done on every rank"
    return False, False, version, ""


def find_debris(roots):
    """Crash debris under the cycle's storage ``roots``: temporary files, rank files
    without a manifest, erasure folders without a group record. ``[path]``."""
    out = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if ".veloc-backend" in path.parts or ".recycle" in path.parts:
                continue
            name = path.name
            if path.is_file() and name.startswith(".") and name.endswith(".tmp"):
                out.append(str(path))
            elif path.is_dir() and VERSION_DIR.fullmatch(name):
                out += _version_dir_debris(path)
    return sorted(set(out))


def _version_dir_debris(vdir):
    try:
        names = {p.name for p in vdir.iterdir() if p.is_file()}
    except OSError:
        return []
    if ".erasure" in vdir.parts:
        if "group.json" not in names and any(n.endswith(".par") for n in names):
            return [f"{vdir} (parity without group record)"]
        return []
    out = []
    records = [tuple(map(int, r.groups())) for r in map(NODE_RECORD.fullmatch, names) if r]   # persistent
    for name in names:
        m = RANK_FILE.match(name)
        if (m and f"r{m.group(1)}.manifest.json" not in names
                and not any(lo <= int(m.group(1)) <= hi for lo, hi in records)):
            out.append(str(vdir / name))
    return out


def first_error_line(text):
    """The most telling line of a failed run's output."""
    lines = [x for x in text.splitlines() if x.strip()]
    for key in ("VelocError", "Error:", "Error", "KILLED", "Traceback"):
        for line in lines:
            if key in line and "Traceback" not in line:
                return line.strip()[:300]
    return (lines[-1].strip()[:300] if lines else "")
