"""veloc: multi-level checkpoint/restart for MPI simulations and DNN training.

The API reference is docs/API.md (and ``help()`` on each call). This module only re-exports.
"""
from veloc.api import Ckpt, init, init_single
from veloc.client import Client
from veloc.config import Config, load_config
from veloc.errors import (BackendError, CheckpointError, ConfigError, CorruptCheckpointError, RestartError,
                     VelocError)
from veloc.reader import open  # noqa: A001 (veloc.open; the builtin stays untouched in every other module)
from veloc.restart import RestartInfo
from veloc.training import RNGState

__all__ = ["init", "init_single", "Ckpt", "Client", "Config", "load_config", "RestartInfo", "VelocError",
           "ConfigError", "CheckpointError", "RestartError", "BackendError", "CorruptCheckpointError", "RNGState",
           "open"]
__version__ = "0.1.0"
