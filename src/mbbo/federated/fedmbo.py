"""FedMBO (Huang, Zhang, Ji, "Achieving Linear Speedup in Non-IID Federated Bilevel Learning", ICML 2023)
— a [template] reconstruction (specs/distributed.md §4, specs/algorithms.md §5.1).

What the paper's abstract states and this follows: partial client participation with fresh client samples
inside the federated hypergradient estimator; server-averaged minibatch SGD on the lower level; comparison
with FedNest. What is reconstructed, not the paper's algorithm box: the exact update below, the deterministic
Neumann truncation (not a random one), no local x steps, and every constant::

    for t = 1..T:  S_t ~ n of M;  y <- y - beta mean_{i in S_t} grad_y g_i(x, y; xi)        (T rounds)
    p0 = mean_{i in S'_0} grad_y f_i(x, y)                                                   (1 round)
    v = p0; acc = p0
    for q = 1..Q:  S'_q ~ n of M (fresh);  v <- v - eta mean_{i in S'_q} H_i v;  acc += v      (Q rounds)
    h = mean_{i in S''} [grad_x f_i(x, y) - eta (grad_xy g_i) acc]                            (1 round)
    x <- x - alpha h

A fresh client subset per Neumann term makes the product of the factors an unbiased estimate of the power of
the averaged Hessian's factor, which is what gives the 1/n variance (linear speed-up in n). Rounds per outer
iteration: T + Q + 2; ``sync="solution"``: the clients' local estimates in one round, T + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbbo.federated.base import FederatedAlgorithm, LowerStepConfig

__all__ = ["FedMBO", "FedMBOConfig"]


@dataclass
class FedMBOConfig(LowerStepConfig):
    """lower_steps = T (server-averaged SGD steps), lower_lr = beta, lr = alpha; Q = neumann_terms."""


class FedMBO(FederatedAlgorithm):
    """FedMBO [template]: minibatch-SGD lower level, per-term fresh client subsets in the Neumann estimator."""

    name = "fedmbo"
    Config = FedMBOConfig

    def rounds_per_iteration(self) -> int:
        cfg = self.config
        return cfg.lower_steps + (cfg.neumann_terms + 2 if cfg.sync == "per_hvp" else 1)

    def step(self) -> None:
        cfg, x, y = self.config, self.x, self.y
        for _ in range(cfg.lower_steps):
            clients = self.sample_clients()
            g = self.oracles.grad_y_g(x, y, self.lower_batch(clients))
            y = y - cfg.lower_lr * self.server_mean(clients, g)[0]
        h = self.global_hypergradient(x, y, lambda j: self.sample_clients())
        self.y = y
        self.x = x - cfg.lr * h
        self.iteration += 1
