"""The ``veloc`` command-line tool: ``main`` (verbs and dispatch), ``levels`` (every level
as the tool sees it), ``inspect`` (rank files), ``plan`` (``veloc plan``)."""
from veloc.cli.main import main

__all__ = ["main"]
