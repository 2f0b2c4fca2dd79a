"""`python -m mbbo ...` (and `torchrun --nproc-per-node R -m mbbo run ...`): the `mbbo` command line."""

import sys

from mbbo.cli import main
from mbbo.distributed import close_process_group

if __name__ == "__main__":
    status = 1
    try:
        status = main()
    finally:  # a multi-process run leaves its process group together (see `close_process_group`)
        close_process_group(synchronise=status == 0)
    sys.exit(status)
