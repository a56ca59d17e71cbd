#!/usr/bin/env bash
# Training demo: run examples/train.py on 2 ranks without checkpoints (the reference),
# then with veloc (two-phase snapshots, auto interval policy), SIGKILL a rank mid-epoch,
# restart, and compare the final weights and loss history with the reference: PASS/FAIL.
# Usage: scripts/train_demo.sh [--backend numpy|torch|auto] [--mode sync|async] [--crash-at STEP]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BACKEND=auto MODE=sync CRASH_AT=40 RANKS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) BACKEND="$2"; shift 2 ;;
        --mode) MODE="$2"; shift 2 ;;
        --crash-at) CRASH_AT="$2"; shift 2 ;;
        *) echo "train_demo.sh: unknown argument $1 (try --backend, --mode, --crash-at)" >&2; exit 2 ;;
    esac
done

PY=.venv/bin/python
if [ ! -x "$PY" ] || ! "$PY" -c "import veloc, mpi4py, numpy" 2>/dev/null; then
    echo "train_demo.sh: installing veloc into .venv (quietly)"
    [ -x "$PY" ] || python3 -m venv .venv
    "$PY" -m pip install -qq --disable-pip-version-check -e '.[test]'
fi
MPIEXEC=.venv/bin/mpiexec
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec

SHM=/dev/shm; [ -d "$SHM" ] || SHM="${TMPDIR:-/tmp}"
WORK="$(mktemp -d "$SHM/veloc-train-demo.XXXXXX")"
PERSIST="$(mktemp -d "${TMPDIR:-/tmp}/veloc-train-demo-p.XXXXXX")"
trap 'rm -rf "$WORK" "$PERSIST"' EXIT
cat > "$WORK/veloc.ini" <<EOF
scratch = $WORK/scratch/{node}
persistent = $PERSIST
mode = $MODE
scratch_versions = 2
max_versions = 2

[policy]
mode = auto
overhead = 0.05
EOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() { timeout 300 "$MPIEXEC" -n "$RANKS" "$PY" examples/train.py --backend "$BACKEND" "$@"; }

echo "== reference run (no checkpoints)"
REF="$(run --no-checkpoint | tee /dev/stderr | grep '^train: done')"
echo "== checkpointed run, rank $((RANKS - 1)) is killed after step $CRASH_AT"
if run --config "$WORK/veloc.ini" --crash-at "$CRASH_AT" >"$WORK/crash.log" 2>&1; then
    cat "$WORK/crash.log"; echo "FAIL: the run was supposed to crash"; exit 1
fi
grep '^train:' "$WORK/crash.log" || true
echo "== restart"
OUT="$(run --config "$WORK/veloc.ini" | tee /dev/stderr)"
if [ "$MODE" = async ]; then     # the job's backends drain their queues, then stop
    "$PY" -c 'import sys; from veloc_backend import control
for ep, _ in control.job_backends(sys.argv[1]): control.shutdown(ep, drain_first=True)' "$WORK/veloc.ini"
fi
GOT="$(grep '^train: done' <<<"$OUT" | sed 's/ checkpoints=[0-9]*//')"
WANT="$(sed 's/ checkpoints=[0-9]*//' <<<"$REF")"
if ! grep -q '^train: restarted from version' <<<"$OUT"; then
    echo "FAIL: the second run did not restart from a checkpoint"; exit 1
fi
if [ "$GOT" = "$WANT" ]; then
    echo "PASS: the restarted run ends bit-for-bit like the uninterrupted one (weights and losses)"
else
    echo "FAIL: restarted run differs"; echo " want: $WANT"; echo " got:  $GOT"; exit 1
fi
