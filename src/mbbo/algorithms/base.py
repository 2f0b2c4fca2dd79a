"""What every algorithm shares: random streams, oracles, the upper iterate, checkpointable state."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.blocks import BLOCK_SAMPLING
from mbbo.oracles import Oracles
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.validation import check_choice

STREAMS = ("blocks", "lower", "upper", "extra")
ESTIMATOR_INIT = ("first_batch", "uniform", "zeros")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_unit(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


@dataclass
class Hyper:
    """Base of the algorithms' hyper-parameter dataclasses; `validate` runs at construction."""

    def validate(self, problem: MultiBlockProblem) -> None:  # pragma: no cover - overridden
        pass

    def replace(self, **changes: Any) -> Hyper:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {sorted(unknown)} for {type(self).__name__}; "
                             f"known: {[f.name for f in fields(self)]}")
        return type(self)(**{**asdict(self), **changes})


@dataclass
class MultiBlockConfig(Hyper):
    """Hyper-parameters every multi-block method has (defaults of the BSVRB/RSVRB scripts: m = 100, B = 10)."""

    block_batch: int = 10
    lr: float = 1e-3
    lower_lr: float = 0.5
    beta: float = 0.9
    block_sampling: str = "uniform"
    estimator_init: str = "first_batch"

    def validate(self, problem: MultiBlockProblem) -> None:
        """`block_sampling`: "uniform" (B distinct blocks drawn independently per iteration, as analysed) or
        "reshuffle" (the authors' code: a permutation consumed B per iteration; `mbbo.blocks.BlockSampler`).
        `estimator_init`: "first_batch" (one mini-batch per block at the start point), "uniform" (the authors'
        code: every estimator U[0, 1)) or "zeros"."""
        check_choice("block_sampling", self.block_sampling, BLOCK_SAMPLING)
        check_choice("estimator_init", self.estimator_init, ESTIMATOR_INIT)
        m = problem.num_blocks
        if not isinstance(self.block_batch, int) or not 1 <= self.block_batch <= m:
            raise ValueError(f"block_batch must be an integer in [1, m] = [1, {m}], got {self.block_batch!r}")
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_unit("beta", self.beta)


class BilevelAlgorithm:
    """Base class: `step()` performs one iteration; the runner drives it (see `mbbo.protocols`).

    Random streams (`torch.Generator`, seeded from `seed`): block sampling, lower data, upper data and an
    extra stream (second block sample, Neumann batches...), so that each estimator's fresh-sample assumption
    holds and the same seed gives the same trajectory. `compile=True` compiles the oracles (`Oracles`).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[Hyper]] = Hyper
    # hyper-parameters a restart (RE-) divides at each stage; BSVRB's alpha, beta are estimator weights
    restart_decayed: ClassVar[tuple[str, ...]] = ("lr", "lower_lr", "linsys_lr", "alpha", "beta")

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        if overrides:
            config = config.replace(**overrides)
        config.validate(problem)
        self.config = config
        self.problem = problem
        self.oracles = Oracles(problem, compile=compile)
        self.iteration = 0
        device = problem.x0.device
        self.generators = {s: torch.Generator(device=device) for s in STREAMS}
        for i, s in enumerate(STREAMS):
            self.generators[s].manual_seed(int(seed) * 1_000_003 + i)
        self.seed = int(seed)
        self.x = problem.x0.clone()
        self.x_prev = self.x.clone()
        # own copies: a reshuffling sampler's position is this run's state (saved in `state_dict`)
        self.lower_sampler = copy.copy(problem.lower_sampler)
        self.upper_sampler = copy.copy(problem.upper_sampler)

    # --- sampling -----------------------------------------------------------------------------------
    def sample_batches(self, blocks: Tensor, batch_size: int | None = None, *, initial: bool = False
                       ) -> tuple[Batch, Batch]:
        """One lower and one upper mini-batch per block; `initial=True` for estimator initialisation, which a
        reshuffling row sampler serves outside its epochs (`RowSampler.sample_initial`)."""
        out = []
        for sampler, stream in ((self.lower_sampler, "lower"), (self.upper_sampler, "upper")):
            draw = getattr(sampler, "sample_initial", sampler.sample) if initial else sampler.sample
            out.append(draw(blocks, self.generators[stream], batch_size))
        return out[0], out[1]

    def sampler_states(self) -> dict[str, Any]:
        """State of the stateful (reshuffling) row samplers."""
        return {k: s.state_dict() for k, s in (("lower", self.lower_sampler), ("upper", self.upper_sampler))
                if hasattr(s, "state_dict")}

    def filled(self, like: Tensor, how: str) -> Tensor:
        """An estimator's initial value under `estimator_init` "uniform" (U[0, 1), as the authors' code, from a
        generator seeded by the run's seed) or "zeros"."""
        if how == "zeros":
            return torch.zeros_like(like)
        if not hasattr(self, "_init_generator"):
            self._init_generator = torch.Generator(device=like.device).manual_seed(self.seed * 1_000_003 + 99)
        return torch.rand(like.shape, generator=self._init_generator, dtype=like.dtype, device=like.device)

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        """Why this algorithm does not fit `problem` (None when it does)."""
        return None

    # --- what subclasses provide -------------------------------------------------------------------
    def step(self) -> None:
        raise NotImplementedError

    def lower_variables(self) -> Tensor:
        """Current lower variables of all blocks, (m, d_y)."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, Any]:
        """Subclass state (tensors and nested state dicts)."""
        return {}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        pass

    # --- common protocol ----------------------------------------------------------------------------
    def oracle_counts(self) -> dict[str, int]:
        return dict(self.oracles.counts)

    def set_hyper(self, **changes: Any) -> None:
        """Changes hyper-parameters between iterations (restarts, schedules); validated."""
        config = self.config.replace(**changes)
        config.validate(self.problem)
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "iteration": self.iteration,
            "config": asdict(self.config),
            "x": self.x.clone(),
            "x_prev": self.x_prev.clone(),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "oracle_counts": self.oracle_counts(),
            "samplers": self.sampler_states(),
            "algorithm": self._tensors(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for algorithm {state['name']!r}, not {self.name!r}")
        self.iteration = int(state["iteration"])
        self.config = type(self.config)(**state["config"])
        self.x = state["x"].clone()
        self.x_prev = state["x_prev"].clone()
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        for key, sampler_state in state.get("samplers", {}).items():
            getattr(self, f"{key}_sampler").load_state_dict(sampler_state)
        for kind, count in state["oracle_counts"].items():
            self.oracles.counts[kind] = int(count)
        self._load_tensors(state["algorithm"])

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.x).all()) and bool(torch.isfinite(self.lower_variables()).all())
