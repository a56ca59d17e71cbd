"""``python -m veloc.cli``: the ``veloc`` command."""
import sys

from veloc.cli import main

sys.exit(main())
