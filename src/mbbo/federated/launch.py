"""``mbbo run --nproc R``: start R local processes (gloo on 127.0.0.1) that each run the same command.

Each process gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT = a free
port) and runs ``mbbo.cli.main`` on the command line without ``--nproc``; the method then builds its
``DistributedBackend`` (:func:`mbbo.federated.comm.make_backend`). Every collective runs under the process
group's timeout ($MBBO_DIST_TIMEOUT, default 120 s), and if one process dies the launcher stops the others and
reports which rank failed and why.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "launch", "strip_nproc"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _worker(rank: int, argv: list[str], world_size: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from mbbo.cli import main

    try:
        status = main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if status:
        sys.exit(status)


def launch(argv: Sequence[str], nproc: int) -> int:
    """Runs ``mbbo`` with ``argv`` in ``nproc`` spawned processes; returns the exit status (0 when all
    succeed). A failing rank is reported as ``mbbo: error: rank R ...`` and the others are stopped."""
    if nproc < 2:
        raise ValueError(f"nproc must be an integer >= 2 for a multi-process run, got {nproc!r}")
    args = strip_nproc(argv)
    try:
        mp.start_processes(_worker, args=(args, nproc, free_port()), nprocs=nproc, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as exc:
        how = (f"was killed by signal {exc.signal_name}" if exc.signal_name
               else f"exited with status {exc.exit_code}")
        print(f"mbbo: error: rank {exc.error_index} {how}; the other ranks were stopped", file=sys.stderr)
        return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"mbbo: error: rank {exc.error_index} failed: {last}; the other ranks were stopped",
              file=sys.stderr)
        return 1
    return 0
