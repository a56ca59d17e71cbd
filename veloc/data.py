"""Resumable, re-shardable data order for data-parallel training.

Each application rank builds one :class:`ResumableSampler` with its rank and the
data-parallel world size. The order of an epoch is a pure function of ``(seed,
epoch)``: one permutation ``P`` of ``range(n)`` drawn from a numpy ``Generator`` seeded
with ``SeedSequence([seed, epoch])`` (or ``range(n)`` itself without shuffling), the same
on every rank and in every run.

How consumption is counted (globally): the epoch has one global cursor ``consumed``, the
number of entries of ``P`` already handed out over all ranks. From a cursor ``c`` rank
``r`` of ``W`` hands out ``P[c + r], P[c + r + W], P[c + r + 2W], ...``: each index a rank
yields advances the cursor by ``W`` (by ``W * B`` for a batch of ``B``), so after every
rank has yielded ``j`` indices, ``consumed = min(n, c + j W)`` on every rank and the
union of what they yielded is exactly ``P[c : consumed]``. An exhausted epoch has
``consumed = n``. The state (:meth:`state_dict`: ``epoch`` and ``consumed``, plus ``n``,
``seed`` and ``shuffle`` to catch a mismatched restore) does not contain the world size:
restored into ``W'`` ranks, rank ``r'`` continues with ``P[consumed + r' :: W']``, so the
remainder ``P[consumed:]`` is re-sharded over the new ranks with nothing lost or repeated.

The count covers indices *handed out*: protect the state at a step boundary, after the
step's samples were drawn (a loader that prefetches ahead would count its prefetched
samples as consumed).

No torch import: the sampler is an iterable with ``__len__``, which is all
``torch.utils.data.DataLoader(sampler=...)`` needs; :meth:`iter_batches` gives lock-step
batches for loops that allreduce every step.
"""
from typing import Iterator, Optional

import numpy as np

from veloc.errors import ConfigError, RestartError

_STATE_KEYS = ("epoch", "consumed", "n", "seed", "shuffle")


def _non_negative_int(what, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"ResumableSampler: {what} = {value!r}: expected an int >= {minimum}")
    return int(value)


class ResumableSampler:
    """This rank's indices of an ``n``-sample dataset, epoch by epoch (see the module doc)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.n = _non_negative_int("n", n)
        self.seed = _non_negative_int("seed", seed)
        self.world_size = _non_negative_int("world_size", world_size, 1)
        self.rank = _non_negative_int("rank", rank)
        if self.rank >= self.world_size:
            raise ConfigError(f"ResumableSampler: rank = {rank} is not below world_size = {world_size}")
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.epoch = 0
        self.consumed = 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch: Optional[int] = None

    # -- order --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (cursor at 0). Setting the current epoch again keeps the cursor,
        so a loop ``for e in range(start, E): sampler.set_epoch(e)`` resumes mid-epoch."""
        epoch = _non_negative_int("epoch", epoch)
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        """The global order ``P`` of ``epoch`` (default: the current one); read-only."""
        epoch = self.epoch if epoch is None else _non_negative_int("epoch", epoch)
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                order = rng.permutation(self.n)
            else:
                order = np.arange(self.n)
            order.flags.writeable = False
            self._order, self._order_epoch = order, epoch
        return self._order

    def _stop(self, per_step: int) -> int:
        """Cursor value at which this rank stops: ``n``, or the last full round with ``drop_last``."""
        if not self.drop_last:
            return self.n
        return self.consumed + (self.n - self.consumed) // per_step * per_step

    def __len__(self) -> int:
        """How many indices this rank yields from the current cursor to the end of the epoch."""
        stop = self._stop(self.world_size)
        first = self.consumed + self.rank
        return max(0, -(-(stop - first) // self.world_size))

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining indices of the current epoch; advances the global cursor."""
        order, start = self.order(), self.consumed
        mine = order[start + self.rank:self._stop(self.world_size):self.world_size]
        for j, index in enumerate(mine.tolist()):
            self.consumed = min(self.n, start + (j + 1) * self.world_size)
            yield index
        self.consumed = self.n

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Lock-step batches: every rank yields the same number of ``batch_size``-index arrays
        (the epoch's last ``< world_size * batch_size`` samples are skipped); each batch
        advances the global cursor by ``world_size * batch_size``."""
        batch = _non_negative_int("batch_size", batch_size, 1)
        step = self.world_size * batch
        order, start = self.order(), self.consumed
        for k in range((self.n - start) // step):
            base = start + k * step
            self.consumed = base + step
            yield order[base + self.rank:base + step:self.world_size].copy()
        self.consumed = self.n

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"epoch", "consumed", "n", "seed", "shuffle"}``: identical on every rank."""
        return {"epoch": self.epoch, "consumed": self.consumed, "n": self.n, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s epoch and cursor, on this sampler's rank and world size."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise RestartError(f"ResumableSampler state lacks {missing}; expected keys {list(_STATE_KEYS)}")
        for key in ("n", "seed", "shuffle"):
            if type(getattr(self, key))(state[key]) != getattr(self, key):
                raise RestartError(f"ResumableSampler state has {key} = {state[key]!r} but this sampler has "
                                   f"{key} = {getattr(self, key)!r}: build it with the same n, seed and shuffle")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.n or int(state["epoch"]) < 0:
            raise RestartError(f"ResumableSampler state epoch = {state['epoch']!r}, consumed = {consumed} "
                               f"is out of range for n = {self.n}")
        self.epoch, self.consumed = int(state["epoch"]), consumed
