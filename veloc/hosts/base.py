"""The host interface: how a client reaches its node's engine, and the agreements every
rank takes part in.

A host (:class:`veloc.hosts.sync_host.SyncHost` runs the engine inside the application,
:class:`veloc.hosts.async_host.AsyncHost` talks to the node's backend) is built by the client
on every application rank and implements every abstract method of :class:`Host`. The
agreements (``all_true``, ``first_failure``) are collective over the client's
communicator ``self.comm``: every rank calls them in the same order, so a failure on
one rank is learned by all of them instead of leaving the others waiting.
"""
from abc import ABC, abstractmethod

from mpi4py import MPI


class Host(ABC):
    """What the client calls on its host (every application rank), and the agreements."""

    comm = None
    rank = 0
    background = False     # True where checkpoints go on after checkpoint() returns (async)

    # -- the engine, as the client sees it --------------------------------------------
    @abstractmethod
    def checkpoint(self, name, version):
        """Collective (sync) / local (async): run the pipeline on the version every rank
        committed to scratch; sync returns when every level is done, async once queued."""

    @abstractmethod
    def discard(self, name, version):
        """Remove this rank's (sync: the node's) copies of a version that failed somewhere."""

    @abstractmethod
    def supersede(self, name, threshold):
        """Collective: remove copies of ``name`` at versions ``>= threshold`` left by an
        earlier run; ``{level: [versions]}`` removed on this rank's node."""

    @abstractmethod
    def available(self, name, max_version):
        """This rank's ``{version: [levels]}`` (from manifests; cheap)."""

    @abstractmethod
    def verify(self, name, version):
        """This rank's ``(fastest intact level or None, reasons)``."""

    @abstractmethod
    def restore(self, name, version, level):
        """Bring this rank's copy to scratch from ``level`` (``None``: nothing to bring)."""

    @abstractmethod
    def drain(self, keep=0):
        """Wait for this rank's background checkpoints but the newest ``keep``."""

    def finished(self):
        """Whether this rank's background checkpoints are done; local, never blocks."""
        return True

    @abstractmethod
    def close(self, collective=True):
        """Release the host (``collective=False``: free no communicator)."""

    # -- agreements ----------------------------------------------------------------------
    def all_true(self, flag):
        """Collective: whether ``flag`` is true on every rank."""
        return self.comm.allreduce(bool(flag), op=MPI.LAND)

    def first_failure(self, message):
        """Collective: ``None`` if no rank passes a message, else ``(rank, message)`` of the
        lowest failing rank (its own words, which name its node, path and cause).

        Two small collectives when something failed, one when nothing did: the count and
        size of what crosses the network do not grow with the number of ranks.
        """
        size = self.comm.Get_size()
        me = self.comm.Get_rank()
        first = self.comm.allreduce(me if message else size, op=MPI.MIN)
        if first == size:
            return None
        rank, text = self.comm.bcast((self.rank, str(message)) if me == first else None, root=first)
        return rank, text


HostAgreement = Host
"""The name the hosts' base class had before it was the whole interface."""
