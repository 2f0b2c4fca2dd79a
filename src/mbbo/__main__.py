"""`python -m mbbo ...` runs the command line (the same as the `mbbo` script)."""

import sys

from mbbo.cli import main

if __name__ == "__main__":
    sys.exit(main())
