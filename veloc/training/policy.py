"""The interval policy behind ``Client.need_checkpoint(iteration)``.

Every application rank calls ``need_checkpoint`` once per training iteration, with the
same iteration number; the answer is the same on every rank. Settings come from the
``[policy]`` config section:

* ``mode = fixed``: a checkpoint every ``interval`` iterations (``iteration % interval
  == 0``) and/or about every ``seconds`` of wall time (turned into a number of
  iterations from the agreed iteration time, re-agreed at each such checkpoint).
* ``mode = auto`` (default): after ``warmup`` iterations of profiling, a checkpoint every
  ``k`` iterations, where ``k`` is the smallest interval for which the snapshot stall
  ``o`` amortised over ``k`` iterations stays under the bound (``o / (k Ti) <= overhead``)
  and a persist (``Ts``) finishes with an iteration to spare (``(k - 1) Ti >= Ts``: the
  next snapshot finds a free buffer, and each window keeps a clean iteration). Each window
  of ``k`` iterations is measured: its overhead is ``(wall - n Ti) / (n Ti)`` with ``Ti``
  the mean time of recent *clean* iterations (no stall, no persist in flight). Above the
  bound (by more than twice the standard error of a window's mean, estimated from the
  clean iterations' spread, so that a noisy machine does not ratchet ``k`` up), ``k``
  grows (x1.5); after ``CALM_WINDOWS`` windows under half the bound it
  shrinks again (/1.5), never below the model's ``k``. ``interval`` and ``seconds``, if
  given, cap ``k``. With ``mtbf`` (seconds), the Young and Daly intervals for the
  measured per-checkpoint cost are computed and logged next to ``k``.

Agreement: decisions change only at window boundaries, where each rank contributes its
measurements to one ``MPI.MAX`` allreduce on a communicator duplicated from the
client's (so it never interleaves with the application's or a persist's traffic), and
every rank then applies the same rule to the same numbers. Between boundaries the
decision is a pure function of the iteration number.

Measurements reach the policy through three hooks that the snapshot code calls
(cheap, thread-safe, any thread): :meth:`IntervalPolicy.record_snapshot`,
:meth:`~IntervalPolicy.record_stall` and :meth:`~IntervalPolicy.record_persist`. Every
checkpoint decision is logged on logger ``veloc.policy`` with its inputs.
"""
import logging
import math
import statistics
import threading
import time
from collections import deque
from typing import Callable, Mapping, Optional

import numpy as np

from veloc.config import check_policy_keys
from veloc.errors import CheckpointError
from veloc.training.interval_models import daly_interval, young_interval

log = logging.getLogger("veloc.policy")

CALM_WINDOWS = 3
"""Windows in a row under half the bound before ``k`` is lowered."""
GROWTH = 1.5
"""Factor by which ``k`` is raised (or lowered) at a window boundary."""
MAX_K = 1_000_000
UNKNOWN = -1.0


def _ceil(x: float) -> int:
    """``ceil`` that ignores rounding noise in measured ratios (5.0000001 -> 5)."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


class IntervalPolicy:
    """One rank's policy state. Built by the client from its ``[policy]`` section."""

    def __init__(self, section: Mapping, comm=None, clock: Callable[[], float] = time.perf_counter):
        self.mode = section.get("mode") or "auto"
        self.bound = float(section.get("overhead") if section.get("overhead") is not None else 0.05)
        self.interval = section.get("interval")
        self.seconds = section.get("seconds")
        self.mtbf = section.get("mtbf")
        self.warmup = int(section.get("warmup") or 5)
        check_policy_keys(section)
        self._parent_comm, self._comm, self._clock = comm, None, clock
        self._lock = threading.Lock()
        # filled by the hooks (any thread)
        self._stall_since_call = 0.0
        self._window_stall = 0.0
        self._window_snapshots = 0
        self._in_flight = 0
        self._flight_since = 0.0                # when the oldest persist in flight started
        self._busy = False                      # a snapshot or persist touched the current iteration
        self._persists = deque(maxlen=8)
        # main thread only
        self._stalls = deque(maxlen=8)
        self._clean = deque(maxlen=15)
        self._last_call: Optional[float] = None
        self._window_t = self._window_it = None
        self._window_calls = self._window_clean = 0
        self._window_fastest = math.inf         # fastest iteration of the window, its stall left out
        self._next_sync: Optional[int] = None
        self._seconds_every: Optional[int] = None
        self._profiled = self._after_checkpoint = False
        self._calm = 0
        self.k: Optional[int] = None
        self.last_decision: dict = {}

    # -- hooks (any thread) ------------------------------------------------------------
    def record_snapshot(self, stall_s: float) -> None:
        """A snapshot started and blocked its caller ``stall_s`` seconds; a persist is now in flight."""
        with self._lock:
            self._stall_since_call += max(0.0, float(stall_s))
            self._window_stall += max(0.0, float(stall_s))
            self._window_snapshots += 1
            if self._in_flight == 0:
                self._flight_since = self._clock()
            self._in_flight += 1
            self._busy = True

    def record_stall(self, seconds: float, for_buffer: bool = False) -> None:
        """Later blocking caused by a snapshot: waiting for its copy (``wait_snapshot``), or
        with ``for_buffer`` for a persist to free a staging buffer. Both count in the window's
        overhead; a buffer wait is not part of the snapshot's own cost (it means ``k Ti``
        is shorter than a persist, which the persist time already accounts for)."""
        with self._lock:
            self._stall_since_call += max(0.0, float(seconds))
            if not for_buffer:
                self._window_stall += max(0.0, float(seconds))
            self._busy = True

    def record_persist(self, seconds: float) -> None:
        """A persist ended (successfully or not) after ``seconds``."""
        with self._lock:
            self._persists.append(max(0.0, float(seconds)))
            self._in_flight = max(0, self._in_flight - 1)
            if self._in_flight:
                self._flight_since = self._clock() - float(seconds)
            self._busy = True

    # -- the decision (main thread) -----------------------------------------------------
    def need_checkpoint(self, iteration: int) -> bool:
        """Whether to checkpoint after ``iteration``; identical on every rank."""
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
            raise CheckpointError(f"need_checkpoint(iteration={iteration!r}): the iteration must be a "
                                  "non-negative int, the same on every rank")
        iteration = int(iteration)
        now = self._clock()
        self._observe_iteration(now)
        if self._next_sync is not None and iteration < self._window_it:
            self._next_sync = None              # the loop went back (restarted): profile again
        hit_interval = self.mode == "fixed" and bool(self.interval) and iteration % self.interval == 0
        if self._next_sync is None:
            self._start(iteration, now)
        elif iteration >= self._next_sync:
            self._window_calls += 1
            self._window_boundary(iteration, now)
            self._mark_busy()
            return True
        else:
            self._window_calls += 1
        if hit_interval:
            self._log_decision(iteration, "every 'interval' iterations", {"interval": self.interval})
            self._after_checkpoint = True
            self._mark_busy()
            if self._seconds_every:
                self._next_sync = iteration + self._seconds_every
        return hit_interval

    def _mark_busy(self) -> None:
        """The coming iteration holds a checkpoint (hooks or not): it is not a clean sample."""
        with self._lock:
            self._busy = True

    def _observe_iteration(self, now: float) -> None:
        with self._lock:
            stall, busy = self._stall_since_call, self._busy or self._in_flight > 0
            self._stall_since_call, self._busy = 0.0, self._in_flight > 0
        if self._last_call is not None:
            if not busy and stall == 0.0:
                self._clean.append(now - self._last_call)
                self._window_clean += 1
            else:
                self._window_fastest = min(self._window_fastest, now - self._last_call - stall)
        self._last_call = now

    def _start(self, iteration: int, now: float) -> None:
        self._window_t, self._window_it, self._window_calls = now, iteration, 0
        self._profiled, self._after_checkpoint = False, False
        if self.mode == "fixed" and not self.seconds:
            self._next_sync = math.inf          # interval only: no agreement ever needed
        else:
            self._next_sync = iteration + self.warmup

    def _window_boundary(self, iteration: int, now: float) -> None:
        with self._lock:
            stall, snapshots = self._window_stall, self._window_snapshots
            self._window_stall, self._window_snapshots = 0.0, 0
            persist = statistics.median(self._persists) if self._persists else UNKNOWN
            if self._in_flight:                 # still running: it has taken at least this long
                persist = max(persist, now - self._flight_since)
        calls = max(1, self._window_calls)
        if not self._window_clean and self._window_fastest < math.inf:
            # no clean iteration: the fastest one (interference only slows) keeps Ti current
            self._clean.append(self._window_fastest)
        self._window_clean, self._window_fastest = 0, math.inf
        # the mean, not the median: the window's mean is compared with it, and on a shared
        # machine iteration times are skewed (a median would read the skew as overhead)
        clean = statistics.fmean(self._clean) if self._clean else (now - self._window_t) / calls
        if snapshots:
            self._stalls.append(stall / snapshots)
        elif self._after_checkpoint:    # no hook reported this checkpoint: its cost is the window's excess
            self._stalls.append(max(0.0, (now - self._window_t) - calls * clean))
        spread = statistics.stdev(self._clean) / clean if len(self._clean) > 1 and clean > 0 else 0.0
        local = np.array([clean, (now - self._window_t) / calls,
                          statistics.median(self._stalls) if self._stalls else UNKNOWN,
                          persist, stall, spread], dtype=np.float64)
        ti, mean_iter, o, ts, window_stall, spread = (float(x) for x in self._agree(local))
        overhead = (mean_iter - ti) / ti if ti > 0 else 0.0
        # the noise of a window's mean (relative): its overhead must exceed the bound by more to raise k
        noise = 2.0 * spread / math.sqrt(calls)
        inputs = {"Ti": ti, "mean_iteration": mean_iter, "stall": o, "persist": ts, "window_stall": window_stall,
                  "window_overhead": overhead, "noise": noise, "window_iterations": calls, "bound": self.bound}
        if self.mode == "fixed":
            self._seconds_every = max(1, _ceil(self.seconds / mean_iter)) if mean_iter > 0 else 1
            self._log_decision(iteration, "about every 'seconds'", dict(inputs, seconds=self.seconds,
                                                                         next_in=self._seconds_every))
            self._next_sync = iteration + self._seconds_every
        else:
            old = self.k
            self.k, reason = self._choose_k(ti, o, ts, overhead, noise)
            inputs.update(self._young_daly(ti, o, overhead * calls * ti))
            self._log_decision(iteration, reason, dict(inputs, k_before=old, k=self.k))
            self._next_sync = iteration + self.k
        self._window_t, self._window_it, self._window_calls = now, iteration, 0
        self._after_checkpoint = True

    def _choose_k(self, ti: float, o: float, ts: float, overhead: float, noise: float = 0.0):
        model = 1
        if ti > 0 and o > 0:
            model = max(model, _ceil(o / (self.bound * ti)))
        if ti > 0 and ts > 0:     # one iteration to spare: the window keeps a clean iteration
            model = max(model, _ceil(ts / ti) + 1)
        cap = MAX_K
        if self.interval:
            cap = min(cap, self.interval)
        if self.seconds and ti > 0:
            cap = min(cap, max(1, int(self.seconds / ti)))
        model = min(model, cap)
        if not self._profiled:
            # the window after warm-up ends with the first checkpoint; the next one measures it
            self._profiled = o != UNKNOWN
            if not self._profiled:
                return min(cap, self.warmup), "warm-up done: first checkpoint, to measure its cost"
            return model, "profiled: smallest k with stall/(k Ti) <= bound and k Ti >= persist"
        k = self.k
        if overhead > self.bound + noise:
            self._calm = 0
            return min(cap, max(model, k + 1, math.ceil(k * GROWTH))), "window overhead above the bound: raise k"
        if overhead < self.bound / 2:
            self._calm += 1
            if self._calm >= CALM_WINDOWS:
                self._calm = 0
                return min(cap, max(model, math.floor(k / GROWTH))), \
                    f"{CALM_WINDOWS} windows under half the bound: lower k"
            return min(cap, max(model, k)), "window overhead under half the bound"
        self._calm = 0
        return min(cap, max(model, k)), "window overhead within the bound"

    def _young_daly(self, ti: float, o: float, excess: float) -> dict:
        if not self.mtbf:
            return {}
        cost = max(o, excess)
        if cost <= 0:
            return {"mtbf": self.mtbf, "young_daly": "no checkpoint cost measured yet"}
        young, daly = young_interval(cost, self.mtbf), daly_interval(cost, self.mtbf)
        return {"mtbf": self.mtbf, "checkpoint_cost": cost, "young_s": young, "daly_s": daly,
                "young_k": max(1, round(young / ti)) if ti > 0 else None}

    def _agree(self, local: np.ndarray) -> np.ndarray:
        """Element-wise max over every rank: the slowest rank's figures (one allreduce)."""
        if self._parent_comm is None:
            return local
        if self._comm is None:
            self._comm = self._parent_comm.Dup()
        from mpi4py import MPI
        agreed = np.empty_like(local)
        self._comm.Allreduce(local, agreed, op=MPI.MAX)
        return agreed

    def _log_decision(self, iteration: int, reason: str, inputs: dict) -> None:
        self.last_decision = {"iteration": iteration, "mode": self.mode, "reason": reason, **inputs}
        if log.isEnabledFor(logging.INFO):
            shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in inputs.items())
            log.info("checkpoint at iteration %d (%s mode): %s; %s", iteration, self.mode, reason, shown)

    def close(self) -> None:
        """Free the duplicated communicator (collective over the client's communicator)."""
        if self._comm is not None:
            self._comm.Free()
            self._comm = None


class PolicyMixin:
    """``Client.need_checkpoint`` and the policy hooks; the policy is built on first use."""

    _policy = None
    _policy_lock = threading.Lock()

    def policy_hooks(self) -> IntervalPolicy:
        """The policy, built if needed; safe from any thread (creates no communicator)."""
        with PolicyMixin._policy_lock:
            if self._policy is None:
                # the application's communicator (the client's own one carries background persists)
                app_comm = getattr(self, "app_comm", None) or self.comm
                self._policy = IntervalPolicy(self.config.section("policy"),
                                              comm=None if self.size == 1 else app_comm)
        return self._policy

    @property
    def policy(self) -> IntervalPolicy:
        return self.policy_hooks()

    def need_checkpoint(self, iteration: int) -> bool:
        """Collective by contract: every rank calls it once per iteration with the same
        ``iteration``; returns the same answer on every rank (see ``[policy]``)."""
        self._check_open()
        return self.policy_hooks().need_checkpoint(iteration)

    def _close_policy(self) -> None:
        if self._policy is not None:
            self._policy.close()
