"""Communication: the round and byte counter and the two back-ends that run one algorithm code.

- :class:`SimulatedBackend`: every client (agent) lives in this process; a server reduction is a plain sum.
- :class:`DistributedBackend`: clients are spread over ``torch.distributed`` ranks (gloo on CPU); rank r owns
  a contiguous slice of the M clients, computes on the sampled clients it owns, and a server reduction is one
  ``all_reduce(SUM)`` of [weighted sums, total weight]; gossip exchanges neighbours' rows point to point
  (``isend`` / ``irecv``). Every collective runs under the process group's timeout (see :func:`init_from_env`).

The algorithms count communication in the federated protocol's terms (:class:`CommCounter`): one server
round per all-reduce over the sampled clients, one gossip round per mixing step; bytes are the protocol's
messages (client -> server and back; agent -> each neighbour), not gloo's traffic between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mbbo.distributed import init_from_env

__all__ = ["Backend", "CommCounter", "DistributedBackend", "SimulatedBackend", "init_from_env", "make_backend",
           "owner_slices"]


@dataclass
class CommCounter:
    """Server (all-reduce) rounds, gossip rounds and bytes sent."""

    rounds: int = 0
    gossip_rounds: int = 0
    bytes: int = 0

    def server_round(self, participants: int, numel: int, itemsize: int) -> None:
        """One all-reduce: each participant uploads ``numel`` values and receives the result."""
        self.rounds += 1
        self.bytes += 2 * participants * numel * itemsize

    def gossip_round(self, messages: int, numel: int, itemsize: int) -> None:
        """One mixing step: ``messages`` directed neighbour-to-neighbour sends of ``numel`` values."""
        self.gossip_rounds += 1
        self.bytes += messages * numel * itemsize

    def metrics(self) -> dict[str, float]:
        """The counts as metrics; volume in megabytes (a count of bytes from 0 would trip the runner's
        growth guard, which floors initial magnitudes at 1)."""
        return {"comm_rounds": float(self.rounds), "gossip_rounds": float(self.gossip_rounds),
                "comm_mbytes": self.bytes / 1e6}


def owner_slices(num_clients: int, world_size: int) -> list[range]:
    """Contiguous client ranges per rank (the first ``M mod R`` ranks get one more)."""
    base, extra = divmod(num_clients, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


class Backend:
    """Where clients live and how their contributions meet. Subclasses: simulated and distributed."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.owned = owner_slices(num_clients, self.world_size)[self.rank]

    def local(self, clients: Tensor) -> Tensor:
        """The entries of ``clients`` this process computes (a boolean mask over ``clients``)."""
        return (clients >= self.owned.start) & (clients < self.owned.stop)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def gossip(self, weights: Tensor, rows: Tensor) -> Tensor:
        """``W[owned] @ X`` for the owned rows ``rows`` = ``X[owned]`` of the agents' table X."""
        raise NotImplementedError

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """The full (M, ...) table from each process's owned rows."""
        return rows


class SimulatedBackend(Backend):
    """All clients in this process."""

    def gossip(self, weights: Tensor, rows: Tensor) -> Tensor:
        return weights.to(rows.dtype) @ rows


class DistributedBackend(Backend):
    """Clients on ``torch.distributed`` ranks of the default (initialised) process group."""

    def __init__(self, num_clients: int) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedBackend needs an initialised process group (see init_from_env)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if num_clients < self.world_size:
            raise ValueError(f"{num_clients} clients cannot be spread over {self.world_size} processes; "
                             "use at least as many clients as processes")
        super().__init__(num_clients)
        self.slices = owner_slices(num_clients, self.world_size)
        self._plans: dict[tuple[int, tuple[int, ...]], list[tuple[int, list[int], list[int]]]] = {}

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        parts = [rows.new_empty((len(s), *rows.shape[1:])) for s in self.slices]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def _plan(self, weights: Tensor) -> list[tuple[int, list[int], list[int]]]:
        """Per other rank r: (r, its agents our agents mix with, our agents its agents mix with)."""
        key = (weights.data_ptr(), tuple(weights.shape))
        if key not in self._plans:
            nonzero = weights != 0
            mine = slice(self.owned.start, self.owned.stop)
            plan = []
            for r, other in enumerate(self.slices):
                if r != self.rank:
                    need = [j for j in other if bool(nonzero[mine, j].any())]
                    give = [j for j in self.owned if bool(nonzero[other.start:other.stop, j].any())]
                    plan.append((r, need, give))
            self._plans[key] = plan
        return self._plans[key]

    def gossip(self, weights: Tensor, rows: Tensor) -> Tensor:
        """Sends our rows to every rank whose agents mix with them, receives the rows our agents mix with
        (isend / irecv), then mixes in the same order as the simulated ``W @ X``."""
        full = rows.new_zeros((self.num_clients, *rows.shape[1:]))
        full[self.owned.start:self.owned.stop] = rows
        sends, receives = [], []
        for r, need, give in self._plan(weights):
            if give:
                sends.append(dist.isend(rows[[j - self.owned.start for j in give]].contiguous(), dst=r))
            if need:
                buffer = rows.new_empty((len(need), *rows.shape[1:]))
                receives.append((dist.irecv(buffer, src=r), need, buffer))
        for work, need, buffer in receives:
            work.wait()
            full[need] = buffer
        for work in sends:
            work.wait()
        return weights[self.owned.start:self.owned.stop].to(rows.dtype) @ full


def make_backend(num_clients: int) -> Backend:
    """A :class:`DistributedBackend` when this process runs under torchrun / ``--nproc`` (WORLD_SIZE > 1),
    else a :class:`SimulatedBackend`."""
    init_from_env()
    if dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedBackend(num_clients)
    return SimulatedBackend(num_clients)
