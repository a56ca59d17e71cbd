"""How an example ends its MPI job after an exception, without losing the message.

``MPI_Abort`` tears the job down at once, and the launcher may drop what a rank wrote to
stderr just before. So a failed rank first writes its whole traceback in one write, then
waits up to ``AGREE_S`` seconds on a non-blocking barrier of a communicator reserved for
this. veloc raises its errors on every rank (one rank's failure is every rank's
``VelocError``), so usually every rank arrives: the job then ends normally with exit
code 1 (``MPI_Finalize`` runs at exit, everything written reaches the terminal). If
some rank never arrives (it failed alone, and the others wait in a collective of the
application), the job is aborted as before. Called by every rank that failed.
"""
import sys
import time
import traceback

AGREE_S = 5.0
_exit_comm = None


def prepare(comm):
    """Reserve the communicator the exit agreement uses; collective, call it at start-up."""
    global _exit_comm
    _exit_comm = comm.Dup()


def fail(comm, cleanup=None):
    """Report the exception being handled and end this rank (never returns); ``cleanup``
    runs before an abort only."""
    sys.stderr.write(traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    if comm.Get_size() > 1 and not _all_ranks_failed():
        if cleanup is not None:
            cleanup()
        comm.Abort(1)
    sys.exit(1)


def _all_ranks_failed():
    """True once every rank reached :func:`fail` (within ``AGREE_S`` seconds)."""
    if _exit_comm is None:
        return False
    request = _exit_comm.Ibarrier()
    deadline = time.monotonic() + AGREE_S
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
