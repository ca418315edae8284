"""``python -m difftrain``: the ``difftrain`` command line."""

import sys

from difftrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
