"""FedNest (Tarzanagh, Li, Thrampoulidis, Oymak, "FedNest: Federated Bilevel, Minimax, and Compositional
Optimization", ICML 2022) and its variants LFedNest, FedNest_SGD, LFedNest_SVRG, as in the authors' public code
(specs/distributed.md §3), with its four defects fixed.

One outer iteration::

    FedInn, T = inner_rounds times:  S ~ n of M (fresh)
        SVRG: u = mean_{i in S} grad_y g_i(x, y)  (full local data; 1 round)
        y_i <- y_i - lr_in (grad_y g_i(x, y_i; xi) - grad_y g_i(x, y; xi) + u)   local_epochs epochs
               (SGD variants: y_i <- y_i - lr_in grad_y g_i(x, y_i; xi))
        y = mean_{i in S} y_i                                                       (1 round)
    FedOut (global variants):  S fresh
        p = mean_S grad_y f_i;  v = eta_N sum_{q<=N} (I - eta_N mean_S H_i)^q p        (1 + N rounds)
        h = mean_S [grad_x f_i - (grad_xy g_i) v]                                      (1 round)
        x_i <- x_i - lr_out (grad_x f_i(x_i, y; xi) - grad_x f_i(x, y; xi) + h)          tau steps
        x = mean_S x_i                                                                 (1 round)
    FedOut (local variants, LFedNest*): x_i <- x_i - lr_out h_i(x_i) with client i's own Neumann estimate,
        tau steps; x = mean_S x_i (1 round)

Rounds per outer iteration (:meth:`FedNest.rounds_per_iteration`; specs table): FedNest 2T + N + 3,
FedNest_SGD T + N + 3, LFedNest T + 1, LFedNest_SVRG 2T + 1. ``sync="solution"`` (global variants) replaces
the N + 2 rounds of p, the Neumann terms and h by one round of the clients' local hypergradients: 2T + 2 / T + 2.

Defects of the public code fixed here:

1. Neumann accumulator reset: the series is rebuilt from p at every outer iteration (``mbbo.linsolve.Neumann``);
   the code never cleared its list of stored vectors, so the server averaged every term ever computed.
2. Separate step sizes: ``neumann_lr`` (eta_N) for the series, ``outer_lr`` for the local outer steps; the code
   used one value for both.
3. Unsupported options: every hyper-parameter and task setting is validated and an unknown one is an error
   naming the valid ones (the imbalance script passed an option the code did not support).
4. Strongly convex regulariser: the tasks regularise the head by (beta / 2) ||y||^2 (see
   ``mbbo.tasks.federated``), not the code's unsquared sum of norms, which is not strongly convex.

Defaults: the paper's (local_epochs 5, outer and Neumann lr 0.01, N = 5, tau = 5, T = 1) with the scripts'
inner lr 0.01 and batch 64.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mbbo.federated.base import FederatedAlgorithm, FederatedConfig, local_steps_per_epoch
from mbbo.federated.data import FederatedProblem
from mbbo.federated.local import LocalSolver
from mbbo.validation import check_int, check_positive

__all__ = ["FedNest", "FedNestConfig", "FedNestSGD", "LFedNest", "LFedNestSVRG"]


@dataclass
class FedNestConfig(FederatedConfig):
    """inner_rounds = T, local_epochs (FedInn), inner_lr, outer_steps = tau, outer_lr, plus the shared ones."""

    inner_rounds: int = 1
    local_epochs: int = 5
    inner_lr: float = 0.01
    outer_steps: int = 5
    outer_lr: float = 0.01

    def validate(self, problem: FederatedProblem) -> None:  # type: ignore[override]
        super().validate(problem)
        check_int("inner_rounds", self.inner_rounds, 1)
        check_int("local_epochs", self.local_epochs, 1)
        check_positive("inner_lr", self.inner_lr)
        check_int("outer_steps", self.outer_steps, 1)
        check_positive("outer_lr", self.outer_lr)


class FedNest(FederatedAlgorithm):
    """FedNest: SVRG local inner epochs, global hypergradient, tau corrected local outer steps (module doc)."""

    name = "fednest"
    Config = FedNestConfig
    svrg_inner = True
    global_outer = True

    def __init__(self, problem: FederatedProblem, config: FedNestConfig | None = None, **kwargs: object) -> None:
        super().__init__(problem, config, **kwargs)  # type: ignore[arg-type]
        if not self.global_outer and self.config.sync != "per_hvp":
            raise ValueError(f"sync applies only to the global variants (fednest, fednest_sgd); {self.name} "
                             f"uses client-local hypergradients, got sync={self.config.sync!r}")

    def rounds_per_iteration(self) -> int:
        cfg = self.config
        inner = (2 if self.svrg_inner else 1) * cfg.inner_rounds
        if not self.global_outer:
            return inner + 1
        return inner + (cfg.neumann_terms + 3 if cfg.sync == "per_hvp" else 2)

    def fed_inner(self) -> Tensor:
        """FedInn: T rounds of local epochs and server averaging of y."""
        cfg, x, y = self.config, self.x, self.y
        steps = cfg.local_epochs * local_steps_per_epoch(self.problem.lower_data.sizes, cfg.batch_size)
        solver = LocalSolver(steps, cfg.inner_lr, variance_reduced=self.svrg_inner)
        for _ in range(cfg.inner_rounds):
            clients = self.sample_clients()
            u = None
            if self.svrg_inner:
                full = self.lower_batch(clients, None)
                u = self.server_mean(clients, self.oracles.grad_y_g(x, y, full))[0]
            start = y.expand(len(clients), -1)
            y_local = solver.run(start, lambda z, b: self.oracles.grad_y_g(x, z, b),
                                 lambda t, c=clients: self.lower_batch(c), anchor=y, correction=u)
            y = self.server_mean(clients, y_local)[0]
        return y

    def fed_outer(self, y: Tensor) -> Tensor:
        """FedOut: the (global or local) hypergradient, tau local steps, server averaging of x."""
        cfg, x = self.config, self.x
        clients = self.sample_clients()
        start = x.expand(len(clients), -1)
        if self.global_outer:
            h = self.global_hypergradient(x, y, lambda j: clients)
            solver = LocalSolver(cfg.outer_steps, cfg.outer_lr, variance_reduced=True)
            x_local = solver.run(start, lambda z, b: self.oracles.grad_x_f(z, y, b),
                                 lambda t: self.upper_batch(clients), anchor=x, correction=h)
        else:
            solver = LocalSolver(cfg.outer_steps, cfg.outer_lr)
            x_local = solver.run(start, lambda z, b: self.local_hypergradient(z, y, clients), lambda t: {})
        return self.server_mean(clients, x_local)[0]

    def step(self) -> None:
        self.y = self.fed_inner()
        self.x = self.fed_outer(self.y)
        self.iteration += 1


class FedNestSGD(FedNest):
    """FedNest_SGD: plain SGD local inner epochs (no SVRG round), global hypergradient: T + N + 3 rounds."""

    name = "fednest_sgd"
    svrg_inner = False


class LFedNest(FedNest):
    """LFedNest: SGD inner epochs, client-local Neumann and local x steps only: T + 1 rounds."""

    name = "lfednest"
    svrg_inner = False
    global_outer = False


class LFedNestSVRG(FedNest):
    """LFedNest_SVRG: SVRG inner epochs, client-local hypergradient steps: 2T + 1 rounds."""

    name = "lfednest_svrg"
    svrg_inner = True
    global_outer = False


