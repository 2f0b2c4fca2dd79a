"""What the federated and decentralised methods share: sampling, server rounds, local hypergradients, state.

One algorithm code runs on both back-ends (:mod:`mbbo.federated.comm`): every method computes only on the
clients its process owns (all of them when simulated) and meets the others through :meth:`server_mean`
(one counted all-reduce round) or the back-end's gossip. Random draws are counter-based
(:mod:`mbbo.federated.sampling`), so the state is the iterates plus counters and a resumed run is
bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.federated.comm import Backend, CommCounter, SimulatedBackend
from mbbo.federated.data import ClientBatch, FederatedProblem
from mbbo.federated.local import WEIGHTINGS, Aggregator
from mbbo.federated.oracles import ClientOracles
from mbbo.federated.sampling import ClientSampler, draw_rows, participation_count
from mbbo.linsolve import HVPFactory, Neumann
from mbbo.state import STATE_FORMAT, UNSET, expose_state, load_dataclass, sharded_names, snapshot
from mbbo.validation import check_choice, check_int, check_positive

__all__ = ["SYNC_MODES", "FederatedAlgorithm", "FederatedConfig", "LowerStepConfig"]

SYNC_MODES = ("per_hvp", "solution")
LOWER_STREAM, UPPER_STREAM = 1, 2


@dataclass
class FederatedConfig(Hyper):
    """Hyper-parameters every federated method has.

    batch_size: rows per client mini-batch (None: the client's full data); weighting: server mean over the
    sampled clients, ``"mean"`` or by client ``"size"``; neumann_terms / neumann_lr: N and eta of the Neumann
    series eta sum_{q<=N} (I - eta H)^q b; sync: ``"per_hvp"`` all-reduces every Hessian-vector product (the
    global H^-1 b of the averaged Hessian, N + 2 rounds), ``"solution"`` solves on each client with its own
    Hessian and all-reduces the hypergradient (1 round, biased under heterogeneity).
    """

    batch_size: int | None = 64
    weighting: str = "mean"
    neumann_terms: int = 5
    neumann_lr: float = 0.01
    sync: str = "per_hvp"

    def validate(self, problem: FederatedProblem) -> None:  # type: ignore[override]
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, 1)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_int("neumann_terms", self.neumann_terms, 0)
        check_positive("neumann_lr", self.neumann_lr)
        check_choice("sync", self.sync, SYNC_MODES)


@dataclass
class LowerStepConfig(FederatedConfig):
    """Adds lower_steps = T gradient steps on y per outer iteration with step lower_lr, and the x step lr
    (FedMBO's averaged steps, DSBO's gossip steps)."""

    lower_steps: int = 5
    lower_lr: float = 0.05
    lr: float = 0.05

    def validate(self, problem: FederatedProblem) -> None:  # type: ignore[override]
        super().validate(problem)
        check_int("lower_steps", self.lower_steps, 1)
        check_positive("lower_lr", self.lower_lr)
        check_positive("lr", self.lr)


class FederatedAlgorithm:
    """Base of FedNest, FedMBO and DSBO: ``step()`` is one outer iteration (see :mod:`mbbo.protocols`)."""

    @dataclass
    class State:
        iteration: int = 0
        events: int = 0  # random events drawn so far (client samples, batches): the streams' position
        x: Tensor = UNSET  # the server's upper variable
        y: Tensor = UNSET  # the server's lower variable
        comm: CommCounter = field(default_factory=CommCounter)

    state: State
    iteration: int
    events: int
    x: Tensor
    y: Tensor
    comm: CommCounter

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        expose_state(cls)

    name: ClassVar[str] = "federated"
    Config: ClassVar[type[FederatedConfig]] = FederatedConfig

    def __init__(self, problem: FederatedProblem, config: FederatedConfig | None = None, *, seed: int = 0,
                 backend: Backend | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        if overrides:
            config = config.replace(**overrides)  # type: ignore[assignment]
        config.validate(problem)
        self.state = self.State()
        self.config = config
        self.problem = problem
        self.seed = int(seed)
        self.backend = backend if backend is not None else SimulatedBackend(problem.num_clients)
        if self.backend.num_clients != problem.num_clients:
            raise ValueError(f"backend is for {self.backend.num_clients} clients, the problem has "
                             f"{problem.num_clients}")
        self.oracles = ClientOracles(problem)
        self.aggregator = Aggregator(config.weighting)
        m = problem.num_clients
        self.sampler = ClientSampler(m, participation_count(m, problem.participation), self.seed)
        self.x = problem.x0.clone()
        self.y = problem.y0.clone()

    # --- sampling -------------------------------------------------------------------------------------
    def _event(self) -> int:
        self.events += 1
        return self.events

    def sample_clients(self) -> Tensor:
        """A fresh sample S (n of M, same on every process); returns the part this process owns."""
        clients = self.sampler.draw(self._event())
        return clients[self.backend.local(clients)]

    def all_local_clients(self) -> Tensor:
        """Every client this process owns (decentralised runs: all agents are active)."""
        owned = self.backend.owned
        return torch.arange(owned.start, owned.stop)

    def lower_batch(self, clients: Tensor, batch_size: int | None = -1) -> ClientBatch:
        """A fresh lower (training) batch of the given clients (-1: the config's batch size)."""
        size = self.config.batch_size if batch_size == -1 else batch_size
        return draw_rows(self.problem.lower_data, clients, size, self.seed, LOWER_STREAM, self._event())

    def upper_batch(self, clients: Tensor, batch_size: int | None = -1) -> ClientBatch:
        size = self.config.batch_size if batch_size == -1 else batch_size
        return draw_rows(self.problem.upper_data, clients, size, self.seed, UPPER_STREAM, self._event())

    @property
    def per_round(self) -> int:
        return self.sampler.per_round

    # --- communication --------------------------------------------------------------------------------
    def server_mean(self, clients: Tensor, *values: Tensor) -> list[Tensor]:
        """One server round: the weighted means over the sampled clients of each per-client table
        (rows = this process's ``clients``), all in one all-reduce."""
        shapes = [tuple(v.shape[1:]) for v in values]
        payload = self.aggregator.partial_sums(list(values), self.problem.client_sizes()[clients])
        total = self.backend.all_reduce_sum(payload)
        self.comm.server_round(self.per_round, payload.numel() - 1, payload.element_size())
        return self.aggregator.finish(total, shapes)

    # --- shared estimators ----------------------------------------------------------------------------
    def neumann(self) -> Neumann:
        return Neumann(self.config.neumann_terms, self.config.neumann_lr)

    def global_hvps(self, x: Tensor, y: Tensor, clients: Callable[[int], Tensor]) -> HVPFactory:
        """Term j's HVP v -> mean_{i in S_j} (grad_yy g_i) v on fresh batches, one server round each;
        ``clients(j)`` gives S_j (FedNest: one S for all terms; FedMBO: a fresh S per term)."""
        def make(j: int) -> Callable[[Tensor], Tensor]:
            members = clients(j)

            def apply(v: Tensor) -> Tensor:
                hv = self.oracles.hvp(x, y, v, self.lower_batch(members))
                return self.server_mean(members, hv)[0]
            return apply
        return HVPFactory(make)

    def local_hypergradient(self, x: Tensor, y: Tensor, clients: Tensor) -> Tensor:
        """Per-client h_i = grad_x f_i - (grad_xy g_i) v_i, v_i = Neumann estimate of H_i^-1 grad_y f_i with
        client i's own Hessian (no communication); (k, d_x)."""
        gx_f, gy_f = self.oracles.upper_grads(x, y, self.upper_batch(clients))
        hvps = HVPFactory(lambda j: lambda v: self.oracles.hvp(x, y, v, self.lower_batch(clients)))
        v = self.neumann().solve(hvps, gy_f).v
        return gx_f - self.oracles.cross(x, y, v, self.lower_batch(clients))

    def global_hypergradient(self, x: Tensor, y: Tensor, term_clients: Callable[[int], Tensor]) -> Tensor:
        """``sync="per_hvp"``: p = mean grad_y f_i over S'_0 (1 round), v = Neumann on the averaged HVPs
        (N rounds), h = mean over S'' of grad_x f_i - (grad_xy g_i) v (1 round). ``term_clients(j)``: j = 0 for
        p, 1..N for the Neumann terms, N + 1 for h. ``sync="solution"``: one round of the local estimates."""
        if self.config.sync == "solution":
            members = term_clients(0)
            return self.server_mean(members, self.local_hypergradient(x, y, members))[0]
        first = term_clients(0)
        gy_f = self.oracles.upper_grads(x, y, self.upper_batch(first))[1]
        p = self.server_mean(first, gy_f)[0]
        v = self.neumann().solve(self.global_hvps(x, y, lambda j: term_clients(j + 1)), p).v
        last = term_clients(self.config.neumann_terms + 1)
        gx_f = self.oracles.upper_grads(x, y, self.upper_batch(last))[0]
        jv = self.oracles.cross(x, y, v, self.lower_batch(last))
        return self.server_mean(last, gx_f - jv)[0]

    # --- evaluation and protocol ------------------------------------------------------------------------
    def evaluation_point(self) -> tuple[Tensor, Tensor]:
        """The (x, y) the task evaluates: the server's model."""
        return self.x, self.y

    def extra_metrics(self) -> dict[str, float]:
        """Communication counts (and, for decentralised methods, consensus errors)."""
        return self.comm.metrics()

    def rounds_per_iteration(self) -> int:
        """Server (or gossip) rounds one outer iteration costs (the table of specs/distributed.md §3)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def oracle_counts(self) -> dict[str, int]:
        return dict(self.oracles.counts)

    def state_dict(self) -> dict[str, Any]:
        """The State derived from its declaration (fields split over processes saved gathered, so that any
        number of processes can resume), the configuration and the oracle counters."""
        saved = snapshot(self.state, f"{self.name} state")
        for name in sharded_names(self.state):
            saved[name] = self.backend.all_gather_rows(getattr(self.state, name)).clone()
        return {"format": STATE_FORMAT, "name": self.name, "seed": self.seed, "config": asdict(self.config),
                "state": saved, "oracle_counts": self.oracle_counts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        found = state.get("format", 1)
        if found != STATE_FORMAT:
            raise ValueError(f"the checkpoint holds federated state format {found!r}, this mbbo reads format "
                             f"{STATE_FORMAT} (a declared State, since issue 11): start the run afresh (--overwrite)")
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for algorithm {state['name']!r}, not {self.name!r}")
        self.config = type(self.config)(**state["config"])
        own = slice(self.backend.owned.start, self.backend.owned.stop)
        saved = {k: (v[own] if k in sharded_names(self.state) else v) for k, v in state["state"].items()}
        load_dataclass(self.state, saved, f"{self.name} state")
        self.oracles.counts.clear()
        self.oracles.counts.update({k: int(v) for k, v in state["oracle_counts"].items()})

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.x).all()) and bool(torch.isfinite(self.y).all())


expose_state(FederatedAlgorithm)


def local_steps_per_epoch(sizes: Tensor, batch_size: int | None) -> int:
    """ceil(N_max / B): mini-batch steps of one local epoch (1 for full batches)."""
    return 1 if batch_size is None else max(1, math.ceil(int(sizes.max()) / batch_size))
