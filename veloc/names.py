"""Validation of user-supplied names, used by every rank before anything touches a path.

Checkpoint names are ``[A-Za-z0-9_.]+`` and never start with a dot, so a name can never
be ``.``, ``..`` or a hidden file, and can never contain a path separator. Region ids
are ints or strings of the same alphabet. Routed file names (file-based mode) may also
contain ``-``.
"""
import re

from veloc.errors import CheckpointError, ConfigError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_NAME_LEN = 200


def check_name(name, what="checkpoint name", error=CheckpointError):
    """Return ``name`` if it is a valid checkpoint name, else raise ``error``."""
    if not isinstance(name, str):
        raise error(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if not name or len(name) > MAX_NAME_LEN or not _NAME.fullmatch(name):
        raise error(
            f"invalid {what} {name!r}: use 1-{MAX_NAME_LEN} characters from [A-Za-z0-9_.], "
            "not starting with '.'; names are never paths"
        )
    return name


def check_version(version, error=CheckpointError):
    """Return ``version`` as an int if it is a non-negative integer, else raise ``error``."""
    if isinstance(version, bool) or not hasattr(version, "__index__"):
        raise error(f"checkpoint version must be a non-negative int, got {version!r}")
    version = int(version.__index__())
    if version < 0:
        raise error(f"checkpoint version must be a non-negative int, got {version}")
    return version


def check_region_id(region_id):
    """Return a region id (int >= 0 or a valid name string) or raise ``CheckpointError``."""
    if isinstance(region_id, bool):
        raise CheckpointError(f"region id must be an int or str, got bool {region_id!r}")
    if isinstance(region_id, int):
        if region_id < 0:
            raise CheckpointError(f"region id must be >= 0, got {region_id}")
        return region_id
    if isinstance(region_id, str):
        return check_name(region_id, what="region id")
    raise CheckpointError(f"region id must be an int or str, got {type(region_id).__name__}")


def check_file_name(name):
    """Return the base name a routed file is stored under; reject anything path-like."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or not _FILE.fullmatch(name):
        raise CheckpointError(
            f"cannot route file name {name!r}: its base name must use [A-Za-z0-9_.-] "
            "and not start with '.' or '-'"
        )
    return name


def check_node_id(node):
    """Return a node identity usable in paths (``{node}``), or raise ``ConfigError``."""
    if not isinstance(node, str) or not _FILE.fullmatch(node or ""):
        raise ConfigError(
            f"node identity {node!r} (VELOC_NODE_ID or host name) must use [A-Za-z0-9_.-]"
        )
    return node
