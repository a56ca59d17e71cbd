#!/usr/bin/env python3
"""Data-parallel training of a small MLP under mpiexec, checkpointed with veloc's two-phase API.

Every rank holds the whole model (an MLP: ``features -> hidden (tanh, dropout) -> outputs``,
mean-squared error against a fixed random "teacher" network, Adam). The data set is
synthetic, generated from ``--seed`` identically on every rank; each step, every rank
takes its share of a global batch from a :class:`veloc.data.ResumableSampler`, computes
gradients, and the ranks average them with one ``MPI.Allreduce``. Two back ends compute the
same thing: ``numpy`` (always available) and ``torch`` (CPU; ``auto`` picks torch when it
is installed).

Checkpointing (``--config``): the model, the optimizer, the sampler and the dropout
generator are protected with ``protect_stateful``; the step counter and the loss history
with ``protect``. After each step ``ckpt.need_checkpoint(step)`` (the ``[policy]``
section; ``auto`` by default) decides, and ``ckpt.snapshot("train", step)`` stages the
state and returns; the next step's weight update runs inside ``with ckpt.guard():``, so it
waits only until that copy is complete, never for the write. ``--crash-at STEP`` makes
``--crash-rank`` (default: the last rank) SIGKILL itself right after that step's decision,
once every rank got there; mpiexec then ends the job. Started again, the run restores the
newest version every rank can restore and finishes bit-for-bit like a run that never
failed. Rank 0 prints ``train: restarted from version V (...)`` after a restart, and at
the end ``train: done at step N ... weights=<sha256> losses=<sha256>``.

Usage::

    mpiexec -n 2 python examples/train.py --config configs/sync.ini --crash-at 30
    mpiexec -n 2 python examples/train.py --config configs/sync.ini          # resumes, finishes
    mpiexec -n 2 python examples/train.py --no-checkpoint                    # the reference
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one BLAS thread: same sums in every run
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import job_exit  # noqa: E402  (examples/job_exit.py)

CKPT_NAME = "train"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="veloc INI file (required unless --no-checkpoint)")
    p.add_argument("--backend", choices=("numpy", "torch", "auto"), default="auto")
    p.add_argument("--samples", type=int, default=512, help="data set size")
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--outputs", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--crash-at", type=int, metavar="STEP", help="SIGKILL --crash-rank after this step")
    p.add_argument("--crash-rank", type=int, default=-1, help="rank that dies (default: the last)")
    p.add_argument("--no-checkpoint", action="store_true", help="plain run without veloc (the reference)")
    p.add_argument("--timed-from", type=int, default=0, metavar="STEP",
                   help="time the steps after STEP separately (steady state)")
    p.add_argument("--out", help="rank 0 writes the run's figures (JSON) to this file")
    p.add_argument("--log-policy", action="store_true", help="rank 0 logs every interval-policy decision")
    args = p.parse_args(argv)
    if not args.no_checkpoint and not args.config:
        p.error("--config is required unless --no-checkpoint is given")
    for name in ("samples", "features", "hidden", "outputs", "batch", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def make_data(args):
    """Inputs and teacher targets, a pure function of ``--seed`` (identical on every rank)."""
    rng = np.random.default_rng([args.seed, 1])
    x = rng.standard_normal((args.samples, args.features), dtype=np.float32)
    w1 = rng.standard_normal((args.features, args.hidden), dtype=np.float32) / np.sqrt(args.features)
    w2 = rng.standard_normal((args.hidden, args.outputs), dtype=np.float32) / np.sqrt(args.hidden)
    return x, (np.tanh(x @ w1) @ w2).astype(np.float32)


class NumpyMLP:
    """The model and its Adam state as numpy arrays; ``state_dict`` returns the live arrays."""

    def __init__(self, args):
        rng = np.random.default_rng([args.seed, 2])
        self.params = {
            "w1": (rng.standard_normal((args.features, args.hidden)) / np.sqrt(args.features)).astype(np.float32),
            "b1": np.zeros(args.hidden, np.float32),
            "w2": (rng.standard_normal((args.hidden, args.outputs)) / np.sqrt(args.hidden)).astype(np.float32),
            "b2": np.zeros(args.outputs, np.float32)}
        self.optim = AdamState(self.params, args.lr)
        self.dropout = np.random.default_rng([args.seed, 3, MPI.COMM_WORLD.Get_rank()])

    def state_dict(self):
        return dict(self.params)

    def load_state_dict(self, state):
        for key, value in state.items():
            if value is not self.params[key]:
                np.copyto(self.params[key], value)

    def gradients(self, x, y, flat):
        """Loss of the batch; its gradients go into ``flat`` (in ``params`` order)."""
        p = self.params
        pre = x @ p["w1"] + p["b1"]
        h = np.tanh(pre)
        mask = (self.dropout.random(h.shape) >= 0.1).astype(np.float32) / np.float32(0.9)
        hd = h * mask
        err = hd @ p["w2"] + p["b2"] - y
        loss = float(np.mean(err * err))
        d_out = (2.0 / err.size) * err
        d_h = (d_out @ p["w2"].T) * mask * (1 - h * h)
        grads = [x.T @ d_h, d_h.sum(0), hd.T @ d_out, d_out.sum(0)]
        offset = 0
        for g in grads:
            flat[offset:offset + g.size] = g.ravel()
            offset += g.size
        return loss

    def update(self, flat):
        self.optim.step(flat)


class AdamState:
    """Adam over a dict of numpy parameters; state: ``m``, ``v`` and the step count."""

    def __init__(self, params, lr):
        self.params, self.lr = params, lr
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.step_count = np.zeros(1, np.int64)

    def state_dict(self):
        return {"m": dict(self.m), "v": dict(self.v), "step": self.step_count}

    def load_state_dict(self, state):
        for part in ("m", "v"):
            for key, value in state[part].items():
                if value is not getattr(self, part)[key]:
                    np.copyto(getattr(self, part)[key], value)
        if state["step"] is not self.step_count:
            np.copyto(self.step_count, state["step"])

    def step(self, flat):
        self.step_count += 1
        t = int(self.step_count[0])
        scale = self.lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        offset = 0
        for key, param in self.params.items():
            g = flat[offset:offset + param.size].reshape(param.shape)
            offset += param.size
            m, v = self.m[key], self.v[key]
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            param -= (scale * m / (np.sqrt(v) + 1e-8)).astype(np.float32)


def build_model(args):
    """``(model, stateful objects to protect, parameter count, weights-as-bytes)``."""
    if args.backend == "numpy":
        model = NumpyMLP(args)
        from veloc.training import NumpyRNGState
        stateful = {"model": model, "optim": model.optim, "rng": NumpyRNGState(model.dropout)}
        return model, stateful, sum(p.size for p in model.params.values()), \
            lambda: b"".join(p.tobytes() for p in model.params.values())
    from torch_mlp import TorchMLP
    model = TorchMLP(args, MPI.COMM_WORLD.Get_rank())
    return model, model.stateful(), model.size, model.weights_bytes


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.backend == "auto":
        try:
            import torch  # noqa: F401
            args.backend = "torch"
        except ImportError:
            args.backend = "numpy"
    x, y = make_data(args)
    model, stateful, nparams, weights_bytes = build_model(args)
    from veloc.data import ResumableSampler
    sampler = ResumableSampler(args.samples, seed=args.seed, rank=rank, world_size=size)
    steps_per_epoch = args.samples // (size * args.batch)
    if steps_per_epoch == 0:
        raise SystemExit(f"--samples {args.samples} is smaller than one global batch ({size} x {args.batch})")
    total = steps_per_epoch * args.epochs
    losses = np.zeros(total, np.float64)
    progress = np.zeros(1, np.int64)               # steps done
    flat = np.zeros(nparams + 1, np.float32)       # gradients, then the loss
    ckpt, restarted, stalls = None, None, []
    if not args.no_checkpoint:
        import veloc
        if args.log_policy and rank == 0:
            import logging
            logging.basicConfig(format="%(name)s: %(message)s")
            logging.getLogger("veloc.policy").setLevel(logging.INFO)
        ckpt = veloc.init(args.config, comm)
        for name, obj in dict(stateful, sampler=sampler).items():
            ckpt.protect_stateful(name, obj)
        ckpt.protect("losses", losses)
        ckpt.protect("progress", progress)
        version = ckpt.restart_test(CKPT_NAME)
        if version is not None:
            ckpt.restart(CKPT_NAME, version)
            restarted = version
            if rank == 0:
                print(f"train: restarted from version {version} (level {ckpt.last_restart.level})", flush=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    t_timed = t_start if args.timed_from <= int(progress[0]) else None
    checkpoints = 0
    while progress[0] < total:
        sampler.set_epoch(int(progress[0]) // steps_per_epoch)
        for idx in sampler.iter_batches(args.batch):
            loss = model.gradients(x[idx], y[idx], flat[:-1])
            flat[-1] = loss
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat /= np.float32(size)
            if ckpt is not None:
                t0 = time.perf_counter()
                ckpt.wait_snapshot()                 # the copy of the last snapshot is complete
                stall = time.perf_counter() - t0
                with ckpt.guard():
                    model.update(flat[:-1])
            else:
                model.update(flat[:-1])
            step = int(progress[0])
            losses[step] = float(flat[-1])
            progress[0] = step + 1
            if ckpt is not None:
                if stalls:
                    stalls[-1] += stall
                if ckpt.need_checkpoint(step + 1):
                    t0 = time.perf_counter()
                    ckpt.snapshot(CKPT_NAME, step + 1)
                    stalls.append(time.perf_counter() - t0)
                    checkpoints += 1
            if args.crash_at == step + 1:
                comm.Barrier()
                if rank == args.crash_rank % size:
                    os.kill(os.getpid(), signal.SIGKILL)
            if args.timed_from == step + 1:
                t_timed = time.perf_counter()
    if ckpt is not None:
        ckpt.checkpoint_wait()
    t_end = time.perf_counter()
    cpu_seconds = comm.allreduce(time.process_time() - cpu_start)   # every rank, all its threads
    report(args, comm, ckpt, locals(), weights_bytes())
    if ckpt is not None:
        ckpt.finalize()


def report(args, comm, ckpt, run, weights):
    """Rank 0 prints the checksums (and writes ``--out``); every rank checks they agree."""
    digest_w = hashlib.sha256(weights).hexdigest()
    digest_l = hashlib.sha256(run["losses"].tobytes()).hexdigest()
    agreed = comm.allgather(digest_w)
    if comm.Get_rank() != 0:
        return
    if len(set(agreed)) != 1:
        print("train: ranks disagree on the weights", file=sys.stderr, flush=True)
        comm.Abort(1)
    print(f"train: done at step {int(run['progress'][0])} backend={args.backend} ranks={comm.Get_size()} "
          f"checkpoints={run['checkpoints']} final_loss={run['losses'][-1]:.6f} "
          f"weights={digest_w[:16]} losses={digest_l[:16]}", flush=True)
    if args.out:
        state_bytes = len(weights) * 3              # weights + two Adam moments
        buf = np.empty(state_bytes, np.uint8)
        src = np.ones(state_bytes, np.uint8)
        copies = []
        for _ in range(3):
            t0 = time.perf_counter()
            np.copyto(buf, src)
            copies.append(time.perf_counter() - t0)
        figures = {"backend": args.backend, "ranks": comm.Get_size(), "steps": int(run["progress"][0]),
                   "seconds": run["t_end"] - run["t_start"], "cpu_seconds": run["cpu_seconds"],
                   "timed_seconds": None if run["t_timed"] is None else run["t_end"] - run["t_timed"],
                   "checkpoints": run["checkpoints"], "stalls": run["stalls"], "restarted": run["restarted"],
                   "state_bytes": state_bytes, "copyto_seconds": float(np.median(copies)),
                   "weights": digest_w, "losses": digest_l,
                   "policy": None if ckpt is None else _plain(ckpt.policy.last_decision)}
        with open(os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(figures, f, indent=1)


def _plain(decision):
    return {k: (v if isinstance(v, (int, float, str, type(None))) else str(v)) for k, v in decision.items()}


if __name__ == "__main__":
    job_exit.prepare(MPI.COMM_WORLD)
    try:
        main()
    except Exception:
        job_exit.fail(MPI.COMM_WORLD)
