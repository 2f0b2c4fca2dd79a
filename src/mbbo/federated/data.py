"""Client data of a federated bilevel problem: padded per-client tables, the iid and label-shard splits.

Client i holds a lower (training) table and an upper (validation) table. Clients hold different numbers of
rows, so each table is stored padded to the largest client, ``(M, N_max, ...)``, with the true sizes beside it;
a mini-batch is a ``(k, B)`` index table plus per-row weights that are zero on padding (and on rows a small
client does not have). Losses are weighted means, so a padded full batch is exactly the client's full loss,
and every client has the same shapes: the oracles can ``vmap`` over clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mbbo.validation import check_int, check_real

__all__ = ["ClientBatch", "ClientData", "FederatedProblem", "split_iid", "split_label_shards"]

ClientBatch = dict[str, Tensor]
"""Rows of one client: tensors ``(B, ...)`` and ``"weight"`` ``(B,)`` summing to 1 (a weighted mean)."""

Loss = Callable[[Tensor, Tensor, ClientBatch], Tensor]
"""``loss(x, y, batch) -> scalar`` for one client (x, y flat)."""


@dataclass(frozen=True)
class ClientData:
    """Per-client rows padded to ``(M, N_max, ...)``; ``sizes[i]`` rows of client i are real."""

    fields: Mapping[str, Tensor]
    sizes: Tensor

    @classmethod
    def from_parts(cls, parts: list[Mapping[str, Tensor]], what: str = "data") -> ClientData:
        """Pads one mapping of row tensors per client. Raises ValueError naming an empty client."""
        for i, part in enumerate(parts):
            n = len(next(iter(part.values())))
            if n == 0:
                raise ValueError(f"client {i} has no {what} after the split; use fewer clients or more data")
        sizes = torch.tensor([len(next(iter(p.values()))) for p in parts], dtype=torch.long)
        n_max = int(sizes.max())
        fields = {}
        for key in parts[0]:
            ref = parts[0][key]
            table = ref.new_zeros((len(parts), n_max, *ref.shape[1:]))
            for i, part in enumerate(parts):
                table[i, : len(part[key])] = part[key]
            fields[key] = table
        return cls(fields, sizes)

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def max_size(self) -> int:
        return int(self.sizes.max())

    def gather(self, clients: Tensor, rows: Tensor, weight: Tensor) -> ClientBatch:
        """The batch of ``clients`` (k,) at row indices ``rows`` (k, B) with weights (k, B)."""
        out = {key: table[clients.unsqueeze(1), rows] for key, table in self.fields.items()}
        out["weight"] = weight
        return out

    def full(self, clients: Tensor) -> ClientBatch:
        """Every row of each client (padding weighted 0)."""
        n_max = self.max_size
        rows = torch.arange(n_max).expand(len(clients), n_max)
        valid = rows < self.sizes[clients].unsqueeze(1)
        dtype = next(iter(self.fields.values())).dtype
        dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
        weight = valid.to(dtype) / self.sizes[clients].unsqueeze(1).to(dtype)
        return self.gather(clients, rows, weight)

    def rows_of(self, client: int) -> dict[str, Tensor]:
        """The real (unpadded) rows of one client."""
        n = int(self.sizes[client])
        return {key: table[client, :n] for key, table in self.fields.items()}


@dataclass(frozen=True)
class FederatedProblem:
    """min_x (1/M) sum_i f_i(x, y*(x)),  y*(x) = argmin_y (1/M) sum_i g_i(x, y)  (FedNest's setting).

    ``upper_loss`` / ``lower_loss`` are one client's f_i / g_i on a weighted batch; ``upper_data`` and
    ``lower_data`` hold the clients' validation and training rows. ``client_weights`` are the aggregation
    weights of a size-weighted mean (the lower table's sizes).
    """

    upper_loss: Loss
    lower_loss: Loss
    x0: Tensor
    y0: Tensor
    lower_data: ClientData
    upper_data: ClientData
    participation: float = 1.0
    name: str = "federated"

    def __post_init__(self) -> None:
        if self.lower_data.num_clients != self.upper_data.num_clients:
            raise ValueError(f"lower data has {self.lower_data.num_clients} clients, upper data "
                             f"{self.upper_data.num_clients}")
        check_real("participation", self.participation, 0.0, 1.0, low_open=True)
        if self.x0.dim() != 1 or self.y0.dim() != 1:
            raise ValueError(f"x0 and y0 must be flat vectors, got shapes {tuple(self.x0.shape)}, "
                             f"{tuple(self.y0.shape)}")

    @property
    def num_clients(self) -> int:
        return self.lower_data.num_clients

    def client_sizes(self) -> Tensor:
        return self.lower_data.sizes


def split_iid(num_rows: int, num_clients: int, generator: torch.Generator) -> list[Tensor]:
    """A random permutation cut into ``num_clients`` near-equal parts (row indices per client)."""
    check_int("num_clients", num_clients, 1)
    if num_clients > num_rows:
        raise ValueError(f"num_clients={num_clients} exceeds the {num_rows} rows to split: a client would have "
                         "no data")
    perm = torch.randperm(num_rows, generator=generator)
    return list(torch.tensor_split(perm, num_clients))


def split_label_shards(labels: Tensor, num_clients: int, shards_per_client: int, generator: torch.Generator
                       ) -> list[Tensor]:
    """FedNest's non-iid split: sort by label, cut into ``num_clients * shards_per_client`` shards, give each
    client ``shards_per_client`` random shards (row indices per client). Raises ValueError if a client would
    get no row."""
    check_int("num_clients", num_clients, 1)
    check_int("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(f"num_clients * shards_per_client = {num_shards} shards exceed the {len(labels)} rows: "
                         "a client would have no data")
    order = torch.sort(labels, stable=True).indices
    shards = torch.tensor_split(order, num_shards)
    assign = torch.randperm(num_shards, generator=generator).view(num_clients, shards_per_client)
    return [torch.cat([shards[int(s)] for s in row]) for row in assign]
