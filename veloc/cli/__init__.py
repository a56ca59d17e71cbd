"""The ``veloc`` command-line tool: ``commands`` (verbs and dispatch), ``levels`` (every
level as the tool and ``veloc.open`` see it), ``inspect`` (rank files), ``plan``
(``veloc plan``), ``export`` (``veloc export``)."""


def main(argv=None):
    """The ``veloc`` command (console script); returns the exit status."""
    from veloc.cli.commands import main as run
    return run(argv)


__all__ = ["main"]
