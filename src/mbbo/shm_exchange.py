"""The per-iteration gather of block-sharded CPU ranks on one machine, through shared memory.

Gloo's all_gather over TCP loopback costs about 1 ms per iteration on this project's 2-core machine, a large part
of an iteration at small block batches. Two unsharded runs at B / 2 that meet through gloo after every iteration
were 1.32-1.46 times as fast as one run at B, and 1.57-1.71 times when they met through shared memory
(`benchmarks/bench_distributed.py`, the "lock-step" configurations; docs/results_distributed.md). Ranks on one
machine therefore exchange the gather's bytes through one shared file
(`SharedMemoryExchange`): every rank writes its buffer into its own slot, publishes a counter, and reads the other
ranks' slots once their counters have reached the same gather. No system call, no communication thread, and
nothing to copy but the slots themselves; set-up, bookkeeping collectives and multi-machine runs stay on the
process group's backend.

The exchange is chosen by `$MBBO_DIST_TRANSPORT` (`transport`): "auto" (the default) uses shared memory when every
rank runs on this machine, the backend is gloo and the processor keeps stores in order (x86-64: a counter that a
rank stores after its slot's bytes is never seen before them); "backend" always uses the process group's
collective; "shm" requires shared memory and fails at start-up where it cannot be used.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["TRANSPORTS", "SharedMemoryExchange", "SharedMemoryUnavailable", "shared_memory_usable", "transport"]

TRANSPORTS = ("auto", "backend", "shm")


class SharedMemoryUnavailable(RuntimeError):
    """Some rank cannot map the file rank 0 created (raised on every rank alike)."""


_LINE = 64  # bytes per rank's counter: one cache line each, so that no two ranks write the same line
_ORDERED_STORES = {"x86_64", "amd64", "i386", "i686", "x86"}


def transport() -> str:
    """How block-sharded ranks gather: $MBBO_DIST_TRANSPORT, "auto" (default), "backend" or "shm"."""
    value = os.environ.get("MBBO_DIST_TRANSPORT", "auto")
    if value not in TRANSPORTS:
        raise ValueError(f"MBBO_DIST_TRANSPORT must be one of {TRANSPORTS}, got {value!r}")
    return value


def shared_memory_usable() -> str | None:
    """Why this process group cannot gather through shared memory (None when it can): a collective (all ranks
    compare their host names), so every rank reaches the same answer. Ranks that agree on a host name may still not
    share /dev/shm (containers): `SharedMemoryExchange` checks that every rank sees the file rank 0 wrote."""
    if dist.get_backend() != "gloo":  # the same on every rank: no collective needed
        return f"the process group's backend is {dist.get_backend()}, not gloo (CPU tensors)"
    hosts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) > 1:
        return f"the ranks run on {len(set(hosts))} machines ({', '.join(sorted(map(str, set(hosts))))})"
    if platform.machine().lower() not in _ORDERED_STORES:
        return (f"this processor ({platform.machine()}) may reorder stores, and the exchange's counters rely on "
                "x86-64's store order")
    return None


class SharedMemoryExchange:
    """All ranks of the default process group (one machine) exchange byte buffers through one shared file.

    Layout: a random token (rank 0 writes it, every rank checks it), one counter per rank (int64, one cache line
    each), then two sets (by the parity of the exchange) of R slots of `capacity` bytes. Exchange k: rank r writes
    its bytes into slot (k mod 2, r) (`send_buffer`), stores k + 1 in its counter and waits until every counter has
    reached k + 1 (`exchange`); it then reads all slots of set k mod 2. A rank overwrites a slot of that set only at
    exchange k + 2, after every rank has published exchange k + 1, i.e. after every rank has read exchange k: the
    caller copies what it needs out of the slots before its next exchange. A larger buffer than `capacity`
    re-creates the file, twice as large, in a collective that every rank enters at the same exchange (all ranks ask for
    the same size).

    The file lives in /dev/shm when there is one; rank 0 deletes its name once every rank has mapped it, so that
    nothing is left behind when a process dies. A rank waits by polling the counters and yielding its core; it
    fails with `DistributedError` when a rank it waits for has exited (checked every 0.2 s, for the ranks whose
    process this one can see: not across PID namespaces) or after `timeout_s`.
    """

    def __init__(self, timeout_s: float, capacity: int = 1 << 16) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout_s = timeout_s
        pids: list[object] = [None] * self.world_size
        dist.all_gather_object(pids, os.getpid())
        # the ranks whose processes this one sees (None: another PID namespace, left to the timeout)
        self.pids = [int(str(p)) if _alive(int(str(p))) else None for p in pids]
        self.exchanges = 0
        self._map(capacity)

    def _map(self, capacity: int) -> None:
        """Creates (rank 0) and maps (every rank) a new file of `capacity` bytes per slot; a collective.

        Raises:
            SharedMemoryUnavailable: on every rank, when some rank could not map the file or did not find the
                token rank 0 wrote into it (e.g. ranks in containers with private /dev/shm).
        """
        capacity = -(-capacity // _LINE) * _LINE
        header = _LINE * (self.world_size + 1)  # the token's line, then one counter line per rank
        size = header + 2 * self.world_size * capacity
        name: list[object] = [None, None]
        if self.rank == 0:
            directory = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
            token = uuid.uuid4().bytes
            path = Path(directory) / f"mbbo-gather-{os.getpid()}-{token.hex()}"
            with open(path, "wb") as handle:
                handle.write(token)
                handle.truncate(size)
            name = [str(path), token]
        dist.broadcast_object_list(name, src=0)
        path, token = str(name[0]), bytes(name[1])  # type: ignore[arg-type]
        data: Tensor | None = None
        try:
            data = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            if bytes(data[: len(token)].tolist()) != token:
                data = None
        except (RuntimeError, OSError):
            data = None
        mapped = torch.tensor([int(data is not None)])
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN)  # also the barrier after which the name is not needed
        if self.rank == 0:
            os.unlink(path)
        if data is None or not int(mapped):
            raise SharedMemoryUnavailable(f"not every rank could map the shared file {path} that rank 0 created "
                                          "(ranks in containers with a private /dev/shm?)")
        self.capacity = capacity
        self._data = data
        # a numpy view: reading the counters in the wait loop skips the tensor dispatcher
        self._counters = data[_LINE:header].view(torch.int64).numpy()[:: _LINE // 8]
        self._slots = data[header:].view(2, self.world_size, capacity)
        self.exchanges = 0

    def send_buffer(self, nbytes: int) -> Tensor:
        """This rank's slot for the next exchange: `nbytes` uint8, to be filled before `exchange` (a collective
        when `nbytes` exceeds the capacity: every rank asks for the same size)."""
        if nbytes > self.capacity:
            self._map(max(nbytes, 2 * self.capacity))
        return self._slots[self.exchanges % 2, self.rank, :nbytes]

    def exchange(self, nbytes: int) -> Tensor:
        """Publishes this rank's slot (filled through `send_buffer`) and waits for the others: every rank's
        `nbytes`, (R, nbytes) uint8, valid until this rank's exchange after the next."""
        parity = self.exchanges % 2
        self.exchanges += 1
        self._counters[self.rank] = self.exchanges
        self._wait(self.exchanges)
        return self._slots[parity, :, :nbytes]

    def _wait(self, target: int) -> None:
        counters = self._counters
        if bool((counters >= target).all()):
            return
        start = check = time.monotonic()
        while not bool((counters >= target).all()):
            os.sched_yield()
            now = time.monotonic()
            if now - check < 0.2:
                continue
            check = now
            late = [q for q in range(self.world_size) if counters[q] < target]
            dead = [q for q in late if (pid := self.pids[q]) is not None and not _alive(pid)]
            from mbbo.distributed import DistributedError

            if dead:
                raise DistributedError(f"rank {self.rank}: rank(s) {dead} exited before gather {target} of the "
                                       "shared-memory exchange")
            if now - start > self.timeout_s:
                raise DistributedError(f"rank {self.rank}: rank(s) {late} did not reach gather {target} of the "
                                       f"shared-memory exchange within {self.timeout_s:g} s ($MBBO_DIST_TIMEOUT)")


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists and, where /proc tells, has not exited unreaped (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")  # the state follows the command name's ")"

