#!/usr/bin/env bash
# The whole test suite on a fresh machine: make .venv if missing, install veloc with its
# test extras (mpi4py + the mpich wheel give mpiexec; no system MPI) and the torch extra
# (so the PyTorch state tests run for real) and the hdf5 extra (h5py), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,torch,hdf5]'
exec .venv/bin/python -m pytest -q "$@"
