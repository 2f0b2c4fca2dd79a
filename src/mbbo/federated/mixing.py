"""Mixing matrices for decentralised runs (DSBO): ring and random regular graphs, checked doubly stochastic.

W is built from an undirected graph with Metropolis-Hastings weights, W_ij = 1 / (1 + max(d_i, d_j)) on edges
and W_ii = 1 - sum_j W_ij, which is symmetric and doubly stochastic for any graph; on a k-regular graph every
edge weighs 1 / (k + 1). A disconnected graph is rejected: gossip could never reach consensus.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbbo.federated.sampling import event_generator
from mbbo.validation import check_int

__all__ = ["MixingMatrix", "random_regular_adjacency", "ring_adjacency"]


def ring_adjacency(n: int) -> Tensor:
    """Agent i talks to i - 1 and i + 1 (mod n)."""
    check_int("number of agents", n, 1)
    adj = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if n > 1:
            adj[i, (i + 1) % n] = adj[(i + 1) % n, i] = True
    adj.fill_diagonal_(False)
    return adj


def random_regular_adjacency(n: int, degree: int, seed: int = 0, max_tries: int = 1000) -> Tensor:
    """A random simple ``degree``-regular graph (configuration model, redrawn until simple and connected)."""
    check_int("number of agents", n, 2)
    check_int("degree", degree, 1)
    if degree >= n or (n * degree) % 2:
        raise ValueError(f"degree must be in [1, n - 1] with n * degree even, got degree={degree}, n={n}")
    for attempt in range(max_tries):
        g = event_generator(seed, 7, attempt)
        stubs = torch.arange(n).repeat_interleave(degree)[torch.randperm(n * degree, generator=g)].view(-1, 2)
        adj = torch.zeros(n, n, dtype=torch.bool)
        ok = True
        for a, b in stubs.tolist():
            if a == b or adj[a, b]:
                ok = False
                break
            adj[a, b] = adj[b, a] = True
        if ok and _connected(adj):
            return adj
    raise RuntimeError(f"no simple connected {degree}-regular graph on {n} agents found in {max_tries} draws")


def _components(adj: Tensor) -> list[list[int]]:
    n = adj.shape[0]
    seen: set[int] = set()
    comps = []
    for start in range(n):
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in torch.nonzero(adj[i]).flatten().tolist():
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


def _connected(adj: Tensor) -> bool:
    return len(_components(adj)) == 1


class MixingMatrix:
    """A symmetric doubly stochastic W on a connected graph (``ring(n)``, ``random_regular(n, k)`` or
    ``from_adjacency``). ``W @ X`` is one gossip step; it keeps the average of the rows of X."""

    def __init__(self, adjacency: Tensor, dtype: torch.dtype = torch.float64) -> None:
        adj = torch.as_tensor(adjacency).to(torch.bool).clone()
        if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
            raise ValueError(f"adjacency must be a square matrix, got shape {tuple(adj.shape)}")
        adj.fill_diagonal_(False)
        if not torch.equal(adj, adj.T):
            raise ValueError("adjacency must be symmetric (an undirected graph)")
        comps = _components(adj)
        if len(comps) > 1:
            raise ValueError(f"the mixing graph is disconnected ({len(comps)} components: {comps}); gossip "
                             "cannot reach consensus")
        self.adjacency = adj
        deg = adj.sum(1).to(dtype)
        w = torch.where(adj, 1.0 / (1.0 + torch.maximum(deg.unsqueeze(0), deg.unsqueeze(1))),
                        torch.zeros((), dtype=dtype))
        w = w + torch.diag(1.0 - w.sum(1))
        self.weights = w
        self.check()

    @classmethod
    def ring(cls, n: int, dtype: torch.dtype = torch.float64) -> MixingMatrix:
        return cls(ring_adjacency(n), dtype)

    @classmethod
    def random_regular(cls, n: int, degree: int, seed: int = 0, dtype: torch.dtype = torch.float64
                       ) -> MixingMatrix:
        return cls(random_regular_adjacency(n, degree, seed), dtype)

    @property
    def num_agents(self) -> int:
        return self.weights.shape[0]

    @property
    def messages(self) -> int:
        """Directed neighbour-to-neighbour sends per gossip step (twice the number of edges)."""
        return int(self.adjacency.sum())

    def check(self, tol: float = 1e-12) -> None:
        """Raise ValueError unless W is non-negative, symmetric and doubly stochastic."""
        w = self.weights
        ones = torch.ones(w.shape[0], dtype=w.dtype)
        if bool((w < 0).any()):
            raise ValueError("mixing matrix has negative entries")
        if not (torch.allclose(w.sum(0), ones, atol=tol) and torch.allclose(w.sum(1), ones, atol=tol)):
            raise ValueError("mixing matrix is not doubly stochastic")

    def spectral_gap(self) -> float:
        """1 - the second largest |eigenvalue| of W (> 0 on a connected graph with self-loops)."""
        eig = torch.linalg.eigvalsh(self.weights).abs().sort(descending=True).values
        return float(1.0 - eig[1]) if len(eig) > 1 else 1.0
