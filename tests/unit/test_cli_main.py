"""``python -m veloc`` runs the ``veloc`` tool as a real process."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "veloc", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_python_dash_m_veloc_help_and_errors(tmp_path):
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: veloc ")
    for command in ("ls", "verify", "show", "extract", "drain", "status"):
        assert command in proc.stdout
    proc = run("ls", "--help")
    assert proc.returncode == 0 and "--all-nodes" in proc.stdout and "truncated" in proc.stdout
    proc = run("ls", str(tmp_path / "missing.ini"))
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr and "Traceback" not in proc.stderr
    ini = tmp_path / "c.ini"
    ini.write_text(f"scratch = {tmp_path}/s/{{node}}\n")
    proc = run("ls", str(ini))
    assert proc.returncode == 0 and "no checkpoints" in proc.stdout
