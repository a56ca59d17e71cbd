"""Training-loop support: two-phase snapshots, Stateful objects, RNG states, the interval policy.

Re-exports only; torch is never imported here.
"""
from veloc.training.rng import NumpyRNGState, PythonRNGState, RNGState, TorchRNGState
from veloc.training.stateful import StatefulRegion

__all__ = ["RNGState", "NumpyRNGState", "PythonRNGState", "TorchRNGState", "StatefulRegion"]
