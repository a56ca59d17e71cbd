"""The ``veloc`` command-line tool, driven in-process (``veloc.cli.commands``) and once as a
real process. Checkpoints are written with ``veloc.init_single`` (MPI.COMM_SELF, no
mpiexec) for ranks 0 and 1 of a virtual node."""
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import veloc
from veloc.cli import main

REPO = Path(__file__).resolve().parents[2]
NODE = "n0"
STRUCT = np.dtype([("x", "<f4"), ("n", "<i8"), ("v", "<f8", (3,))])


def arrays(rank):
    """The protected regions of ``rank``: every array layout the tool must describe."""
    rng = np.random.default_rng(rank)
    s = np.zeros(4, STRUCT)
    s["x"], s["n"], s["v"] = rng.random(4), np.arange(4) + rank, rng.random((4, 3))
    return {
        "h": rng.random((5, 7)),
        "f": np.asfortranarray(rng.random((3, 4)).astype(np.float32)),
        "s": s,
        7: np.array(rank + 42, dtype=np.int64),            # 0-d
        "big": np.arange(6, dtype=">i4").reshape(2, 3),
        "empty": np.zeros((0, 3)),
        "007": np.array([1, 2, 3], dtype=np.uint8),        # names made of digits
        "12": np.array([4, 5], dtype=np.int16),
    }


def write_cfg(path, scratch, persistent=None, extra=""):
    text = f"scratch = {scratch}\n" + (f"persistent = {persistent}\n" if persistent else "") + extra
    path.write_text(text)
    return str(path)


def make_checkpoints(cfg, versions=(1, 2), ranks=(0, 1)):
    for rank in ranks:
        client = veloc.init_single(rank, cfg)
        for rid, arr in arrays(rank).items():
            client.protect(rid, arr)
        client.protect("obj", {"rank": rank, "note": "pickled"}, pickle=True)
        for version in versions:
            client.checkpoint("heat", version)
        client.finalize()


@pytest.fixture
def ckpt(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", NODE)
    cfg = write_cfg(dirs["tmp"] / "veloc.ini", f"{dirs['scratch']}/{{node}}", dirs["persistent"])
    make_checkpoints(cfg)
    dirs["cfg"] = cfg
    dirs["vck"] = dirs["scratch"] / NODE / "heat" / "v2" / "r1.vck"
    return dirs


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert str(needle) in err, err


# -- ls ---------------------------------------------------------------------------------
def test_ls_lists_versions_at_both_levels(ckpt, capsys):
    code, out, err = run(capsys, "ls", ckpt["cfg"])
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("heat ")]
    assert [(r[1], r[2], r[3], r[-1]) for r in rows] == [
        ("scratch", "2", "0-1", "complete"), ("persistent", "2", "0-1", "complete"),
        ("scratch", "1", "0-1", "complete"), ("persistent", "1", "0-1", "complete")]
    code, out, _ = run(capsys, "ls", ckpt["cfg"], "heat", "--json")
    states = json.loads(out)
    assert {(s["level"], s["version"]) for s in states} == {(lv, v) for lv in ("scratch", "persistent")
                                                           for v in (1, 2)}
    size = sum(p.stat().st_size for p in ckpt["persistent"].glob("heat/v1/*.vck"))
    assert all(s["ranks"] == [0, 1] and s["size"] == size for s in states)


def test_ls_other_node_has_no_scratch(ckpt, capsys):
    code, out, _ = run(capsys, "ls", ckpt["cfg"], "--node", "elsewhere", "--json")
    assert code == 0
    assert {s["level"] for s in json.loads(out)} == {"persistent"}


def test_ls_partial_and_unchecksummed(dirs, monkeypatch, capsys):
    monkeypatch.setenv("VELOC_NODE_ID", NODE)
    cfg = write_cfg(dirs["tmp"] / "c.ini", f"{dirs['scratch']}/{{node}}", dirs["persistent"], "chksum = false\n")
    make_checkpoints(cfg, versions=(3,))
    vdir = dirs["persistent"] / "heat" / "v3"
    for path in vdir.glob("n*.commit.json"):    # as if written by a 3-rank job whose rank 2 never arrived
        data = json.loads(path.read_text())
        for manifest in data["manifests"]:
            manifest["nranks"] = 3
        path.write_text(json.dumps(data))
    code, out, _ = run(capsys, "ls", cfg)
    assert code == 0
    assert "heat  scratch     3        0-1    1       " in out and out.count("unchecksummed") == 1
    assert "heat  persistent  3        0-1    3" in out and "partial" in out
    assert "heat v3 persistent: ranks 2 of 3 have no copy" in out
    code, out, _ = run(capsys, "verify", cfg, "heat")
    assert code == 0 and "no checksum recorded" in out and "MISSING persistent heat v3 rank 2" in out


def test_ls_with_rank_placeholder(dirs, monkeypatch, capsys):
    monkeypatch.setenv("VELOC_NODE_ID", NODE)
    cfg = write_cfg(dirs["tmp"] / "c.ini", f"{dirs['scratch']}/{{node}}/r{{rank}}")
    make_checkpoints(cfg, versions=(5,))
    code, out, _ = run(capsys, "ls", cfg, "--json")
    assert code == 0 and [(s["level"], s["ranks"]) for s in json.loads(out)] == [("scratch", [0, 1])]
    code, out, _ = run(capsys, "ls", cfg, "--ranks", "1", "--json")
    assert [s["ranks"] for s in json.loads(out)] == [[1]]
    code, out, _ = run(capsys, "verify", cfg, "heat", "5")
    assert code == 0 and out.count("OK ") == 2


# -- verify -----------------------------------------------------------------------------
def test_verify_ok_then_corrupt_byte(ckpt, capsys):
    code, out, err = run(capsys, "verify", ckpt["cfg"], "heat")
    assert code == 0, err
    assert out.count("\nOK ") + out.startswith("OK ") == 8 and "0 FAIL" in out
    offset = next(r["offset"] for r in veloc.cli.inspect.describe_rankfile(ckpt["vck"])["regions"]
                  if r["id"] == "h")
    with open(ckpt["vck"], "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    code, out, _ = run(capsys, "verify", ckpt["cfg"], "heat")
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and str(ckpt["vck"]) in fails[0] and "checksum mismatch" in fails[0]
    assert "scratch" in fails[0] and "rank 1" in fails[0]
    code, out, _ = run(capsys, "verify", ckpt["cfg"], "heat", "1")     # other version intact
    assert code == 0 and "v2" not in out


def test_verify_truncated_and_missing_files(ckpt, capsys):
    os.truncate(ckpt["vck"], 100)
    (ckpt["persistent"] / "heat" / "v2" / "r0.vck").unlink()
    code, out, _ = run(capsys, "verify", ckpt["cfg"], "heat", "2")
    assert code == 1
    assert "truncated" in out and "missing" in out and "2 FAIL" in out


def test_corrupt_manifest_is_partial_in_ls_and_fails_verify(ckpt, capsys):
    record = ckpt["persistent"] / "heat" / "v1" / "n0-0.commit.json"     # rank 0's (its own client)
    record.write_text("{not json")
    code, out, _ = run(capsys, "ls", ckpt["cfg"], "heat", "--json")
    bad = [s for s in json.loads(out) if s["level"] == "persistent" and s["version"] == 1]
    assert code == 0 and bad[0]["state"] == "partial" and bad[0]["ranks"] == [1]
    assert str(record) in bad[0]["problems"][0] and "malformed commit record" in bad[0]["problems"][0]
    code, out, _ = run(capsys, "verify", ckpt["cfg"], "heat", "1")
    assert code == 1 and "FAIL    persistent heat v1 rank 0" in out and "malformed commit record" in out
    assert "OK      persistent heat v1 rank 1" in out


def test_per_rank_manifests_on_persistent_still_read(ckpt, capsys):
    """A persistent tree written before node commit records (r<rank>.manifest.json)."""
    vdir = ckpt["persistent"] / "heat" / "v1"
    for record in vdir.glob("n*.commit.json"):
        for manifest in json.loads(record.read_text())["manifests"]:
            (vdir / f"r{manifest['rank']}.manifest.json").write_text(json.dumps(manifest))
        record.unlink()
    code, out, _ = run(capsys, "verify", ckpt["cfg"], "heat", "1")
    assert code == 0 and "OK      persistent heat v1 rank 0" in out and "OK      persistent heat v1 rank 1" in out


# -- show -------------------------------------------------------------------------------
def test_show_lists_regions(ckpt, capsys):
    code, out, err = run(capsys, "show", ckpt["vck"])
    assert code == 0, err
    assert "name     heat" in out and "version  2" in out and "rank     1" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "float64" in lines["'h'"] and "(5, 7)" in lines["'h'"] and " C " in lines["'h'"]
    assert "float32" in lines["'f'"] and " F " in lines["'f'"]
    assert "{x: float32, n: int64, v: float64[3]}" in lines["'s'"]
    assert "int64" in lines["7"] and "()" in lines["7"]
    assert "int32 (big-endian)" in lines["'big'"]
    assert "pickle" in lines["'obj'"]
    assert "'007'" in lines and "'12'" in lines
    code, out, _ = run(capsys, "show", ckpt["vck"], "--json")
    info = json.loads(out)
    assert (info["name"], info["version"], info["rank"]) == ("heat", 2, 1)
    regions = {r["id"]: r for r in info["regions"]}
    assert regions[7]["shape"] == [] and regions[7]["dtype"] == "int64" and regions[7]["nbytes"] == 8
    assert regions["f"]["order"] == "F" and regions["h"]["nbytes"] == 5 * 7 * 8
    assert all(r["offset"] % 4096 == 0 for r in info["regions"])


# -- extract ----------------------------------------------------------------------------
@pytest.mark.parametrize("arg,rid,flags", [("h", "h", []), ("f", "f", []), ("s", "s", []), ("7", 7, []),
                                           ("big", "big", []), ("empty", "empty", []), ("12", "12", []),
                                           ("007", 7, []), ("007", "007", ["--as-name"])])
def test_extract_round_trips_exactly(ckpt, capsys, arg, rid, flags):
    out_path = ckpt["tmp"] / "out.npy"
    out_path.write_bytes(b"old content")      # replaced, and made private
    out_path.chmod(0o644)
    code, _, err = run(capsys, "extract", ckpt["vck"], arg, out_path, *flags)
    assert code == 0, err
    assert stat.S_IMODE(out_path.stat().st_mode) == 0o600
    expected = arrays(1)[rid]
    got = np.load(out_path, allow_pickle=False)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.flags.f_contiguous == expected.flags.f_contiguous
    assert got.flags.c_contiguous == expected.flags.c_contiguous
    assert got.tobytes(order="A") == expected.tobytes(order="A")


def test_extract_pickle_needs_flag_and_is_not_unpickled(ckpt, capsys, monkeypatch):
    out_path = ckpt["tmp"] / "obj.pkl"
    code, _, err = run(capsys, "extract", ckpt["vck"], "obj", out_path)
    assert_usage_error(code, err, "--allow-pickle", "obj")
    assert not out_path.exists()

    def refuse(*a, **k):
        raise AssertionError("the tool unpickled something")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    code, _, err = run(capsys, "extract", ckpt["vck"], "obj", out_path, "--allow-pickle")
    assert code == 0, err
    monkeypatch.undo()
    assert stat.S_IMODE(out_path.stat().st_mode) == 0o600
    assert pickle.loads(out_path.read_bytes()) == {"rank": 1, "note": "pickled"}


# -- errors -----------------------------------------------------------------------------
def test_errors_exit_2_with_one_clear_line(ckpt, capsys):
    tmp, vck = ckpt["tmp"], ckpt["vck"]
    code, _, err = run(capsys, "show", tmp / "nope.vck")
    assert_usage_error(code, err, tmp / "nope.vck", "No such file")
    code, _, err = run(capsys, "show", ckpt["cfg"])
    assert_usage_error(code, err, ckpt["cfg"], "not a veloc rank file")
    code, _, err = run(capsys, "show", tmp)
    assert_usage_error(code, err, tmp, "directory")
    short = tmp / "short.vck"
    short.write_bytes(vck.read_bytes()[:5000])
    code, _, err = run(capsys, "show", short)
    assert_usage_error(code, err, short, "truncated")
    code, _, err = run(capsys, "extract", short, "h", tmp / "x.npy")
    assert_usage_error(code, err, short, "truncated")
    code, _, err = run(capsys, "extract", vck, "nosuch", tmp / "x.npy")
    assert_usage_error(code, err, vck, "'nosuch'", "'h'")
    code, _, err = run(capsys, "extract", vck, "99", tmp / "x.npy")
    assert_usage_error(code, err, "99")
    assert not (tmp / "x.npy").exists()
    code, _, err = run(capsys, "extract", vck, "h", tmp / "no" / "x.npy")
    assert_usage_error(code, err, tmp / "no" / "x.npy")
    code, _, err = run(capsys, "ls", tmp / "missing.ini")
    assert_usage_error(code, err, tmp / "missing.ini")
    bad = write_cfg(tmp / "bad.ini", ckpt["scratch"], extra="scratch_versoins = 2\n")
    code, _, err = run(capsys, "ls", bad)
    assert_usage_error(code, err, "scratch_versoins", bad)
    code, _, err = run(capsys, "verify", ckpt["cfg"], "../etc")
    assert_usage_error(code, err, "../etc")
    code, _, err = run(capsys, "verify", ckpt["cfg"], "nothere")
    assert_usage_error(code, err, "nothere")
    code, _, err = run(capsys, "verify", ckpt["cfg"], "heat", "9")
    assert_usage_error(code, err, "v9", "versions found: 2, 1")
    code, _, err = run(capsys, "ls", ckpt["cfg"], "--node", "bad/node")
    assert_usage_error(code, err, "bad/node")
    code, _, err = run(capsys, "verify", ckpt["cfg"], "heat", "-3")
    assert code == 2 and "Traceback" not in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("ls", "verify", "show", "extract"):
        assert name in out
        assert main([name, "--help"]) == 0
        assert "usage: veloc " + name in capsys.readouterr().out


def test_entry_point_runs_as_a_process(ckpt):
    env = dict(os.environ, VELOC_NODE_ID=NODE,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "veloc.cli.commands", "ls", ckpt["cfg"]], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "persistent" in proc.stdout and "complete" in proc.stdout
    script = Path(sys.executable).parent / "veloc"
    if script.exists():     # the console script declared in pyproject.toml
        proc = subprocess.run([str(script), "show", str(ckpt["vck"])], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "float64" in proc.stdout, proc.stderr
        proc = subprocess.run([str(script), "show", str(ckpt["tmp"])], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_inconsistent_header_is_shown_but_never_extracted(tmp_path, capsys):
    from veloc.storage.rankfile import build_header, write_rank_file

    def make(path, regions, payloads):
        header, infos, total = build_header("x", 1, 0, regions)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        write_rank_file(fd, header, infos, payloads, total)
        os.close(fd)
    path = tmp_path / "r0.vck"
    make(path, [{"id": "o", "kind": "array", "dtype": "|O", "shape": [2], "order": "C", "nbytes": 16}],
         [np.zeros(16, np.uint8)])
    code, out, _ = run(capsys, "show", path)
    assert code == 0 and "object" in out
    code, _, err = run(capsys, "extract", path, "o", tmp_path / "o.npy")
    assert_usage_error(code, err, path, "Python-object dtype")
    bad = tmp_path / "r1.vck"
    make(bad, [{"id": "m", "kind": "array", "dtype": "<f8", "shape": [5, 7], "order": "C", "nbytes": 8}],
         [np.zeros(8, np.uint8)])
    code, _, err = run(capsys, "show", bad)
    assert_usage_error(code, err, bad, "claims 8 bytes")
    code, _, err = run(capsys, "extract", bad, "m", tmp_path / "m.npy")
    assert_usage_error(code, err, bad, "claims 8 bytes")
    assert not list(tmp_path.glob("*.npy"))


def test_status_and_drain_without_a_backend(tmp_path, capsys):
    ini = tmp_path / "async.ini"
    ini.write_text(f"scratch = {tmp_path}/scratch/{{node}}\nmode = async\n")
    code, out, _ = run(capsys, "status", ini)
    assert code == 0 and "no backend running; 0 unfinished item(s)" in out
    code, out, _ = run(capsys, "drain", ini)
    assert code == 0 and out.strip() == "drained"
    code, _, err = run(capsys, "drain", tmp_path / "missing.ini")
    assert code == 2 and "cannot read config file" in err
