"""The runner: the loop that steps an algorithm, evaluates it, logs, checkpoints and resumes.

It knows neither the maths nor the data format: it drives any :class:`mbbo.protocols.SteppableAlgorithm`
and evaluates with any :class:`mbbo.protocols.EvaluableTask`.

Files in `out_dir`:

- `config.json`: `extra_config` (the resolved experiment configuration) plus the run configuration under
  the key `"runner"`, written atomically at the start (and again when `compile_auto` has chosen, with the
  choice under `"compile_choice"`).
- `metrics.jsonl`: one record per evaluation (see :func:`run`), appended and fsynced record by record.
- `checkpoint.pt`: `{"format_version", "algorithm": state_dict, "runner": {...}, "config": ...}`, written
  atomically: by default after an evaluation whenever that keeps the time spent writing checkpoints under
  2 % of the wall time, at least every `checkpoint_seconds` (300 s), on SIGINT/SIGTERM and at the end; or
  exactly every `checkpoint_every` iterations (and at the end) when that is given.
- `.mbbo.lock`: held (`flock`) while a run writes in `out_dir`, so that two runs never mix their files.

Resuming (`resume=True`) reloads the checkpoint, drops the records written after it and continues; the final
state and the log (except `time`) are bit-identical to an uninterrupted run, provided `step()` is a
deterministic function of `state_dict()`. A resumed run must have the configuration it started with (only
the budget, evaluation and checkpoint frequencies, threads and compilation may change): anything else is
refused before a file is touched, naming each key with both values.

Multi-process (block-sharded) runs, `run(..., group=...)` with a :class:`mbbo.distributed.RankGroup` of R > 1
processes, each in its own `out_dir` (the CLI: OUT for rank 0, OUT/rank<r> for the others): every rank
evaluates (the task reduces over the ranks) but only rank 0 writes `metrics.jsonl`. A checkpoint is a set:
each rank writes its state (its blocks' tables and the replicated state) atomically to `out_dir/shard-<N>.pt`;
after a barrier, rank 0 writes `checkpoint.pt`, a manifest (`"distributed"`: world size, partition,
iteration N) with the runner's state; each rank keeps its shard files of this and the previous checkpoint
(older ones and stale ones of an earlier run go), so the manifest always names
a complete set, whichever rank is killed when. Without `checkpoint_every`, rank 0 decides at each evaluation
whether a checkpoint is due (its time budget) and the others follow. Resuming reads the manifest on rank 0
and broadcasts it; a different number of processes is refused, saying how many to use. SIGINT/SIGTERM are
not turned into a clean stop there (one rank stopping alone would leave the others waiting): resume from the
last checkpoint set.

Guards: a non-finite state (NaN/inf) or a finite but exploding one (the norm of the iterate `x`, or a loss
metric: `*loss`, `objective`, `value`, larger than `divergence_factor` times its initial magnitude, floored at
1) stops the run with :class:`DivergenceError`, keeping the last good checkpoint. SIGINT and SIGTERM write a
checkpoint at the end of the current step and raise :class:`RunInterrupted`. In a multi-process run the ranks
agree every `STOP_POLL_ITERATIONS` iterations (one small all_reduce) whether any of them got a signal, and then all
write the checkpoint set of the same iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mbbo.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from mbbo.compilation import AUTO_MIN_EAGER_SECONDS, should_compile
from mbbo.metrics_log import MetricsLog
from mbbo.protocols import EvaluableTask, SteppableAlgorithm
from mbbo.validation import check_real

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "RESERVED_KEYS",
    "DivergenceError",
    "RunConfig",
    "RunInterrupted",
    "RunLockedError",
    "RunWriteError",
    "run",
    "state_is_finite",
]

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".mbbo.lock"
#: Default checkpoints may cost at most this fraction of the wall time.
CHECKPOINT_BUDGET = 0.02
#: Configuration keys that may change when a run is resumed.
RESUMABLE_CHANGES = frozenset({"threads", "compile", "compile_choice", "torch_version", "mbbo_version"})
RESERVED_KEYS = ("iteration", "epoch", "time", "compile_time", "oracle_calls")
#: multi-process runs: iterations between two agreements on a pending SIGINT/SIGTERM (one all_reduce each)
STOP_POLL_ITERATIONS = 10
#: `compile_auto`: timed eager iterations (after the first one of the process) before deciding.
AUTO_PROBE_ITERATIONS = 10
RUNNER_KEY = "runner"
CHECKPOINT_FORMAT = 1
SHARD_FILE = "shard-{:09d}.pt"
PARTITION = "block i on rank i mod R"


class DivergenceError(RuntimeError):
    """The algorithm's state became non-finite (NaN or inf), or finite but exploding.

    Attributes:
        iteration: the iteration at which the divergence was detected.
        records: the metrics records written before it (also on disk in `metrics.jsonl`).
    """

    def __init__(self, iteration: int, records: list[dict[str, Any]], detail: str = "", *,
                 what: str = "non-finite (NaN/inf) algorithm state detected") -> None:
        self.iteration = iteration
        self.records = records
        message = f"{what} at iteration {iteration}"
        super().__init__(f"{message}{': ' + detail if detail else ''}")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; a checkpoint of the last completed step was written if possible.

    Attributes:
        signum: the signal; `exit_code` is 128 + signum, as a shell reports it.
        iteration: the iteration of the checkpoint (None when the run had not started).
        message: what happened and how to continue.
    """

    def __init__(self, signum: int, iteration: int | None = None, message: str = "") -> None:
        self.signum = signum
        self.iteration = iteration
        self.exit_code = 128 + signum
        self.message = message or f"interrupted by {signal.Signals(signum).name}"
        super().__init__(self.message)


class RunLockedError(RuntimeError):
    """Another process is running in the same output folder."""


class RunWriteError(RuntimeError):
    """A file of the run could not be written (full or read-only disk); says what was kept."""


@dataclass(kw_only=True)
class RunConfig:
    """How long to run, how often to evaluate and checkpoint, and where to write.

    Exactly one of `iterations` and `epochs` is given; epochs convert to iterations through
    `task.iterations_per_epoch()` (rounded up, see :meth:`total_iterations`).

    Attributes:
        iterations: number of iterations (calls to `step()`), >= 1.
        epochs: number of epochs, > 0.
        eval_every: evaluate every this many iterations (and always at iteration 0 and at the end).
        checkpoint_every: checkpoint every this many iterations (and always at the end); None (default):
            after evaluations, as often as keeps the checkpoint time under 2 % of the wall time, and at
            least every `checkpoint_seconds`.
        checkpoint_seconds: with `checkpoint_every=None`, the longest wall time between two checkpoints
            (None: no time bound).
        divergence_factor: stop when the iterate's norm or a metric's magnitude exceeds this factor times
            its initial magnitude (floored at 1); None disables the check (NaN/inf always stop a run).
        out_dir: directory for `config.json`, `metrics.jsonl` and `checkpoint.pt` (created if missing).
        progress: show a tqdm progress bar (it also hides itself when stderr is not a terminal).
        overwrite: allow a fresh run (`resume=False`) into a directory that already holds a run.
        compile_auto: after `AUTO_PROBE_ITERATIONS` timed eager iterations (not counting the first one of the
            process), compile the algorithm (`algorithm.use_compiled()`: its whole update or its oracles) when
            `mbbo.compilation.should_compile` says that the rest of the run repays it; the choice and its
            inputs are recorded in `config.json` under `compile_choice`. In a multi-process run every rank
            decides on rank 0's timing (broadcast), so that all ranks choose alike.
    """

    out_dir: Path
    iterations: int | None = None
    epochs: float | None = None
    eval_every: int = 1
    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = 300.0
    divergence_factor: float | None = 1e8
    progress: bool = True
    overwrite: bool = False
    compile_auto: bool = False

    def __post_init__(self) -> None:
        """Validate every field, naming the bad one."""
        self.out_dir = Path(self.out_dir)
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError(
                f"give exactly one of iterations and epochs (got iterations={self.iterations!r}, "
                f"epochs={self.epochs!r})"
            )
        if self.iterations is not None:
            _check_positive_int("iterations", self.iterations)
        if self.epochs is not None and not (isinstance(self.epochs, int | float) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        _check_positive_int("eval_every", self.eval_every)
        if self.checkpoint_every is not None:
            _check_positive_int("checkpoint_every", self.checkpoint_every)
        for name in ("checkpoint_seconds", "divergence_factor"):
            value = getattr(self, name)
            if value is not None:
                check_real(name, value, 0.0, None, low_open=True)
        if self.divergence_factor is not None and self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1 (or None to disable), got {self.divergence_factor!r}")

    def total_iterations(self, iterations_per_epoch: float) -> int:
        """The number of iterations to run: `iterations`, or `ceil(epochs * iterations_per_epoch)`.

        A relative tolerance of 1e-9 guards against float noise (0.1 epoch of 30 iterations is 3, not 4).
        """
        if self.iterations is not None:
            return self.iterations
        assert self.epochs is not None
        exact = self.epochs * iterations_per_epoch
        return max(1, math.ceil(exact - 1e-9 * max(1.0, exact)))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-compatible values (`out_dir` as a string)."""
        values = dataclasses.asdict(self)
        values["out_dir"] = str(self.out_dir)
        return values


def _check_positive_int(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` unless `value` is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _walk_floats(value: Any) -> Iterator[Any]:
    """Yield every floating/complex tensor and Python float inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield value
    elif isinstance(value, float):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _walk_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk_floats(item)


def state_is_finite(state: Any) -> bool:
    """True when every floating tensor and float in a (nested) state dict is finite."""
    for value in _walk_floats(state):
        if isinstance(value, float):
            if not math.isfinite(value):
                return False
        elif not bool(torch.isfinite(value).all()):
            return False
    return True


def _to_builtin(value: Any) -> Any:
    """Turn tensors and numpy values into Python numbers (or lists); leave everything else alone."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _json_compatible(config: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of `config` (paths and other objects become strings)."""
    return json.loads(json.dumps(config, default=str))


def _resolved_config(config: RunConfig, extra_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """`extra_config` plus the run configuration under `"runner"`, as JSON-compatible values."""
    extra = dict(extra_config or {})
    if RUNNER_KEY in extra:
        raise ValueError(f"extra_config must not contain the key {RUNNER_KEY!r} (reserved for the runner)")
    return _json_compatible({**extra, RUNNER_KEY: config.to_dict()})


def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
    """The progress-bar postfix: epoch and every scalar metric of the last evaluation, shortly formatted."""
    shown = {"epoch": record.get("epoch")}
    shown.update({key: value for key, value in record.items() if key not in RESERVED_KEYS})
    return {
        key: f"{value:.4g}" if isinstance(value, float) else str(value)
        for key, value in shown.items()
        if isinstance(value, int | float | str) and not isinstance(value, bool)
    }


def _is_loss(name: str) -> bool:
    """Metrics the growth guard watches: losses and objectives (`*loss`, `objective`, `value`), not counters
    (rounds, bytes) or scores that may legitimately grow."""
    return name.endswith("loss") or name in ("objective", "value")


def _norm(value: Any) -> float | None:
    """The Euclidean norm of a floating tensor (None for anything else)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return float(torch.linalg.vector_norm(value.detach()))
    return None


@dataclass
class _Run:
    """The state of one call to :func:`run` (kept small: each method does one thing)."""

    algorithm: SteppableAlgorithm
    task: EvaluableTask
    config: RunConfig
    resolved: dict[str, Any]
    total: int
    iterations_per_epoch: float
    iteration: int = 0
    elapsed: float = 0.0
    log: MetricsLog | _RecordsInMemory | None = None
    last_checkpoint: int | None = None
    bar: Any = field(default=None, repr=False)
    # scales of the divergence guard: max(1, |initial value|) of the iterate's norm and of each metric
    scales: dict[str, float] = field(default_factory=dict)
    last_checkpoint_wall: float = field(default_factory=time.perf_counter)
    checkpoint_cost: float = 0.0
    checkpoint_total: float = 0.0  # seconds spent writing checkpoints in this process
    started_wall: float = field(default_factory=time.perf_counter)
    stop_signal: int | None = None
    compile_time: float = 0.0  # seconds of torch.compile (construction and steps), kept out of `elapsed`
    probe: list[float] = field(default_factory=list)  # eager step times for `compile_auto`
    compile_decided: bool = False
    group: Any = None  # a RankGroup in a multi-process run

    @property
    def writes_log(self) -> bool:
        """Only rank 0 of a multi-process run writes metrics.jsonl."""
        return self.group is None or self.group.rank == 0

    @property
    def out_dir(self) -> Path:
        """The run directory."""
        return self.config.out_dir

    def eval_due(self, iteration: int) -> bool:
        """Evaluations happen at 0, every `eval_every` iterations and at the end."""
        return iteration == 0 or iteration % self.config.eval_every == 0 or iteration == self.total

    def checkpoint_due(self, iteration: int, evaluated: bool) -> bool:
        """At the end; every `checkpoint_every` iterations if given; else after an evaluation when the last
        write cost at most 2 % of the time since, and at least every `checkpoint_seconds`."""
        every = self.config.checkpoint_every
        if iteration == self.total:
            return True
        if every is not None:
            return iteration % every == 0
        if self.group is not None:
            # the ranks must agree: rank 0's time-based decision, at evaluations only (which all ranks share)
            return bool(evaluated and self.group.broadcast(self.timely(evaluated)))
        return self.timely(evaluated)

    def timely(self, evaluated: bool) -> bool:
        """The default rule's time part: the 2 % budget after an evaluation, or `checkpoint_seconds`."""
        since = time.perf_counter() - self.last_checkpoint_wall
        floor = self.checkpoint_cost / CHECKPOINT_BUDGET
        if evaluated and since >= floor:
            return True
        bound = self.config.checkpoint_seconds
        return bound is not None and since >= max(bound, floor)

    def records(self) -> list[dict[str, Any]]:
        """Records written so far."""
        return self.log.records if self.log is not None else []

    def kept(self) -> str:
        """What is safe on disk: the metrics and the last good checkpoint."""
        records = self.records()
        kept = f"metrics up to iteration {records[-1]['iteration']} in " if records else "no metrics in "
        kept += str(self.out_dir / METRICS_FILE)
        if self.last_checkpoint is None:
            return kept + "; no checkpoint written"
        path = self.out_dir / CHECKPOINT_FILE
        return kept + f"; last good checkpoint (iteration {self.last_checkpoint}) at {path}"

    def diverged(self, detail: str, **kwargs: Any) -> DivergenceError:
        """The error to raise for a diverged state at the current iteration, saying what was kept."""
        return DivergenceError(self.iteration, self.records(), f"{detail} ({self.kept()})", **kwargs)

    def check_growth(self, name: str, value: float | None) -> None:
        """The divergence guard: `value` may not exceed `divergence_factor` times its initial magnitude."""
        factor = self.config.divergence_factor
        if value is None or factor is None or not math.isfinite(value):
            return
        scale = self.scales.setdefault(name, max(1.0, abs(value)))
        if abs(value) > factor * scale:
            raise self.diverged(
                f"{name} reached {value:.3g}, more than divergence_factor={factor:g} times its initial magnitude "
                f"{scale:.3g}; the likely cause is a step size too large for this problem (lower lr, or the "
                "lower-level step size)", what="the run diverged")

    def write(self, path: Path, action: Any) -> None:
        """Run a write; a full or read-only disk becomes a RunWriteError naming the file and what is kept."""
        try:
            action()
        except OSError as exc:
            raise RunWriteError(f"could not write {path}: {exc.strerror or exc}; {self.kept()}") from exc

    def evaluate(self) -> dict[str, Any]:
        """Evaluate (no grad, untimed), check for growth, log the record and show it on the progress bar."""
        assert self.log is not None
        with torch.no_grad():
            metrics = self.task.evaluate(self.algorithm)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"task.evaluate must return a dict, got {type(metrics).__name__}")
        clashes = sorted(set(metrics) & set(RESERVED_KEYS))
        if clashes:
            raise ValueError(f"task.evaluate returned reserved key(s) {clashes}; rename them")
        record = {
            "iteration": self.iteration,
            "epoch": self.iteration / self.iterations_per_epoch,
            "time": self.elapsed,
            "compile_time": self.compile_time,
            "oracle_calls": {str(k): int(v) for k, v in self.algorithm.oracle_counts().items()},
            **{str(key): _to_builtin(value) for key, value in metrics.items()},
        }
        for key, value in record.items():
            if _is_loss(key) and isinstance(value, int | float) and not isinstance(value, bool):
                self.check_growth(f"metric {key!r}", float(value))
        log = self.log
        self.write(log.path, lambda: log.append(record))
        if self.bar is not None:
            self.bar.set_postfix(_postfix(record), refresh=False)
        return record

    def payload(self, state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds."""
        records = self.records()
        return {
            "format_version": CHECKPOINT_FORMAT,
            "algorithm": state,
            "runner": {"iteration": self.iteration, "elapsed": self.elapsed, "total": self.total,
                       "compile_time": self.compile_time,
                       "scales": dict(self.scales),
                       "last_record": records[-1]["iteration"] if records else None,
                       # the checkpoint cost of this process so far (before this write), for measurement
                       "checkpoint_seconds": self.checkpoint_total,
                       "wall_seconds": time.perf_counter() - self.started_wall},
            "config": self.resolved,
        }

    def save(self, state: dict[str, Any]) -> None:
        """Write the checkpoint atomically and remember what it cost."""
        start = time.perf_counter()
        path = self.out_dir / CHECKPOINT_FILE
        if self.group is not None:
            self.save_set(state)
        else:
            self.write(path, lambda: save_checkpoint(path, self.payload(state)))
        self.last_checkpoint = self.iteration
        self.last_checkpoint_wall = time.perf_counter()
        self.checkpoint_cost = self.last_checkpoint_wall - start
        self.checkpoint_total += self.checkpoint_cost

    def save_set(self, state: dict[str, Any]) -> None:
        """Multi-process checkpoint: this rank's shard, a barrier, rank 0's manifest, then old shards go."""
        shard = self.out_dir / SHARD_FILE.format(self.iteration)
        self.write(shard, lambda: save_checkpoint(shard, self.payload(state)))
        self.group.barrier()  # every shard of this iteration is on disk
        if self.group.rank == 0:
            manifest = {k: v for k, v in self.payload({}).items() if k != "algorithm"}
            manifest["distributed"] = {"world_size": self.group.world_size, "partition": PARTITION,
                                       "iteration": self.iteration, "shard_file": shard.name}
            path = self.out_dir / CHECKPOINT_FILE
            self.write(path, lambda: save_checkpoint(path, manifest))
        # the manifest names this set or the previous one (until rank 0 has written it): keep exactly these two
        keep = {SHARD_FILE.format(i) for i in (self.iteration, self.last_checkpoint) if i is not None}
        for old in self.out_dir.glob("shard-*.pt"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    @property
    def checks_each_step(self) -> bool:
        """The algorithm has a per-step `is_finite()` (O(what the step wrote)), so the whole state need not be
        scanned again at evaluations."""
        return callable(getattr(self.algorithm, "is_finite", None))

    def check_iterate(self) -> None:
        """The growth guard on the iterate (O(d_x))."""
        self.check_growth("the norm of the iterate x", _norm(getattr(self.algorithm, "x", None)))

    def checked_state(self) -> dict[str, Any]:
        """`state_dict()` after the NaN/inf guard (unless every step is checked) and the growth guard."""
        state = self.algorithm.state_dict()
        if not self.checks_each_step and not state_is_finite(state):
            raise self.diverged("a floating tensor in state_dict() is not finite")
        self.check_iterate()
        return state

    def step(self) -> None:
        """One timed `algorithm.step()` (its compilation time counted apart), then the cheap finite check if
        the algorithm offers one."""
        compiled_before = _compile_seconds(self.algorithm)
        start = time.perf_counter()
        self.algorithm.step()
        seconds = time.perf_counter() - start
        compiling = _compile_seconds(self.algorithm) - compiled_before
        self.compile_time += compiling
        self.elapsed += seconds - compiling
        self.iteration += 1
        if self.config.compile_auto and not self.compile_decided:
            self.probe_compile(seconds)
        is_finite = getattr(self.algorithm, "is_finite", None)
        if callable(is_finite) and not is_finite():
            raise self.diverged("algorithm.is_finite() returned False")

    def after_step(self) -> None:
        """Evaluate and/or checkpoint if due; a diverged state is never evaluated nor saved."""
        state = None
        evaluated = self.eval_due(self.iteration)
        if evaluated:
            # no state copy at an evaluation when each step was checked (at m = 10^6 the state is GBs)
            if self.checks_each_step:
                self.check_iterate()
            else:
                state = self.checked_state()
            self.evaluate()
        # decided after the evaluation, whose time counts in the 2 % budget of the default rule
        if self.checkpoint_due(self.iteration, evaluated):
            self.save(state if state is not None else self.checked_state())

    def probe_compile(self, seconds: float) -> None:
        """`compile_auto`: time eager steps (the process's first one excluded), then decide once."""
        self.probe.append(seconds)
        if len(self.probe) <= AUTO_PROBE_ITERATIONS and self.iteration < self.total:
            return
        self.compile_decided = True
        timed = self.probe[1:] or self.probe
        per_iteration = sum(timed) / len(timed)
        if self.group is not None:  # the ranks' timings differ: all follow rank 0's
            per_iteration = float(self.group.broadcast(per_iteration))  # type: ignore[arg-type]
        remaining = self.total - self.iteration
        use_compiled = getattr(self.algorithm, "use_compiled", None)
        compilable = callable(use_compiled)
        chosen = compilable and should_compile(per_iteration, remaining)
        if chosen:
            use_compiled()  # type: ignore[misc]
        self.resolved["compile_choice"] = {
            "compiled": chosen, "decided_at_iteration": self.iteration, "remaining_iterations": remaining,
            "eager_ms_per_iteration": 1e3 * per_iteration, "compilable": compilable,
            "rule": f"compile iff eager_ms_per_iteration * remaining_iterations > {AUTO_MIN_EAGER_SECONDS:g} s "
                    "(mbbo.compilation.should_compile)"}
        _write_config(self)

    def stop(self, signum: int) -> None:
        """Checkpoint the last completed step (unless done already) and raise RunInterrupted."""
        if self.last_checkpoint != self.iteration:
            self.save(self.checked_state())
        resume = "--resume"
        if self.group is not None:
            self.group.barrier()  # rank 0's manifest is on disk before any rank exits
            resume += f" --nproc {self.group.world_size}"
        name = signal.Signals(signum).name
        raise RunInterrupted(signum, self.iteration, (
            f"stopped by {name} after iteration {self.iteration}; checkpoint written to "
            f"{self.out_dir / CHECKPOINT_FILE}. Continue with: mbbo run --out {self.out_dir} {resume}"))

    def pending_signal(self) -> int | None:
        """The signal to stop on before the next step: this process's; in a multi-process run, the largest any
        rank got, agreed every `STOP_POLL_ITERATIONS` iterations (all ranks stop at the same iteration)."""
        if self.group is None:
            return self.stop_signal
        if self.iteration % STOP_POLL_ITERATIONS:
            return None
        return self.group.max_signal(self.stop_signal)

    def loop(self) -> None:
        """Step until `total` iterations (stopping cleanly on a signal), updating the progress bar."""
        while self.iteration < self.total:
            signum = self.pending_signal()
            if signum is not None:
                self.stop(signum)
            self.step()
            self.after_step()
            if self.bar is not None:
                self.bar.update(1)

    @contextlib.contextmanager
    def signals_stop_cleanly(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag that the loop reads between steps; a second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise RunInterrupted(signum, None, f"stopped by a second {signal.Signals(signum).name} "
                                                   f"in the middle of a step; {self.kept()}")
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _compile_seconds(algorithm: SteppableAlgorithm) -> float:
    """Compilation seconds so far of the algorithm (`BilevelAlgorithm.compile_seconds`: its oracles and whole
    updates), 0 for an algorithm that does not compile."""
    return float(getattr(algorithm, "compile_seconds", 0.0))


def _write_config(state: _Run) -> None:
    """Write `config.json` (the resolved configuration) atomically."""
    config_text = json.dumps(state.resolved, indent=2, sort_keys=True) + "\n"
    config_path = state.out_dir / CONFIG_FILE
    state.write(config_path, lambda: atomic_write_text(config_path, config_text))


def _check_fresh_dir(config: RunConfig) -> None:
    """Refuse to clobber an existing run unless `overwrite`; with it, remove the stale checkpoint."""
    checkpoint = config.out_dir / CHECKPOINT_FILE
    if config.overwrite:
        for shard in config.out_dir.glob("shard-*.pt"):
            shard.unlink(missing_ok=True)
    existing = [name for name in (CHECKPOINT_FILE, METRICS_FILE) if (config.out_dir / name).exists()]
    if existing and not config.overwrite:
        raise FileExistsError(
            f"{config.out_dir} already holds a run ({', '.join(existing)}); pass resume=True to continue it "
            f"or overwrite=True to start again"
        )
    checkpoint.unlink(missing_ok=True)


def _start_fresh(state: _Run) -> None:
    """Start a new log and evaluate the initial iterate (iteration 0)."""
    if state.checks_each_step:
        if not state.algorithm.is_finite():  # type: ignore[attr-defined]
            raise state.diverged("the initial state is not finite (algorithm.is_finite() returned False)")
        state.check_iterate()
    else:
        state.checked_state()
    log_path = state.out_dir / METRICS_FILE
    if state.writes_log:
        state.write(log_path, lambda: setattr(state, "log", MetricsLog(log_path)))
    else:
        state.log = _RecordsInMemory(log_path)
    state.evaluate()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"hyper": {"lr": 1}}` -> `{"hyper.lr": 1}` (for naming the keys that differ)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_config_change(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """A resumed run keeps its configuration: refuse any change beyond the budget, frequencies, threads,
    compilation and versions, naming every changed key with both values."""
    old = _flatten({k: v for k, v in saved.items() if k != RUNNER_KEY})
    new = _flatten({k: v for k, v in current.items() if k != RUNNER_KEY})
    changed = sorted(key for key in set(old) | set(new)
                     if key.split(".")[0] not in RESUMABLE_CHANGES and old.get(key) != new.get(key))
    if changed:
        listed = "; ".join(f"{key}: {old.get(key, '(absent)')!r} in the checkpoint, {new.get(key, '(absent)')!r} now"
                           for key in changed)
        raise ValueError(
            f"cannot resume {path}: the configuration differs from the run's ({listed}). A run resumes with the "
            "configuration it started with (only the budget, eval/checkpoint frequencies, threads and compile may "
            "change); drop the changed options, or start a new run in another folder to change them"
        )
    versions = [k for k in ("torch_version", "mbbo_version") if old.get(k) != new.get(k)]
    if versions:
        warnings.warn(f"resuming {path} under other versions: "
                      + "; ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in versions), RuntimeWarning, stacklevel=4)


def _manifest_of_set(state: _Run) -> dict[str, Any]:
    """Multi-process resume: rank 0 reads and checks the manifest, every rank gets it (or the error)."""
    group = state.group
    path = state.out_dir / CHECKPOINT_FILE
    found: Any = None
    if group.rank == 0:
        try:
            manifest = load_checkpoint(path)
            info = manifest.get("distributed")
            if info is None:
                raise CheckpointError(f"{path} was written by a 1-process run; resume it without --nproc / torchrun "
                                      "(re-sharding a checkpoint to several processes is not supported)")
            if info["world_size"] != group.world_size:
                raise CheckpointError(
                    f"{path} was written by {info['world_size']} processes and this run has {group.world_size}; "
                    f"resume with --nproc {info['world_size']} (or torchrun --nproc-per-node "
                    f"{info['world_size']}), or start a new run with --overwrite (re-sharding a checkpoint to "
                    "another number of processes is not supported)")
            found = {"manifest": manifest}
        except (CheckpointError, KeyError, TypeError) as exc:
            found = {"error": f"cannot resume: {exc}"}
    found = group.broadcast(found)
    if "error" in found:
        raise CheckpointError(found["error"])
    return found["manifest"]


def _load_for_resume(state: _Run) -> dict[str, Any]:
    """Read the checkpoint and check it against this run (before anything in `out_dir` is written)."""
    path = state.out_dir / CHECKPOINT_FILE
    if state.group is not None:
        manifest = _manifest_of_set(state)
        path = state.out_dir / SHARD_FILE.format(manifest["distributed"]["iteration"])
    try:
        payload = load_checkpoint(path)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(f"cannot resume: no checkpoint at {path}") from exc
    if state.group is None and "distributed" in payload:
        world = payload["distributed"]["world_size"]
        raise CheckpointError(f"cannot resume: {path} is the manifest of a run of {world} processes; resume with "
                              f"--nproc {world} (or torchrun --nproc-per-node {world})")
    missing = sorted({"algorithm", "runner"} - set(payload))
    if missing or not isinstance(payload.get("runner"), Mapping) or "iteration" not in payload["runner"]:
        raise CheckpointError(f"checkpoint {path} lacks {missing or ['runner.iteration']}; was it written by "
                              "mbbo.runner?")
    if payload["runner"]["iteration"] > state.total:
        raise ValueError(
            f"checkpoint {path} is at iteration {payload['runner']['iteration']}, past the requested "
            f"{state.total} iterations"
        )
    _check_config_change(path, payload.get("config", {}), state.resolved)
    try:
        state.algorithm.load_state_dict(payload["algorithm"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this algorithm ({type(exc).__name__}: {exc}); it was written by "
            "another algorithm, problem size or mbbo version"
        ) from exc
    return payload


def _resume(state: _Run, payload: dict[str, Any]) -> None:
    """Continue from the loaded checkpoint: trim the log to its iteration, evaluate there if due."""
    runner = payload["runner"]
    state.iteration = int(runner["iteration"])
    state.elapsed = float(runner["elapsed"])
    state.compile_time += float(runner.get("compile_time", 0.0))
    state.scales = dict(runner.get("scales", {}))
    state.last_checkpoint = state.iteration
    keep_current = state.eval_due(state.iteration)
    path = state.out_dir / METRICS_FILE
    if not state.writes_log:
        state.log = _RecordsInMemory(path)
        if state.group.broadcast(None):  # rank 0's decision below: all ranks evaluate together
            state.evaluate()
        return
    state.write(path, lambda: setattr(state, "log", MetricsLog.resume(
        path, until=state.iteration, include_until=keep_current)))
    records = state.records()
    expected = runner.get("last_record")
    kept_expected = expected is not None and (expected < state.iteration or keep_current)
    if kept_expected and not any(r["iteration"] == expected for r in records):
        have = records[-1]["iteration"] if records else "no record"
        raise CheckpointError(
            f"{path} ends at iteration {have}, but the checkpoint was written after its record of iteration "
            f"{expected}: the log was truncated or replaced. Restore it, or start afresh with --overwrite"
        )
    again = keep_current and not (records and records[-1]["iteration"] == state.iteration)
    if state.group is not None:
        state.group.broadcast(again)
    if again:
        state.evaluate()


def _iterations_per_epoch(task: EvaluableTask) -> float:
    """`task.iterations_per_epoch()`, validated (a positive number: epochs may be fractional)."""
    value = task.iterations_per_epoch()
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"task.iterations_per_epoch() must be a positive number, got {value!r}")
    return value


class _RecordsInMemory:
    """The log of a rank > 0 of a multi-process run: records kept in memory, no file (rank 0 writes it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] = []

    @property
    def records(self) -> list[dict[str, Any]]:
        return [dict(record) for record in self._records]

    def append(self, record: Mapping[str, Any]) -> None:
        self._records.append(json.loads(json.dumps(record)))

    def __len__(self) -> int:
        return len(self._records)


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir/.mbbo.lock` (an flock, released by the OS even on kill -9) while a run writes there.

    Raises:
        RunLockedError: another process holds it; the message names its PID.
        RunWriteError: the folder cannot be written (read-only, full, no permission).
    """
    path = out_dir / LOCK_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RunWriteError(f"cannot write in the output folder {out_dir}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{out_dir} is in use by PID {pid} (another mbbo run writes there); wait for it "
                                 "to finish or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise RunWriteError(f"cannot write in the output folder {out_dir}: {exc.strerror or exc}") from exc
        yield
    finally:
        os.close(fd)  # closing releases the flock


def run(
    algorithm: SteppableAlgorithm,
    task: EvaluableTask,
    config: RunConfig,
    *,
    resume: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    group: Any = None,
) -> list[dict[str, Any]]:
    """Run `algorithm` for the configured budget, evaluating with `task`; return every metrics record.

    Each record (one per evaluation: iteration 0, every `eval_every` iterations, the last iteration) holds
    `iteration` (int), `epoch` (`iteration / task.iterations_per_epoch()`, fractional), `time` (cumulative
    seconds spent in `step()` only: evaluation, checkpointing, logging and compilation are excluded; a resumed
    run continues from the saved time), `compile_time` (cumulative seconds of torch.compile: while the algorithm
    was built and inside `step()`, measured as in `mbbo.compilation`; a resumed run adds its own),
    `oracle_calls` (`algorithm.oracle_counts()`) and every key of `task.evaluate(algorithm)`, which runs under
    `torch.no_grad()`.

    After every step the algorithm's optional `is_finite()` is called; without it every floating tensor of
    `state_dict()` is checked at evaluation and checkpoint points, where the norm of `algorithm.x` and the loss
    metrics (`*loss`, `objective`, `value`) are also checked against `divergence_factor` times their initial
    magnitude. A diverged state
    raises :class:`DivergenceError` naming the quantity and the iteration; the log keeps the records up to
    there and the last good checkpoint is left untouched. SIGINT/SIGTERM (in the main thread) checkpoint the
    last completed step and raise :class:`RunInterrupted`.

    Args:
        algorithm: the object to step (see :class:`mbbo.protocols.SteppableAlgorithm`).
        task: the evaluator (see :class:`mbbo.protocols.EvaluableTask`).
        config: budget, frequencies, output directory and progress bar.
        resume: continue from `out_dir/checkpoint.pt` instead of starting afresh.
        extra_config: the resolved experiment configuration, saved in `config.json` and in checkpoints.
        group: a :class:`mbbo.distributed.RankGroup` for a multi-process run (see the module docstring).

    Raises:
        DivergenceError: the state became non-finite or exploded.
        RunInterrupted: SIGINT or SIGTERM.
        RunLockedError: another run writes in `out_dir`.
        RunWriteError: a file could not be written (the message says what was kept).
        FileExistsError: a fresh run into a directory holding a run, without `config.overwrite`.
        CheckpointNotFoundError / CheckpointError: `resume=True` without a usable checkpoint.
        ValueError: `resume=True` with a configuration that differs from the checkpoint's.
    """
    ipe = _iterations_per_epoch(task)
    state = _Run(
        algorithm=algorithm,
        task=task,
        config=config,
        resolved=_resolved_config(config, extra_config),
        total=config.total_iterations(ipe),
        iterations_per_epoch=ipe,
        compile_time=_compile_seconds(algorithm),  # compiled while it was built (estimator initialisation)
        group=group if group is not None and group.world_size > 1 else None,
    )
    with run_lock(config.out_dir), state.signals_stop_cleanly():
        payload = None
        if resume:
            payload = _load_for_resume(state)
        else:
            _check_fresh_dir(config)
        _write_config(state)
        if payload is not None:
            _resume(state, payload)
        else:
            _start_fresh(state)
        state.last_checkpoint_wall = time.perf_counter()
        state.bar = tqdm(
            total=state.total, initial=state.iteration, disable=None if config.progress else True, unit="it"
        )
        try:
            if state.log is not None and len(state.log):
                state.bar.set_postfix(_postfix(state.log.records[-1]), refresh=False)
            state.loop()
        finally:
            state.bar.close()
    return state.records()
