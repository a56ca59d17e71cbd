#!/usr/bin/env bash
# The README's first command: set up the repository's virtual environment (once) and
# run the crash / lose-a-node / restart demo (scripts/demo.py). Arguments are passed on
# to demo.py (try --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "demo.sh: creating $VENV"
    python3 -m venv "$VENV"
fi

# (Re)install veloc in editable mode when it is missing or pyproject.toml changed.
STAMP="$VENV/.veloc-demo-installed"
WANT="$(cksum < pyproject.toml)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] \
        || ! "$PY" -c "import veloc, mpi4py, numpy" 2>/dev/null; then
    echo "demo.sh: installing veloc and its test dependencies into $VENV (quietly)"
    "$PY" -m pip install -qq --disable-pip-version-check -e '.[test]'
    echo "$WANT" > "$STAMP"
fi

exec "$PY" scripts/demo.py "$@"
