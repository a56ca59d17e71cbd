"""Exception hierarchy of veloc.

Every error raised by the library derives from :class:`VelocError`; messages name the
offending key, path, rank or version and say what to do. Raised in whichever process
detects the problem (application rank, sync-mode leader, or the active backend, whose
errors reach the application through ``checkpoint_wait()``).
"""


class VelocError(Exception):
    """Base class of every veloc error."""


class ConfigError(VelocError, ValueError):
    """Bad configuration: unknown key, missing key, or a value outside the accepted set."""


class CheckpointError(VelocError):
    """A checkpoint could not be written or committed at some level."""


class RestartError(VelocError):
    """A checkpoint could not be found, verified or restored."""


class BackendError(VelocError):
    """The active backend is unreachable, died, hung, or reported a background failure."""


class CorruptCheckpointError(RestartError):
    """A checkpoint file failed its checksum, size or header validation."""
