"""`python -m mbbo ...` (and `torchrun --nproc-per-node R -m mbbo run ...`): the `mbbo` command line."""

import sys

from mbbo.cli import main

if __name__ == "__main__":
    sys.exit(main())
