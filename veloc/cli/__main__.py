"""``python -m veloc.cli``: the ``veloc`` command."""
import sys

from veloc.cli.main import main

sys.exit(main())
