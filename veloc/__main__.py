"""``python -m veloc``: the ``veloc`` command-line tool (see :mod:`veloc.cli.main`)."""
import sys

from veloc.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
