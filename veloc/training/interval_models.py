"""Checkpoint-interval models: Young, Daly, and a multi-level first-order model.

Pure functions, called by the interval policy (on every rank, with agreed inputs, so
the results agree too) and by ``veloc plan``. Notation: ``cost`` is what one checkpoint
costs the application in seconds, ``mtbf`` the mean time between the failures that
this checkpoint protects against, in seconds.

Multi-level model: level ``l`` has a cost ``C_l`` and a failure rate ``lambda_l`` (the
rate of failures that destroy every faster level, so only level ``l`` or slower can
restore). To first order each level is its own Young problem: its period is
``T_l = sqrt(2 C_l / lambda_l)`` and its share of the run time lost to checkpoints and
re-execution is ``sqrt(2 C_l lambda_l)``. Periods are then rounded up so that each
level's period is a whole multiple of the next faster one (a slower level's checkpoint
is also taken at the faster levels), and the overhead is evaluated at the rounded
periods: ``sum_l C_l / T_l + lambda_l T_l / 2``.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence


def young_interval(cost: float, mtbf: float) -> float:
    """Young's first-order optimum: ``sqrt(2 * cost * mtbf)`` seconds."""
    _check_positive(cost=cost, mtbf=mtbf)
    return math.sqrt(2.0 * cost * mtbf)


def daly_interval(cost: float, mtbf: float) -> float:
    """Daly's higher-order optimum (compute time between checkpoints), seconds.

    ``sqrt(2CM) * (1 + sqrt(C/2M)/3 + (C/2M)/9) - C`` for ``C < 2M``, else ``M``.
    """
    _check_positive(cost=cost, mtbf=mtbf)
    if cost >= 2.0 * mtbf:
        return mtbf
    ratio = cost / (2.0 * mtbf)
    return math.sqrt(2.0 * cost * mtbf) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - cost


def first_order_waste(cost: float, mtbf: float, period: float) -> float:
    """Fraction of the run lost with checkpoints every ``period`` seconds:
    ``cost/period + period/(2*mtbf)`` (checkpoint time plus expected re-execution)."""
    _check_positive(cost=cost, mtbf=mtbf, period=period)
    return cost / period + period / (2.0 * mtbf)


@dataclass(frozen=True)
class LevelPlan:
    """One level's result: its cost, MTBF, its own optimum and its nested period."""
    name: str
    cost: float
    mtbf: float
    young: float          # sqrt(2 C M), seconds
    period: float         # after nesting (a whole multiple of the next faster level's)
    multiple: int         # period / faster level's period (1 for the fastest level)
    overhead: float       # C/T + T/(2M) at the nested period


def multilevel_plan(levels: Sequence[tuple]) -> List[LevelPlan]:
    """Plan ``[(name, cost_s, mtbf_s), ...]`` given fastest level first.

    Returns one :class:`LevelPlan` per level. A level whose period would be shorter than
    the faster level's is taken with every faster checkpoint (multiple 1).
    """
    plans: List[LevelPlan] = []
    previous: Optional[float] = None
    for name, cost, mtbf in levels:
        _check_positive(**{f"{name} cost": cost, f"{name} mtbf": mtbf})
        young = young_interval(cost, mtbf)
        if previous is None:
            multiple, period = 1, young
        else:
            multiple = max(1, round(young / previous))
            period = multiple * previous
        plans.append(LevelPlan(name, cost, mtbf, young, period, multiple,
                               first_order_waste(cost, mtbf, period)))
        previous = period
    return plans


def _check_positive(**values):
    for what, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
