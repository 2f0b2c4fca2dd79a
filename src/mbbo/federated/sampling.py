"""Client sampling and per-client mini-batches, drawn from counter-based random streams.

Every draw is a pure function of (seed, event counter): the server's client sample S and each client's rows
at communication e come from a generator seeded with (seed, stream, e). Nothing depends on which process owns
a client, so one process simulating all clients and R processes owning a slice each draw the same samples;
the random state is a counter, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mbbo.federated.data import ClientBatch, ClientData
from mbbo.validation import check_int, check_real

__all__ = ["ClientSampler", "draw_rows", "event_generator", "participation_count"]

_MIX = (1_000_003, 999_983, 0x9E3779B1)


def event_generator(seed: int, stream: int, event: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, stream, event) (distinct events and streams get distinct seeds)."""
    g = torch.Generator(device=device)
    g.manual_seed(((int(seed) * _MIX[0] + int(stream)) * _MIX[1] + int(event) * _MIX[2]) % (2**63))
    return g


def participation_count(num_clients: int, fraction: float) -> int:
    """m = max(floor(C M), 1): FedNest's clients per communication for a participation fraction C."""
    check_int("num_clients", num_clients, 1)
    check_real("participation", fraction, 0.0, 1.0, low_open=True)
    return max(math.floor(fraction * num_clients + 1e-9), 1)


@dataclass(frozen=True)
class ClientSampler:
    """n of M clients, uniformly without replacement, fresh at every communication (event)."""

    num_clients: int
    per_round: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_clients", self.num_clients, 1)
        check_int("clients per round n", self.per_round, 1)
        if self.per_round > self.num_clients:
            raise ValueError(f"clients per round n={self.per_round} must be in [1, M] = [1, {self.num_clients}]")

    def draw(self, event: int) -> Tensor:
        """The sorted client ids of communication ``event`` (shape (n,))."""
        g = event_generator(self.seed, 0, event)
        return torch.randperm(self.num_clients, generator=g)[: self.per_round].sort().values

    def everyone(self) -> Tensor:
        return torch.arange(self.num_clients)


def draw_rows(data: ClientData, clients: Tensor, batch_size: int | None, seed: int, stream: int, event: int
              ) -> ClientBatch:
    """A mini-batch of ``batch_size`` rows per client, without replacement inside the client (all rows of a
    client smaller than the batch; padding weighted 0). ``None`` or a size >= every client: the full batch.

    The keys of all M clients come from one event generator, so a client's rows do not depend on which other
    clients are asked for (nor on the process asking)."""
    if batch_size is None or batch_size >= data.max_size:
        return data.full(clients)
    check_int("batch_size", batch_size, 1)
    g = event_generator(seed, stream, event)
    keys = torch.rand((data.num_clients, data.max_size), generator=g)
    cols = torch.arange(data.max_size)
    keys = torch.where(cols < data.sizes.unsqueeze(1), keys, torch.full_like(keys, 2.0))
    rows = keys[clients].argsort(dim=1)[:, :batch_size]
    counts = data.sizes[clients].clamp(max=batch_size)
    dtype = torch.get_default_dtype()
    floating = [t.dtype for t in data.fields.values() if t.dtype.is_floating_point]
    dtype = floating[0] if floating else dtype
    valid = torch.arange(batch_size) < counts.unsqueeze(1)
    weight = valid.to(dtype) / counts.unsqueeze(1).to(dtype)
    return data.gather(clients, rows, weight)
