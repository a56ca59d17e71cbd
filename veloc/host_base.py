"""What the sync and async engine hosts share: the agreements every rank takes part in.

A host (:class:`veloc.sync_host.SyncHost` or :class:`veloc.async_host.AsyncHost`) is
built by the client on every application rank. The calls here are collective over the
client's communicator ``self.comm``: every rank calls them in the same order, so a
failure on one rank is learned by all of them instead of leaving the others waiting.
"""
from mpi4py import MPI


class HostAgreement:
    """Collective agreements over ``self.comm`` (set by the host)."""

    comm = None
    rank = 0
    background = False     # True where checkpoints go on after checkpoint() returns (async)

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
