"""Log files of the node engines: the async backend's, and the sync-mode engine's.

Both hosts of the engine log the same lines (each module's time per version, failures,
garbage collection) through :func:`file_handler`: ``veloc-backend`` for its whole
process (``veloc_backend.main``), the sync-mode node leader rank only for its engine's
logger, and only when ``log_prefix`` is configured (:func:`sync_engine_logger`).
Files are created ``0600`` in ``log_prefix`` (``{node}``/``{rank}`` filled in).
"""
import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [{node} pid %(process)d %(threadName)s] %(name)s: %(message)s"
_sync_loggers = {}       # log file -> logger of the sync engine writing to it


def log_folder(config, node):
    """The folder named by ``log_prefix`` for ``node`` (``{rank}`` = 0), or ``None``."""
    if not config.log_prefix:
        return None
    return Path(config.log_prefix.replace("{node}", node).replace("{rank}", "0"))


def file_handler(log_file, node):
    """A handler appending to ``log_file`` (created ``0600``, its folder ``0700``) with
    timestamps, pid, thread and node on every line."""
    log_file = Path(log_file)
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(FORMAT.replace("{node}", node)))
    return handler


class _ToParent(logging.Handler):
    """Hands warnings and errors of a non-propagating logger on to the ``veloc`` logger,
    so the application sees them as before; INFO lines stay in the log file."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record):
        logging.getLogger("veloc").handle(record)


def sync_engine_logger(config, node, fallback):
    """The logger of a sync-mode engine (node leader rank): with ``log_prefix`` one that
    writes INFO and above to ``<log_prefix>/veloc-sync-<node>.log``; else ``fallback``."""
    folder = log_folder(config, node)
    if folder is None:
        return fallback
    path = (folder / f"veloc-sync-{node}.log").resolve()
    logger = _sync_loggers.get(path)
    if logger is None:
        logger = logging.getLogger(f"veloc.sync_engine.{len(_sync_loggers)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(file_handler(path, node))
        logger.addHandler(_ToParent())
        _sync_loggers[path] = logger
    return logger
