"""`python -m mbbo ...` (and `torchrun --nproc-per-node R -m mbbo run ...`): the `mbbo` command line."""

import sys

from mbbo.distributed import run_cli

if __name__ == "__main__":
    sys.exit(run_cli())  # a multi-process run leaves its process group together (`close_process_group`)
