"""What every algorithm shares: random streams, oracles, the upper iterate, its explicit `State`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from mbbo.blocks import BLOCK_SAMPLING, DelayedBlocks, MovingBlocks, check_block_strata
from mbbo.compilation import TimedCompiled, enable_persistent_cache
from mbbo.oracles import Oracles, XGrad
from mbbo.problem import Batch, MultiBlockProblem, RowSampler
from mbbo.state import (
    STATE_FORMAT,
    UNSET,
    expose_state,
    generator_states,
    load_dataclass,
    load_generator_states,
    snapshot,
)
from mbbo.steps import LOWER_LR_SCALINGS, revisit_scaled_step
from mbbo.validation import check_choice, check_int, check_optional, check_positive, check_unit

T = TypeVar("T")
STREAMS = ("blocks", "lower", "upper", "extra")
# the stream of `filled` (estimators initialised "uniform"), seeded apart from the others
INIT_STREAM, INIT_SEED_OFFSET = "init", 99
ESTIMATOR_INIT = ("first_batch", "uniform", "zeros")
# chunks when all estimators are initialised (one mini-batch per block): bound the oracles' working set
INIT_CHUNK_BLOCKS = 1024
INIT_CHUNK_ELEMENTS = 2**23


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

    def in_use(self, name: str) -> Any:
        """The value of hyper-parameter `name` in use: as configured; a Config whose default None stands for another
        value (F2SA's `lower_lr`: None = `lr`) resolves it here, so that a restart decays the value in use."""
        return getattr(self, name)


@dataclass
class MultiBlockConfig(Hyper):
    """Hyper-parameters every multi-block method has (defaults of the BSVRB/RSVRB scripts: m = 100, B = 10).

    `lower_lr` (tau) and, where present, `linsys_lr` (tau_v) left at None take the authors' value
    (`paper_steps`) scaled for the expected revisit interval m/B by `lower_lr_scaling`
    (`mbbo.steps.revisit_scaled_step`: "theory" = tau * min(1, 10 B / m), "none" = unscaled); a value set
    explicitly is used exactly as given unless `lower_lr_scaling` is set explicitly too.
    """

    block_batch: int = 10
    lr: float = 1e-3
    lower_lr: float | None = None
    beta: float = 0.9
    block_sampling: str = "uniform"
    block_strata: int = 1
    estimator_init: str = "first_batch"
    lower_lr_scaling: str | None = None

    # the authors' lower step sizes (run scripts, tuned at m / B = 10)
    paper_steps: ClassVar[dict[str, float]] = {"lower_lr": 0.5}

    def validate(self, problem: MultiBlockProblem) -> None:
        """`block_sampling`: "uniform" (B distinct blocks drawn independently per iteration, as analysed) or
        "reshuffle" (the authors' code: a permutation consumed B per iteration; `mbbo.blocks.BlockSampler`).
        `block_strata` S: 1 (as analysed), or B / S blocks from each of the S classes i mod S (an mbbo extension
        that balances block-sharded ranks; S divides m and B; `BlockSampler`).
        `estimator_init`: "first_batch" (one mini-batch per block at the start point), "uniform" (the authors'
        code: every estimator U[0, 1)) or "zeros"."""
        check_choice("block_sampling", self.block_sampling, BLOCK_SAMPLING)
        check_choice("estimator_init", self.estimator_init, ESTIMATOR_INIT)
        m = problem.num_blocks
        check_int("block_batch", self.block_batch, 1, m)
        check_block_strata(self.block_strata, m, self.block_batch)
        check_positive("lr", self.lr)
        for name in self.paper_steps:
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        check_optional(check_choice, "lower_lr_scaling", self.lower_lr_scaling, LOWER_LR_SCALINGS)
        check_unit("beta", self.beta)

    def step_size(self, name: str, num_blocks: int, revisit: bool = True) -> float:
        """The lower step size `name` in use: given or the authors', scaled for m / B (`revisit=False`: the
        method moves a block only when it samples it, so no steps accumulate between visits: no scaling)."""
        return revisit_scaled_step(getattr(self, name), self.paper_steps[name], self.lower_lr_scaling,
                                   num_blocks, self.block_batch if revisit else num_blocks)


class BilevelAlgorithm:
    """Base class: `step()` performs one iteration; the runner drives it (see `mbbo.protocols`).

    **State.** Everything an iteration changes lives in one dataclass, `self.state`, of the class's `State`
    type: the base declares the iteration counter, x and the previous x; each algorithm extends it with its
    lower variables, estimators, counters and building blocks (`MovingBlocks`, `BlockSampler`, step-rule states).
    Each field is also an attribute (`self.x` is `self.state.x`). `state_dict()` / `load_state_dict()` are derived
    from `State` (`mbbo.state.snapshot`), so an algorithm writes no save / load code; what is not declared
    is configuration or a cache, recomputed from the configuration.

    Random streams (`torch.Generator`, seeded from `seed`), saved beside the State: block sampling, lower data,
    upper data, an extra stream (second block sample, Neumann batches...) and the stream of `filled`, so that
    each estimator's fresh-sample assumption holds and the same seed gives the same trajectory. The row
    samplers' positions (reshuffling samplers) are saved beside them too. `compile=True` compiles the oracles.

    `oracle_calls_per_step()`: the oracle calls of one iteration after the first ({kind: count}, the kinds of
    `Oracles.counts`, counted per point and block), checked by the contract suite
    (tests/test_algorithm_contract.py); None where undeclared.
    """

    @dataclass
    class State:
        iteration: int = 0
        x: Tensor = UNSET
        x_prev: Tensor = UNSET

    name: ClassVar[str] = "base"
    Config: ClassVar[type[Hyper]] = Hyper
    # hyper-parameters a restart (RE-) divides at each stage; BSVRB's alpha, beta are estimator weights
    restart_decayed: ClassVar[tuple[str, ...]] = ("lr", "lower_lr", "linsys_lr", "alpha", "beta")
    # True for the methods whose per-block tables and hypergradient go through `self.shard`
    shardable: ClassVar[bool] = False
    # True for the methods whose iteration is sampling, then one update (`run_update`), then bookkeeping:
    # compile=True compiles that update as one graph (table reads and writes, oracles, trackers, hypergradient,
    # upper step; on a block-sharded rank, the part before the collective) instead of each oracle
    compiles_whole_update: ClassVar[bool] = False
    state: State
    iteration: int
    x: Tensor
    x_prev: Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        expose_state(cls)

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        self.state = self.State()
        config = config if config is not None else self.Config()
        if overrides:
            config = config.replace(**overrides)
        config.validate(problem)
        self.config = config
        self.problem = problem
        self.oracles = Oracles(problem)
        self.compiled_updates: dict[Callable[..., Any], TimedCompiled] | None = None  # compiled, by update
        if compile:
            self.use_compiled()
        device = problem.x0.device
        self.generators = {s: torch.Generator(device=device) for s in (*STREAMS, INIT_STREAM)}
        for i, s in enumerate(STREAMS):
            self.generators[s].manual_seed(int(seed) * 1_000_003 + i)
        self.generators[INIT_STREAM].manual_seed(int(seed) * 1_000_003 + INIT_SEED_OFFSET)
        self.seed = int(seed)
        self.x = problem.x0.clone()
        self.x_prev = self.x.clone()
        # own copies: a reshuffling sampler's position is this run's state (saved in `state_dict`)
        self.lower_sampler = copy.copy(problem.lower_sampler)
        self.upper_sampler = copy.copy(problem.upper_sampler)
        # the blocks this process owns (`mbbo.distributed.BlockShard`; all of them in a 1-process run)
        self.shard = problem.shard
        if self.shard.distributed and not self.shardable:
            raise ValueError(f"{self.name} does not run block-sharded over several processes; the methods that do: "
                             "bsvrb_v1, bsvrb_v2, ma_v1, ma_v2, rsvrb and their re_<name> variants")

    # --- compilation ---------------------------------------------------------------------------------
    def use_compiled(self) -> None:
        """Compile from now on (at any point of a run; same values): the update of `run_update` as one graph where
        the method has one (`compiles_whole_update`; block-sharded, the part before the collective, with a symbolic
        block dimension), else each oracle (`Oracles.use_compiled`)."""
        if self.compiles_whole_update:
            if self.compiled_updates is None:
                enable_persistent_cache()
                self.compiled_updates = {}
        else:
            self.oracles.use_compiled()

    @property
    def compiled(self) -> bool:
        return self.compiled_updates is not None or self.oracles.compiled

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in calls that compiled (the oracles' and the whole updates', `TimedCompiled`)."""
        updates = self.compiled_updates or {}
        return self.oracles.compile_seconds + sum(fn.seconds for fn in updates.values())

    def run_update(self, update: Callable[..., T], *args: Any) -> T:
        """`update(self, *args)`: an iteration between its sampling and its Python bookkeeping (it may write the
        algorithm's tensors in place, e.g. table rows, but no Python attribute that changes at every iteration,
        and returns the rest). Compiled as one graph under `use_compiled` (`TimedCompiled`: a signature's first
        call runs eagerly and records the oracle counts that the compiled calls replay; static shapes in one
        process, automatic dynamic shapes on a block-sharded rank, whose number of sampled blocks varies)."""
        if self.compiled_updates is None:
            return update(self, *args)
        compiled = self.compiled_updates.get(update)
        if compiled is None:
            def bound(*a: Any) -> T:
                return update(self, *a)

            # a block-sharded rank holds a varying number of the sampled blocks: a symbolic block dimension
            dynamic = None if self.problem.shard.distributed else False
            compiled = self.compiled_updates[update] = TimedCompiled(bound, dynamic=dynamic, counted=self.oracles)
        return compiled(*args)

    # --- sampling -----------------------------------------------------------------------------------
    def sample_batches(self, blocks: Tensor, batch_size: int | None = None, *, initial: bool = False
                       ) -> tuple[Batch, Batch]:
        """One lower and one upper mini-batch per block; `initial=True` for estimator initialisation, which a
        reshuffling row sampler serves outside its epochs (`RowSampler.sample_initial`)."""
        lower, upper, _ = self.sample_batches_and_rows(blocks, batch_size, initial=initial)
        return lower, upper

    def sample_batches_and_rows(self, blocks: Tensor, batch_size: int | None = None, *, initial: bool = False
                                ) -> tuple[Batch, Batch, tuple[Tensor | None, Tensor | None]]:
        """`sample_batches`, and on a block-sharded rank the rows drawn for all of `blocks` by each row sampler
        ((len(blocks), b) indices, None for a sampler that is not a `RowSampler`, and in a 1-process run): the
        rows of the other ranks' blocks, which every rank draws alike (`gather_xgrads` need not send them)."""
        keep = self.shard.owned(blocks)  # block-sharded: every rank draws for all blocks, keeps its own
        out: list[Batch] = []
        rows: list[Tensor | None] = []
        for sampler, stream in ((self.lower_sampler, "lower"), (self.upper_sampler, "upper")):
            generator = self.generators[stream]
            if keep is not None and isinstance(sampler, RowSampler):
                index = (sampler.draw_initial if initial else sampler.draw)(blocks, generator, batch_size)
                out.append(sampler.gather(blocks, index, keep))
                rows.append(index)
                continue
            draw = getattr(sampler, "sample_initial", sampler.sample) if initial else sampler.sample
            batch = draw(blocks, generator, batch_size)
            out.append(batch if keep is None else {k: v.index_select(0, keep) for k, v in batch.items()})
            rows.append(None)
        return out[0], out[1], (rows[0], rows[1])

    def sampler_states(self) -> dict[str, Any]:
        """State of the stateful (reshuffling) row samplers."""
        return {k: s.state_dict() for k, s in (("lower", self.lower_sampler), ("upper", self.upper_sampler))
                if hasattr(s, "state_dict")}

    def filled(self, like: Tensor, how: str) -> Tensor:
        """An estimator's initial value under `estimator_init` "uniform" (U[0, 1), as the authors' code, from the
        run's "init" stream) or "zeros"."""
        if how == "zeros":
            return torch.zeros_like(like)
        return torch.rand(like.shape, generator=self.generators[INIT_STREAM], dtype=like.dtype, device=like.device)

    def filled_table(self, like: Tensor, how: str) -> Tensor:
        """`filled` for a per-block table of this process's rows `like`: a block-sharded rank draws the
        table of all m blocks (as the 1-process run does) and keeps its rows."""
        if not self.shard.distributed or how == "zeros":
            return self.filled(like, how)
        return self.shard.table(self.filled(like.new_empty((self.problem.num_blocks, *like.shape[1:])), how))

    def blockwise_tables(self, rows: Callable[[Tensor, Batch, Batch], dict[str, Tensor]],
                         batch_size: int | None = None) -> dict[str, Tensor]:
        """Per-block tables (leading dimension m) built a chunk of blocks at a time: `rows(blocks, lower, upper)`
        returns each table's rows for the blocks (the local rows of the blocks this process owns: all of them
        in a 1-process run), from one mini-batch per block (of `batch_size`, drawn with
        `initial=True`: a reshuffling row sampler's epochs are left alone). O(m) once,
        with a bounded working set (initialising every block's estimators at m = 10^6 fits memory): the first
        chunk has INIT_CHUNK_BLOCKS blocks, the next ones as many as fit INIT_CHUNK_ELEMENTS elements of
        mini-batches and rows (measured on the first chunk). The oracles run eagerly here even when compiled."""
        m, device = self.problem.num_blocks, self.x.device
        tables: dict[str, Tensor] = {}
        start, chunk = 0, INIT_CHUNK_BLOCKS
        while start < m:
            blocks = torch.arange(start, min(start + chunk, m), device=device)
            lower, upper = self.sample_batches(blocks, batch_size, initial=True)
            local = self.shard.local(blocks)  # the table rows of the blocks this process owns
            with self.oracles.eager():  # one-off shapes: not worth compiling
                new = rows(local, lower, upper)
            for name, value in new.items():
                if name not in tables:
                    tables[name] = value.new_empty((self.shard.num_local, *value.shape[1:]))
                tables[name][local] = value
            if start == 0:
                per_block = sum(t.numel() for t in (*lower.values(), *upper.values(), *new.values())) / len(local)
                chunk = max(INIT_CHUNK_BLOCKS, int(INIT_CHUNK_ELEMENTS // max(per_block, 1.0)))
            start += len(blocks)
        return tables

    def hyper(self, name: str) -> Any:
        """The value of hyper-parameter `name` in use (resolved defaults included: `Hyper.in_use`)."""
        return self.config.in_use(name)

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

    # --- common protocol ----------------------------------------------------------------------------
    def oracle_counts(self) -> dict[str, int]:
        """Oracle calls so far, of all processes in a block-sharded run (a collective there)."""
        return self.shard.sum_counts(dict(self.oracles.counts))

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """The oracle calls one iteration (after the first) makes, by kind; None: not declared."""
        return None

    def set_hyper(self, **changes: Any) -> None:
        """Changes hyper-parameters between iterations (restarts, schedules); validated."""
        config = self.config.replace(**changes)
        config.validate(self.problem)
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        """The State (`"state"`, derived from its declaration), and beside it the configuration, the random
        generators, the row samplers and the oracle counters."""
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "config": asdict(self.config),
            "state": snapshot(self.state, f"{self.name} state"),
            "generators": generator_states(self.generators),
            "samplers": self.sampler_states(),
            "oracle_counts": dict(self.oracles.counts),  # this process's
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        found = state.get("format", 1)
        if found != STATE_FORMAT:
            raise ValueError(
                f"the checkpoint holds algorithm state format {found!r}, this mbbo reads format {STATE_FORMAT} (one "
                "declared State per algorithm, since issue 11): a run checkpointed by an older mbbo cannot be "
                "resumed; start it afresh (--overwrite)")
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for algorithm {state['name']!r}, not {self.name!r}")
        self.config = type(self.config)(**state["config"])
        load_dataclass(self.state, state["state"], f"{self.name} state")
        load_generator_states(self.generators, state["generators"])
        for key, sampler_state in state.get("samplers", {}).items():
            getattr(self, f"{key}_sampler").load_state_dict(sampler_state)
        for kind, count in state["oracle_counts"].items():
            self.oracles.counts[kind] = int(count)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.x).all()) and bool(torch.isfinite(self.lower_variables()).all())

    def state_tensors(self) -> list[Tensor]:
        """The State's tensor fields (not those inside its building blocks)."""
        return [v for f in fields(self.state) if isinstance(v := getattr(self.state, f.name), Tensor)]


expose_state(BilevelAlgorithm)


class MultiBlockAlgorithm(BilevelAlgorithm):
    """Base of the methods configured by a `MultiBlockConfig`: resolves their lower step sizes for m / B."""

    # False for methods that move a block only when they sample it (no steps accumulate between visits)
    accumulates_lower_steps: ClassVar[bool] = True
    y: MovingBlocks | DelayedBlocks  # the lower variables of all blocks

    def lower_variables(self) -> Tensor:
        """Current lower variables of this process's blocks (all m in a 1-process run), one row per block."""
        return self.y.current_all(self.iteration)

    def lower_variables_of(self, blocks: Tensor) -> Tensor:
        """Current lower variables of the given blocks (owned by this process), (len(blocks), d_y):
        O(len(blocks))."""
        return self.y.current(self.shard.rows(blocks), self.iteration)

    def gather_xgrads(self, xgrads: list[XGrad | None], blocks: Tensor, *, uniform: bool = True,
                      rows: Sequence[Tensor | None] = ()) -> list[XGrad | None]:
        """The reduction hook of block sharding: per-block x-space quantities computed for the blocks of the
        global sample `blocks` that this process owns, completed with the other processes' rows in the order
        of `blocks` (one collective for all of them; the quantities themselves in a 1-process run), so that
        the mean over blocks that follows is the 1-process one bit for bit. `uniform=False`: row sizes may
        differ across processes (`BlockShard.gather`). `rows[k]`: the x-rows of `xgrads[k]` (sparse x) for all of
        `blocks`, known to every rank (`sample_batches_and_rows`): only the values are sent."""
        if not self.shard.distributed:
            return xgrads
        known = list(rows) + [None] * (len(xgrads) - len(rows))
        present = [(g, r) for g, r in zip(xgrads, known, strict=True) if g is not None]
        parts: list[tuple[Tensor, int]] = []
        for g, r in present:
            parts.append((g.values, 1))
            if g.index is not None and r is None:
                parts.append((g.index, 0))
        full = iter(self.shard.gather(parts, blocks, uniform=uniform))
        done = {}
        for g, r in present:
            values = next(full)
            done[id(g)] = XGrad(values, None if g.index is None else (r if r is not None else next(full)))
        return [None if g is None else done[id(g)] for g in xgrads]

    def hyper(self, name: str) -> Any:
        """Lower step sizes resolved for m / B (`MultiBlockConfig.step_size`); others as configured."""
        cfg = self.config
        assert isinstance(cfg, MultiBlockConfig)
        if name in cfg.paper_steps:
            return cfg.step_size(name, self.problem.num_blocks, revisit=self.accumulates_lower_steps)
        return super().hyper(name)

    def set_hyper(self, **changes: Any) -> None:
        """As `BilevelAlgorithm.set_hyper`; the lower step sizes in use are pinned first (made explicit, scaling
        "none"), so that a change of one (a restart's decay) neither rescales it nor moves the others."""
        cfg = self.config
        assert isinstance(cfg, MultiBlockConfig)
        if "lower_lr_scaling" not in changes:
            pinned: dict[str, Any] = {name: self.hyper(name) for name in cfg.paper_steps}
            changes = {**pinned, "lower_lr_scaling": "none", **changes}
        super().set_hyper(**changes)
