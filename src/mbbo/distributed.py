"""Multi-process runs on ``torch.distributed``: start-up, launch, and the block sharding of multi-block methods.

Start-up and launch (shared by the federated methods and the block-sharded runs):

- :func:`init_from_env` joins the process group from torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT): gloo on CPU, NCCL when the run's device is a GPU. Every collective runs under the group's
  timeout ($MBBO_DIST_TIMEOUT, default 120 s), so a dead rank makes the others fail instead of hanging; an
  unreachable rendezvous fails within the same timeout with a message naming the address.
- :func:`launch` (``mbbo run --nproc R``) spawns R local processes (127.0.0.1, a free port) that each run the
  same command line without ``--nproc``; if one process fails the others are stopped and the failing rank is
  named.

Block sharding (specs/distributed.md, section 1): :class:`BlockShard`. Rank r of R owns the blocks
{i : i mod R = r}; its per-block tables hold only those rows (local row of block i: i // R), so memory per rank
is about m d / R. Every rank draws the same global block sample and the same global row sample (all ranks run
the same random streams), keeps the blocks it owns, and the per-block results meet in one collective,
:meth:`BlockShard.gather` (through shared memory for CPU ranks on one machine, :mod:`mbbo.shm_exchange`; else the
group's all_gather), which puts them back in the order of the global sample: the reduction that follows
(a mean over blocks, an ``index_add``) then runs on exactly the tensors the 1-process run has, so R processes
reproduce the 1-process trajectory bit for bit. With R = 1 every method is the identity and nothing is
communicated.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from mbbo.shm_exchange import SharedMemoryExchange, SharedMemoryUnavailable, shared_memory_usable, transport

__all__ = ["DEFAULT_TIMEOUT_S", "WAIT_MODES", "BlockShard", "DistributedError", "RankGroup", "close_process_group",
           "finish", "free_port",
           "init_from_env", "launch", "process_group_size", "run_cli", "strip_nproc", "timeout_seconds", "wait_mode",
           "world_from_env"]

DEFAULT_TIMEOUT_S = 120.0


class DistributedError(RuntimeError):
    """A multi-process run could not start (rendezvous) or lost a process (a collective failed or timed out)."""


# ---------------------------------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------------------------------


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun-style variables ((0, 1) for a single process)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collectives' timeout: `timeout_s`, else $MBBO_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    value = timeout_s if timeout_s is not None else os.environ.get("MBBO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"MBBO_DIST_TIMEOUT must be a number of seconds > 0, got {value!r}")
    return seconds


def init_from_env(timeout_s: float | None = None, device: str = "cpu") -> bool:
    """Join the process group from torchrun-style variables when WORLD_SIZE > 1 (gloo; NCCL for a CUDA
    `device`); return whether a process group is in use. `timeout_s` (default $MBBO_DIST_TIMEOUT or 120 s)
    bounds the rendezvous and every collective.

    Raises:
        DistributedError: the rendezvous at MASTER_ADDR:MASTER_PORT was not reached within the timeout.
    """
    rank, world = world_from_env()
    if world <= 1:
        return dist.is_initialized()
    wait_mode()  # a wrong $MBBO_DIST_WAIT or $MBBO_DIST_TRANSPORT fails at start-up, not at the first gather
    transport()
    if not dist.is_initialized():
        seconds = timeout_seconds(timeout_s)
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        if backend == "nccl":  # one GPU per local process
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
        except (RuntimeError, ValueError, OSError) as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {rank} of {world} could not join the process group at {address} within {seconds:g} s "
                f"({first}); check that rank 0 runs, that MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint) "
                "are reachable from this machine, and the firewall; $MBBO_DIST_TIMEOUT sets the timeout"
            ) from exc
    return True


WAIT_MODES = ("poll", "block")


def wait_mode() -> str:
    """How a rank waits for the per-iteration gather: $MBBO_DIST_WAIT, "poll" (default) or "block"."""
    mode = os.environ.get("MBBO_DIST_WAIT", "poll")
    if mode not in WAIT_MODES:
        raise ValueError(f"MBBO_DIST_WAIT must be one of {WAIT_MODES}, got {mode!r}")
    return mode


def finish(work: dist.Work, backend: str | None = None) -> None:
    """Wait for an asynchronous collective of the default group (`backend`: its backend, by default asked of the
    group). Under gloo and the "poll" `wait_mode`, `work.is_completed()` is checked in a loop that yields the core
    (`os.sched_yield`) until the collective completes or the group's timeout passes; then `wait` (which raises a
    failure or the timeout). A rank that blocks at once lets its core go idle, and on a virtual machine waking it
    again costs more than the collective itself (`benchmarks/bench_distributed.py` measures both waits). "block"
    waits at once: fewer cycles when ranks share their cores with other work. NCCL's work is waited for at once."""
    if wait_mode() == "poll" and (backend or dist.get_backend()) == "gloo":
        deadline = time.monotonic() + timeout_seconds()
        while not work.is_completed() and time.monotonic() < deadline:
            os.sched_yield()
    work.wait()


def process_group_size() -> int:
    """The world size of the initialised default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class RankGroup:
    """What the runner needs of a multi-process run (the initialised default group): this process's rank, the
    world size, a barrier and a broadcast of a picklable object from rank 0 (both under the group's timeout)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("RankGroup needs an initialised process group (see init_from_env)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        dist.barrier()

    def max_signal(self, signum: int | None) -> int | None:
        """The largest signal number any rank holds (None when none does): one all_reduce."""
        flag = torch.tensor([signum or 0], dtype=torch.long, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def broadcast(self, value: object) -> object:
        """Rank 0's `value`, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------------------------------
# launch: mbbo run --nproc R
# ---------------------------------------------------------------------------------------------------------


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
    status = run_cli(argv)
    if status:
        sys.exit(status)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """`mbbo.cli.main(argv)`, then `close_process_group` (after a barrier when it returned 0, at once when it failed
    or raised): how a spawned rank and ``python -m mbbo`` (torchrun) run the command line. Returns its status."""
    from mbbo.cli import main

    status = 1
    try:
        status = main(argv)
    finally:
        close_process_group(synchronise=status == 0)
    return status


def close_process_group(synchronise: bool = True) -> None:
    """Destroys the default process group, if any; `synchronise` (a rank that succeeded): after a barrier, so that
    no rank tears its gloo connections down while another still has work in flight on them (seen as a rank
    aborting with "terminate called without an active exception"). A failed rank skips the barrier: the others
    may never reach it."""
    if not dist.is_initialized():
        return
    if synchronise:
        dist.barrier()
    dist.destroy_process_group()


def launch(argv: Sequence[str], nproc: int) -> int:
    """Runs ``mbbo`` with ``argv`` in ``nproc`` spawned processes; returns the exit status (0 when all
    succeed). A failing rank is reported as ``mbbo: error: rank R ...`` and the others are stopped.

    Signals: SIGTERM to this launcher is forwarded to every rank, which then write a checkpoint set at the same
    iteration and exit with 128 + 15 (`mbbo.runner`); Ctrl-C in a terminal reaches every rank itself, so the
    launcher ignores SIGINT and waits for them.
    """
    if nproc < 2:
        raise ValueError(f"nproc must be an integer >= 2 for a multi-process run, got {nproc!r}")
    args = strip_nproc(argv)
    context = mp.start_processes(_worker, args=(args, nproc, free_port()), nprocs=nproc, join=False,
                                 start_method="spawn")
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if signum == signal.SIGTERM:
            for process in context.processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join(timeout=1):
            pass
    except mp.ProcessExitedException as exc:
        if received and exc.exit_code == 128 + received[0]:  # the ranks stopped on the signal, as asked
            return exc.exit_code
        how = (f"was killed by signal {exc.signal_name}" if exc.signal_name
               else f"exited with status {exc.exit_code}")
        print(f"mbbo: error: rank {exc.error_index} {how}; the other ranks were stopped", file=sys.stderr)
        return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"mbbo: error: rank {exc.error_index} failed: {last}; the other ranks were stopped",
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# ---------------------------------------------------------------------------------------------------------
# block sharding
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the blocks of one global sample go (`BlockShard.place`): `mine`, the positions in the sample of the
    blocks this rank owns, in their order (an index tensor: selecting with it needs no mask-to-index pass), `ids`
    their block ids and `local` their table rows on this rank; `counts[q]`, how many rank q owns; `slot[k]`, the
    row of block k among the gathered rows (R parts of max(counts) rows, rank q's blocks in their order of the
    sample at rows q max(counts), ...)."""

    mine: Tensor
    ids: Tensor
    local: Tensor
    counts: list[int]
    slot: Tensor


class BlockShard:
    """The blocks rank `rank` of `world_size` owns, {i : i mod R = rank}, and the collective that brings the
    ranks' per-block results together in the global order (see the module docstring).

    Global block ids index the problem (block data, samplers, losses); local rows (i // R) index the rank's
    tables. With `world_size = 1` (the default) local rows are the block ids and nothing is communicated.
    """

    def __init__(self, num_blocks: int, rank: int = 0, world_size: int = 1,
                 exchange: SharedMemoryExchange | None = None) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}")
        if world_size > num_blocks:
            raise ValueError(f"{world_size} processes cannot share m = {num_blocks} blocks (each process owns "
                             f"blocks i with i mod R = rank): use at most {num_blocks} processes")
        self.num_blocks = num_blocks
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent = 0  # bytes this rank contributed to gathers (its padded buffer, once per gather)
        self.collectives = 0
        self.gather_seconds = 0.0  # wall time spent in `gather` (packing, the collective, reordering)
        # when a list: each gather appends its (start, launched, completed, end) `time.perf_counter` stamps, which
        # compare across the processes of one machine (benchmarks/bench_distributed_timeline.py)
        self.trace: list[tuple[float, float, float, float]] | None = None
        self._launched = self._completed = 0.0  # stamps of the last gather's collective
        self._placed: tuple[Tensor, Placement] | None = None  # the last sample's placement (`place`)
        self.exchange = exchange  # ranks on one machine gather through shared memory (`mbbo.shm_exchange`)

    @classmethod
    def from_process_group(cls, num_blocks: int) -> BlockShard:
        """The shard of this process in the initialised default group (a single shard without one); a collective.
        Its gathers go through shared memory when `mbbo.shm_exchange.transport` allows it (ranks on one machine,
        gloo, x86-64; $MBBO_DIST_TRANSPORT), else through the group's all_gather.

        Raises:
            DistributedError: $MBBO_DIST_TRANSPORT=shm where shared memory cannot be used (the reason named).
        """
        if process_group_size() <= 1:
            return cls(num_blocks)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world > num_blocks:  # before the collectives below, on every rank alike
            return cls(num_blocks, rank, world)
        how = transport()
        exchange = None
        if how != "backend":
            why_not = shared_memory_usable()
            if why_not is not None and how == "shm":
                raise DistributedError(f"MBBO_DIST_TRANSPORT=shm, but the ranks cannot gather through shared "
                                       f"memory: {why_not}; use MBBO_DIST_TRANSPORT=auto or backend")
            if why_not is None:
                try:
                    exchange = SharedMemoryExchange(timeout_seconds())
                except SharedMemoryUnavailable as exc:  # on every rank alike
                    if how == "shm":
                        raise DistributedError(f"MBBO_DIST_TRANSPORT=shm, but {exc}") from exc
        return cls(num_blocks, rank, world, exchange)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_local(self) -> int:
        """Blocks (table rows) this rank owns."""
        return len(range(self.rank, self.num_blocks, self.world_size))

    def owners(self, blocks: Tensor) -> Tensor:
        """The rank owning each block."""
        return blocks % self.world_size

    def place(self, blocks: Tensor) -> Placement:
        """Where each block of a global sample goes (`Placement`), computed once per sample: the result for the
        last `blocks` tensor is kept, so the sampling, which asks first, pays for it, and the gather of the same
        iteration reuses it. Computed on the host with numpy (B integers; the collective needs the counts there
        anyway): a few microseconds, where the same dozen torch calls cost 0.2 ms per iteration."""
        if self._placed is not None and self._placed[0] is blocks:
            return self._placed[1]
        ids = blocks.detach().cpu().numpy()
        owners = ids % self.world_size
        counts = np.bincount(owners, minlength=self.world_size)
        starts = np.cumsum(counts) - counts
        nmax = int(counts.max())
        # the stable sort lists rank 0's blocks first, each rank's in the order of the sample: order[starts[q] + j]
        # is the j-th block of rank q, which arrives at row q nmax + j of the gathered rows
        order = np.argsort(owners, kind="stable")
        slot = np.empty_like(order)
        slot[order] = np.arange(ids.shape[0]) + np.repeat(np.arange(self.world_size) * nmax - starts, counts)
        mine = order[starts[self.rank]: starts[self.rank] + counts[self.rank]]
        mine_ids = ids[mine]

        def tensor(values: np.ndarray) -> Tensor:
            return torch.from_numpy(values).to(device=blocks.device, dtype=torch.long)

        placement = Placement(tensor(mine), tensor(mine_ids), tensor(mine_ids // self.world_size),
                              counts.tolist(), tensor(slot))
        self._placed = (blocks, placement)  # `blocks` held: no other tensor can take its identity
        return placement

    def owned(self, blocks: Tensor) -> Tensor | None:
        """Positions in `blocks` of the blocks this rank owns, in their order (an index tensor; None with one
        process: all of them)."""
        return None if not self.distributed else self.place(blocks).mine

    def local(self, blocks: Tensor) -> Tensor:
        """Local rows of the blocks this rank owns among `blocks`, in their order (`blocks` itself for R = 1)."""
        if not self.distributed:
            return blocks
        return self.place(blocks).local

    def rows(self, blocks: Tensor) -> Tensor:
        """Local rows of `blocks`, which this rank must own (ValueError otherwise)."""
        if not self.distributed:
            return blocks
        if bool((self.owners(blocks) != self.rank).any()):
            raise ValueError(f"rank {self.rank} does not own all of the blocks asked for; it owns the blocks i "
                             f"with i mod {self.world_size} = {self.rank}")
        return blocks // self.world_size

    def global_ids(self, rows: Tensor) -> Tensor:
        """The block ids of local rows (`rows` itself for R = 1)."""
        if not self.distributed:
            return rows
        if self._placed is not None and rows is self._placed[1].local:  # the rows of the last sample (`local`)
            return self._placed[1].ids
        return rows * self.world_size + self.rank

    def table(self, values: Tensor) -> Tensor:
        """This rank's rows of a table of all m blocks (leading dimension m): `values` itself for R = 1, else a
        contiguous copy of rows rank, rank + R, ..."""
        if values.shape[0] != self.num_blocks:
            raise ValueError(f"a table of all blocks has leading dimension m = {self.num_blocks}, got "
                             f"{tuple(values.shape)}")
        return values[self.rank::self.world_size].clone() if self.distributed else values

    # --- the collective ----------------------------------------------------------------------------------
    def gather(self, parts: Sequence[tuple[Tensor, int]], blocks: Tensor, *, uniform: bool = True
               ) -> list[Tensor]:
        """Each part `(tensor, dim)` holds, along `dim`, this rank's rows for the blocks it owns in `blocks`
        (the global sample, in order); returns every part with the rows of all blocks in the order of
        `blocks`, identical on every rank. One `all_gather` of one byte buffer for all parts (any dtypes), waited
        for by `finish`.

        `uniform=False` allows the other dimensions to differ across ranks (e.g. a number of live slots):
        the sizes are exchanged first (a second, small collective) and shorter parts are zero-padded at the
        end of their last dimension.
        """
        if not self.distributed:
            return [t for t, _ in parts]
        start = time.perf_counter()
        try:
            out = self._gather(parts, blocks, uniform)
        finally:
            end = time.perf_counter()
            self.gather_seconds += end - start
        if self.trace is not None:
            self.trace.append((start, self._launched, self._completed, end))
        return out

    def _gather(self, parts: Sequence[tuple[Tensor, int]], blocks: Tensor, uniform: bool) -> list[Tensor]:
        placement = self.place(blocks)
        counts = placement.counts
        nmax = max(counts)
        mine = [t.movedim(d, 0) for t, d in parts]
        for t in mine:
            if t.shape[0] != counts[self.rank]:
                raise ValueError(f"rank {self.rank} gives {t.shape[0]} rows, but owns {counts[self.rank]} of the "
                                 f"{blocks.shape[0]} blocks")
        tails = [tuple(t.shape[1:]) for t in mine]
        all_tails = [tails] * self.world_size if uniform else self._exchange_shapes(tails)
        device = mine[0].device if mine else blocks.device
        # byte layout of each rank's buffer: its parts padded to nmax rows, each part aligned to 8 bytes (so
        # that the bytes can be viewed as any dtype in place); every rank's buffer has the largest total
        layouts = [_layout([(nmax, *tail) for tail in rank_tails], [t.dtype for t in mine]) for rank_tails in all_tails]
        total = max(end for *_, end in layouts)
        exchange = self.exchange if device.type == "cpu" else None  # shared memory holds CPU bytes
        if exchange is not None:  # this rank's shared-memory slot
            buffer = exchange.send_buffer(total).zero_()
        else:
            buffer = torch.zeros(total, dtype=torch.uint8, device=device)  # zero padding rows and alignment gaps
        offsets = layouts[self.rank]
        for t, tail, start in zip(mine, tails, offsets, strict=False):
            _typed(buffer, start, t.dtype, (nmax, *tail))[: t.shape[0]].copy_(t)
        self._launched = time.perf_counter()
        if exchange is not None:
            received = exchange.exchange(total)  # read below into new tensors, before the next gather
        else:
            received = torch.empty((self.world_size, total), dtype=torch.uint8, device=device)
            finish(dist.all_gather_single(received.view(-1), buffer, async_op=True))
        self._completed = time.perf_counter()
        self.collectives += 1
        self.bytes_sent += total
        slot = placement.slot.to(device)
        out = []
        for k, (t, d) in enumerate(parts):
            # every rank's rows of part k, (R, nmax, *tail), zero-padded to the largest tail (uniform: no padding)
            tail = tuple(max(all_tails[q][k][j] for q in range(self.world_size)) for j in range(len(tails[k])))
            if uniform:
                typed = _typed(received, offsets[k], t.dtype, (self.world_size, nmax, *tail))
            else:
                typed = torch.zeros((self.world_size, nmax, *tail), dtype=t.dtype, device=device)
                for q in range(self.world_size):
                    shape = all_tails[q][k]
                    rows = _typed(received[q], layouts[q][k], t.dtype, (nmax, *shape))
                    typed[q][(slice(None), *(slice(0, s) for s in shape))] = rows
            out.append(typed.flatten(0, 1).index_select(0, slot).movedim(0, d))
        return out

    def _exchange_shapes(self, tails: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        flat = torch.tensor([s for tail in tails for s in tail] or [0], dtype=torch.long, device=_collective_device())
        received = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(received, flat)
        self.collectives += 1
        out = []
        for r in received:
            values, shapes, i = r.tolist(), [], 0
            for tail in tails:
                shapes.append(tuple(values[i: i + len(tail)]))
                i += len(tail)
            out.append(shapes)
        return out

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Integer counters summed over the ranks (oracle calls of the blocks each rank computed)."""
        if not self.distributed:
            return dict(counts)
        keys = list(counts)  # the same order on every rank (the oracles' kinds)
        values = torch.tensor([int(counts[k]) for k in keys], dtype=torch.long, device=_collective_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        self.collectives += 1
        return dict(zip(keys, (int(v) for v in values.tolist()), strict=True))


def _collective_device() -> torch.device:
    """Where small bookkeeping tensors of a collective live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype]) -> list[int]:
    """Byte offsets of parts of the given shapes and dtypes laid out one after the other, each start aligned to
    8 bytes; the last entry is the (aligned) end of the last part."""
    offsets = [0]
    for shape, dtype in zip(shapes, dtypes, strict=True):
        end = offsets[-1] + _numel(shape) * dtype.itemsize
        offsets.append(end + (-end) % 8)
    return offsets


def _typed(data: Tensor, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """The bytes of `data` (..., n) from `start` on (aligned for `dtype`), viewed in place as `dtype` of `shape`:
    the leading dimensions of `data`, then its last one split into the rest of `shape`."""
    lead = data.shape[:-1]
    inner = shape[len(lead):]
    size = _numel(inner) * dtype.itemsize
    if size == 0:
        return data.new_zeros(shape, dtype=dtype)
    return data[..., start: start + size].view(dtype).view(*lead, *inner)
