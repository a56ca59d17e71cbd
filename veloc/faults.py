"""Fault injection for the chaos suite: SIGKILL this process at a named pipeline point.

Called by application ranks (local write, manifest commit) and by the node's engine
(sync-mode leader rank or ``veloc-backend``: checksum, partner transfer, erasure
encode, flush, versioning) through one-line ``fault_point("<point>")`` hooks.

``VELOC_FAULT=<point>[:<nth>][:<where>]`` arms one point: the ``nth`` (default 1)
time this process passes it, the process kills itself with SIGKILL, as a crash would.
``<where>`` limits it to one node (``VELOC_NODE_ID``, e.g. ``n1``) or one MPI rank (a
number, compared with the launcher's ``PMI_RANK`` / ``OMPI_COMM_WORLD_RANK``). The
variable is read once at import; unset, :func:`fault_point` is a no-op function.
"""
import os
import signal

from veloc.errors import ConfigError

POINTS = ("local_write", "manifest_commit", "checksum", "partner_transfer", "erasure_encode",
          "flush", "versioning")


def parse_spec(text):
    """``(point, nth, where or None)`` from a ``VELOC_FAULT`` value; ConfigError if malformed."""
    parts = text.strip().split(":")
    if not parts[0] or parts[0] not in POINTS or len(parts) > 3:
        raise ConfigError(f"VELOC_FAULT={text!r}: expected <point>[:<nth>][:<node or rank>] "
                         f"with point one of {', '.join(POINTS)}")
    nth = 1
    if len(parts) > 1 and parts[1]:
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise ConfigError(f"VELOC_FAULT={text!r}: <nth> must be an integer >= 1")
        nth = int(parts[1])
    where = parts[2] if len(parts) > 2 and parts[2] else None
    return parts[0], nth, where


def _this_process_matches(where):
    if where is None:
        return True
    if where.isdigit():
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        return rank == where
    return os.environ.get("VELOC_NODE_ID") == where


def _armed(point, nth):
    seen = 0

    def fault_point(name: str) -> None:
        """Kill this process with SIGKILL on the armed pass of point ``name``."""
        nonlocal seen
        if name != point:
            return
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return fault_point


def _disarmed(name: str) -> None:
    """No fault injection configured (``VELOC_FAULT`` unset): does nothing."""


_SPEC = os.environ.get("VELOC_FAULT")
if _SPEC:
    _point, _nth, _where = parse_spec(_SPEC)
    fault_point = _armed(_point, _nth) if _this_process_matches(_where) else _disarmed
else:
    fault_point = _disarmed
