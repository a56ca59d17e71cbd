#!/usr/bin/env bash
# The whole test suite on a fresh machine: make .venv if missing, install veloc with its
# test extras (mpi4py + the mpich wheel give mpiexec; no system MPI), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
