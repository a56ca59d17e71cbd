"""``python -m veloc``: the ``veloc`` command-line tool (see :mod:`veloc.cli.commands`)."""
import sys

from veloc.cli import main

if __name__ == "__main__":
    sys.exit(main())
