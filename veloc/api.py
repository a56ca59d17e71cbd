"""Entry points: ``init`` (collective), ``init_single`` (one process), and ``Ckpt``.

Called by the application on every rank (``init``) or by one process (``init_single``,
``Ckpt``).
"""
import os
from typing import Any, Optional, Union

from veloc.client import Client
from veloc.config import Config
from veloc.errors import CheckpointError, ConfigError
from veloc.regions import restore_in_place


def init(cfg: Union[str, os.PathLike, dict, Config], comm: Optional[Any] = None) -> Client:
    """Collective over ``comm`` (default ``MPI.COMM_WORLD``): a :class:`Client` for this rank.

    ``cfg`` is an INI path, a mapping of the same keys, or a :class:`veloc.Config`. Every
    rank calls it. Raises ConfigError (bad configuration, unusable scratch: on every rank,
    naming the failing rank) or BackendError (async mode: no backend could be reached).
    """
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    return Client(cfg, comm)


def init_single(unique_id: int, cfg: Union[str, os.PathLike, dict, Config]) -> Client:
    """Non-collective: this process checkpoints and restarts on its own as rank ``unique_id``
    (an int >= 0, unique among the processes sharing the configuration). Raises ConfigError."""
    from mpi4py import MPI
    if isinstance(unique_id, bool) or not isinstance(unique_id, int) or unique_id < 0:
        raise ConfigError(f"init_single: unique_id must be an int >= 0, got {unique_id!r}")
    return Client(cfg, MPI.COMM_SELF, rank=unique_id, single=True)


class Ckpt:
    """Drop-in for VELOC's own Python binding.

    ``protected`` holds any picklable object (the user hands it over explicitly, so it is
    pickled and unpickled); ``restart_test`` returns VELOC's answer: the newest version
    ``<= version`` (``0`` = no bound), or a negative int when nothing exists.
    """

    def __init__(self, unique_id: int, cfg: Union[str, os.PathLike, dict, Config]) -> None:
        """Non-collective, like :func:`init_single`; ``protected`` starts as ``None``."""
        self._client = init_single(unique_id, cfg)
        self.protected = None

    def checkpoint(self, name: str, version: int) -> None:
        """Pickle ``protected`` as version ``version`` of ``name``. Raises CheckpointError."""
        if self.protected is None:
            raise CheckpointError("Ckpt.checkpoint: nothing to checkpoint; assign Ckpt.protected first")
        self._client.protect(0, self.protected, pickle=True)
        self._client.checkpoint(name, version)

    def restart_test(self, name: str, version: int = 0) -> int:
        """VELOC's answer: the newest version ``<= version`` (``0``: no bound), negative if none."""
        found = self._client.restart_test(name, None if not version else version)
        return -1 if found is None else found

    def restart(self, name: str, version: int) -> None:
        """Restore ``protected``: refilled in place when it is a dict, list, set, bytearray
        or object of the checkpointed type, else replaced by the restored object."""
        self._client.protect(0, None, pickle=True)     # None: the restored object comes back as is
        self._client.restart(name, version)
        restored = self._client.recovered.pop(0)
        try:
            if restore_in_place(self.protected, restored):
                return
        except TypeError:
            pass                                        # another type: VELOC replaces the attribute
        self.protected = restored

    def finalize(self, drain: bool = True) -> None:
        """Release the client (after draining background work by default)."""
        self._client.finalize(drain)

    def __del__(self):
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.finalize()
            except Exception:
                pass
