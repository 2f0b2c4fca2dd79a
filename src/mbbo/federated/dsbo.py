"""DSBO (Chen, Huang, Ma, Balasubramanian, "Decentralized Stochastic Bilevel Optimization with Improved
per-Iteration Complexity", ICML 2023) — a [template] reconstruction (specs/distributed.md §5,
specs/algorithms.md §5.2).

What the abstract states and this follows: agents talk to their graph neighbours only (gossip with a doubly
stochastic W), and use only gradients, Hessian-vector and Jacobian-vector products, never Hessian or Jacobian
matrices. What is reconstructed, not the paper's algorithm box: the loop structure below, the moving average
of the hypergradient estimates, and every constant::

    y_i <- sum_j W_ij y_j - beta grad_y g_i(x_i, y_i; phi)                                (T gossip steps)
    z_i <- sum_j W_ij z_j - gamma ((grad_yy g_i(x_i, y_i)) z_i - grad_y f_i(x_i, y_i))      (N gossip steps)
    u_i = grad_x f_i(x_i, y_i) - (grad_xy g_i(x_i, y_i)) z_i
    r_i <- (1 - theta) r_i + theta u_i
    x_i <- sum_j W_ij x_j - alpha r_i                                                        (1 gossip step)

Gossip rounds per outer iteration: T + N + 1. Every agent keeps its own (x_i, y_i, z_i, r_i); the process
owning an agent keeps its rows, and gossip exchanges neighbours' rows (``Backend.gossip``). Metrics: the
consensus errors (1/n) sum_i ||x_i - x_bar||^2 (and of y), evaluated at the average (x_bar, y_bar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mbbo.federated.base import FederatedAlgorithm, LowerStepConfig
from mbbo.federated.comm import Backend
from mbbo.federated.data import FederatedProblem
from mbbo.federated.mixing import MixingMatrix
from mbbo.state import SHARDED_ROWS, UNSET
from mbbo.validation import check_choice, check_int, check_real

__all__ = ["DSBO", "TOPOLOGIES", "DSBOConfig"]

TOPOLOGIES = ("ring", "regular")


@dataclass
class DSBOConfig(LowerStepConfig):
    """lower_steps = T, lower_lr = beta, neumann_terms = N z-steps with neumann_lr = gamma, lr = alpha,
    momentum = theta; the graph: ``topology`` ring or random ``regular`` of ``degree`` (seeded by
    ``graph_seed``)."""

    momentum: float = 0.5
    topology: str = "ring"
    degree: int = 3
    graph_seed: int = 0

    def validate(self, problem: FederatedProblem) -> None:  # type: ignore[override]
        super().validate(problem)
        check_real("momentum", self.momentum, 0.0, 1.0, low_open=True)
        check_choice("topology", self.topology, TOPOLOGIES)
        check_int("degree", self.degree, 1)
        if self.sync != "per_hvp":
            raise ValueError(f"sync does not apply to DSBO (decentralised, no server); got sync={self.sync!r}")


class DSBO(FederatedAlgorithm):
    """DSBO [template]: decentralised gossip on y, z (HVP-only linear system) and x with a moving average."""

    @dataclass
    class State(FederatedAlgorithm.State):
        # each owned agent's x, y, linear-system variable z and momentum r
        xs: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)
        ys: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)
        zs: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)
        rs: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)

    name = "dsbo"
    Config = DSBOConfig

    def __init__(self, problem: FederatedProblem, config: DSBOConfig | None = None, *, seed: int = 0,
                 backend: Backend | None = None, mixing: MixingMatrix | None = None, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, backend=backend, **overrides)
        cfg = self.config
        n = problem.num_clients
        if mixing is None:
            mixing = (MixingMatrix.ring(n) if cfg.topology == "ring"
                      else MixingMatrix.random_regular(n, cfg.degree, cfg.graph_seed))
        if mixing.num_agents != n:
            raise ValueError(f"mixing matrix is for {mixing.num_agents} agents, the problem has {n} clients")
        self.mixing = mixing
        self.agents = self.all_local_clients()
        k = len(self.agents)
        self.xs = self.x.expand(k, -1).clone()
        self.ys = self.y.expand(k, -1).clone()
        self.zs = torch.zeros_like(self.ys)
        self.rs = torch.zeros_like(self.xs)

    def rounds_per_iteration(self) -> int:
        return self.config.lower_steps + self.config.neumann_terms + 1

    def gossip(self, rows: Tensor) -> Tensor:
        """sum_j W_ij row_j for the owned agents i (one counted gossip round)."""
        self.comm.gossip_round(self.mixing.messages, rows.shape[-1], rows.element_size())
        return self.backend.gossip(self.mixing.weights, rows)

    def step(self) -> None:
        cfg, a = self.config, self.agents
        xs, ys, zs = self.xs, self.ys, self.zs
        for _ in range(cfg.lower_steps):
            g = self.oracles.grad_y_g(xs, ys, self.lower_batch(a))
            ys = self.gossip(ys) - cfg.lower_lr * g
        gx_f, gy_f = self.oracles.upper_grads(xs, ys, self.upper_batch(a))
        for _ in range(cfg.neumann_terms):
            hz = self.oracles.hvp(xs, ys, zs, self.lower_batch(a))
            zs = self.gossip(zs) - cfg.neumann_lr * (hz - gy_f)
        u = gx_f - self.oracles.cross(xs, ys, zs, self.lower_batch(a))
        self.rs = (1 - cfg.momentum) * self.rs + cfg.momentum * u
        self.xs = self.gossip(xs) - cfg.lr * self.rs
        self.ys, self.zs = ys, zs
        self.x, self.y = self.averages()
        self.iteration += 1

    def averages(self) -> tuple[Tensor, Tensor]:
        """(x_bar, y_bar) over all agents (a reduction across processes)."""
        n = self.problem.num_clients
        total = self.backend.all_reduce_sum(torch.cat([self.xs.sum(0), self.ys.sum(0)]))
        return total[: self.xs.shape[1]] / n, total[self.xs.shape[1]:] / n

    def consensus_errors(self) -> tuple[float, float]:
        """(1/n) sum_i ||x_i - x_bar||^2 and the same for y."""
        n = self.problem.num_clients
        x_bar, y_bar = self.averages()
        local = torch.stack([((self.xs - x_bar) ** 2).sum(), ((self.ys - y_bar) ** 2).sum()])
        total = self.backend.all_reduce_sum(local) / n
        return float(total[0]), float(total[1])

    def extra_metrics(self) -> dict[str, float]:
        cx, cy = self.consensus_errors()
        return {**super().extra_metrics(), "consensus_x": cx, "consensus_y": cy}


    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.xs, self.ys, self.zs, self.rs))
