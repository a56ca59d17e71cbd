"""Random number generator states as Stateful objects, for ``protect_stateful``.

A restarted training run draws the same random numbers (dropout masks, shuffles, data
augmentation) as the uninterrupted one only if its generators are checkpointed too::

    ckpt.protect_stateful("rng", veloc.training.RNGState())

Each class has ``state_dict()``/``load_state_dict()``; array parts of a state (numpy's
Mersenne Twister key, torch's generator bytes) become raw regions, the rest is pickled.
Called on each application rank, for that rank's own generators.
"""
import random
import sys

import numpy as np


class PythonRNGState:
    """The state of ``random`` (module-level) or of a ``random.Random`` instance."""

    def __init__(self, rng=None):
        self.rng = rng if rng is not None else random

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": np.array(internal, dtype=np.uint64), "gauss": gauss}

    def load_state_dict(self, state):
        internal = tuple(int(x) for x in state["internal"])
        self.rng.setstate((state["version"], internal, state["gauss"]))


class NumpyRNGState:
    """The state of numpy's global generator (``np.random.*``) or of a ``np.random.Generator``
    / ``RandomState`` passed in."""

    def __init__(self, generator=None):
        self.generator = generator

    def state_dict(self):
        if self.generator is None:
            return {"legacy": np.random.get_state(legacy=False)}
        if isinstance(self.generator, np.random.RandomState):
            return {"legacy": self.generator.get_state(legacy=False)}
        return {"bit_generator": self.generator.bit_generator.state}

    def load_state_dict(self, state):
        if "legacy" in state:
            target = np.random if self.generator is None else self.generator
            target.set_state(state["legacy"])
        else:
            self.generator.bit_generator.state = state["bit_generator"]


class TorchRNGState:
    """torch's CPU generator and, when CUDA is initialised, every device's generator."""

    def state_dict(self):
        import torch
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state):
        import torch
        torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class RNGState:
    """Python's, numpy's and (when the application uses it) torch's generators together.

    ``torch=None`` includes torch's generators iff torch is already imported.
    """

    def __init__(self, torch=None, numpy=True, python=True):
        if torch is None:
            torch = "torch" in sys.modules
        self.parts = {}
        if python:
            self.parts["python"] = PythonRNGState()
        if numpy:
            self.parts["numpy"] = NumpyRNGState()
        if torch:
            self.parts["torch"] = TorchRNGState()

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
