"""Restarting wrapper (RE-BSVRB, seed paper section 6 / Algorithm 3; the scheme of RE-RSVRB).

    x^(0) = x_0
    for stage k = 1..K:
        run the algorithm for T_k iterations from x^(k-1) (lower variables carried over, estimators
        re-initialised at the stage start)
        x^(k) = last iterate of the stage, or a uniformly sampled iterate of the stage (`output="uniform"`)
        eta, tau (tau_v), alpha, beta <- (those) / decay;   T_{k+1} = growth * T_k

Under the PL condition ||grad F||^2 >= 2 mu_F (F - F*) this gives the faster rate of the paper. Works around
any algorithm with `set_hyper` and `restart` (BSVRB_v1/v2, RSVRB, the moving-average baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import BilevelAlgorithm
from mbbo.state import STATE_FORMAT, expose_state, load_dataclass, snapshot

DEFAULT_DECAYED = ("lr", "lower_lr", "linsys_lr", "alpha", "beta")


class Restarted:
    """RE-<algorithm>: stage-wise restarts with decayed step sizes and growing stage lengths. Its own `State`
    (the stage counters and the reservoir-sampled iterate) is saved beside the inner algorithm's."""

    @dataclass
    class State:
        stage: int = 0
        stage_iteration: int = 0
        current_length: int = 1
        sampled_x: Tensor | None = None

    state: State
    stage: int
    stage_iteration: int
    current_length: int
    sampled_x: Tensor | None

    def __init__(self, algorithm: BilevelAlgorithm, *, stage_length: int = 1000, decay: float = 2.0,
                 growth: float = 2.0, decayed: tuple[str, ...] | None = None,
                 output: str = "last") -> None:
        if not isinstance(stage_length, int) or stage_length < 1:
            raise ValueError(f"stage_length must be a positive integer, got {stage_length!r}")
        if not (math.isfinite(decay) and decay >= 1.0):
            raise ValueError(f"decay must be a finite number >= 1, got {decay!r}")
        if not (math.isfinite(growth) and growth >= 1.0):
            raise ValueError(f"growth must be a finite number >= 1, got {growth!r}")
        if output not in ("last", "uniform"):
            raise ValueError(f"output must be 'last' or 'uniform', got {output!r}")
        known = set(algorithm.config.__dataclass_fields__)
        if decayed is None:
            wanted = getattr(algorithm, "restart_decayed", DEFAULT_DECAYED)
            decayed = tuple(k for k in wanted if k in known)
        missing = [name for name in decayed if name not in known]
        if missing:
            raise ValueError(f"decayed hyper-parameters {missing} are not hyper-parameters of "
                             f"{algorithm.name}; known: {sorted(known)}")
        self.inner = algorithm
        self.name = f"re_{algorithm.name}"
        self.stage_length = stage_length
        self.decay, self.growth, self.decayed, self.output = decay, growth, decayed, output
        self.state = self.State(current_length=stage_length)

    @property
    def iteration(self) -> int:
        return self.inner.iteration

    @property
    def x(self) -> Tensor:
        return self.inner.x

    @property
    def problem(self) -> Any:
        return self.inner.problem

    def lower_variables(self) -> Tensor:
        return self.inner.lower_variables()

    def oracle_counts(self) -> dict[str, int]:
        return self.inner.oracle_counts()

    def is_finite(self) -> bool:
        return self.inner.is_finite()

    def lower_variables_of(self, blocks: Tensor) -> Tensor:
        return self.inner.lower_variables_of(blocks)

    def step(self) -> None:
        self.inner.step()
        self.stage_iteration += 1
        if self.output == "uniform":
            # reservoir sampling: after k iterates each is kept with probability 1/k
            gen = self.inner.generators["extra"]
            if float(torch.rand((), generator=gen, device=gen.device)) * self.stage_iteration < 1.0:
                self.sampled_x = self.inner.x.clone()
        if self.stage_iteration >= self.current_length:
            self._next_stage()

    def _next_stage(self) -> None:
        if self.output == "uniform" and self.sampled_x is not None:
            self.inner.x = self.sampled_x
            self.inner.x_prev = self.sampled_x.clone()
        # the values in use (defaults resolved, e.g. lower steps scaled for m / B), decayed and then set explicitly
        self.inner.set_hyper(**{k: self.inner.hyper(k) / self.decay for k in self.decayed})
        self.inner.restart()
        self.stage += 1
        self.stage_iteration = 0
        self.sampled_x = None
        self.current_length = max(1, round(self.current_length * self.growth))

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "inner": self.inner.state_dict(), "state": snapshot(self.state, self.name)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "state" not in state:
            raise ValueError(f"the checkpoint holds {self.name}'s state format 1, this mbbo reads format "
                             f"{STATE_FORMAT}: start the run afresh (--overwrite)")
        self.inner.load_state_dict(state["inner"])
        load_dataclass(self.state, state["state"], f"{self.name} state")


expose_state(Restarted)
