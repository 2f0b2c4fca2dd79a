"""The runner: the loop that steps an algorithm, evaluates it, logs, checkpoints and resumes.

It knows neither the maths nor the data format: it drives any :class:`mbbo.protocols.SteppableAlgorithm`
and evaluates with any :class:`mbbo.protocols.EvaluableTask`.

Files in `out_dir`:

- `config.json`: `extra_config` (the resolved experiment configuration) plus the run configuration under
  the key `"runner"`, written atomically at the start.
- `metrics.jsonl`: one record per evaluation (see :func:`run`), rewritten atomically on every record.
- `checkpoint.pt`: `{"format_version", "algorithm": state_dict, "runner": {...}, "config": ...}`, written
  atomically every `checkpoint_every` iterations and at the end.

Resuming (`resume=True`) reloads the checkpoint, drops the records written after it and continues; the final
state and the log (except `time`) are bit-identical to an uninterrupted run, provided `step()` is a
deterministic function of `state_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from mbbo.metrics_log import MetricsLog
from mbbo.protocols import EvaluableTask, SteppableAlgorithm

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "RESERVED_KEYS",
    "DivergenceError",
    "RunConfig",
    "run",
    "state_is_finite",
]

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("iteration", "epoch", "time", "oracle_calls")
RUNNER_KEY = "runner"
CHECKPOINT_FORMAT = 1


class DivergenceError(RuntimeError):
    """The algorithm's state became non-finite (NaN or inf).

    Attributes:
        iteration: the iteration at which the non-finite state was detected.
        records: the metrics records written before it (also on disk in `metrics.jsonl`).
    """

    def __init__(self, iteration: int, records: list[dict[str, Any]], detail: str = "") -> None:
        self.iteration = iteration
        self.records = records
        message = f"non-finite (NaN/inf) algorithm state detected at iteration {iteration}"
        super().__init__(f"{message}{': ' + detail if detail else ''}")


@dataclass(kw_only=True)
class RunConfig:
    """How long to run, how often to evaluate and checkpoint, and where to write.

    Exactly one of `iterations` and `epochs` is given; epochs convert to iterations through
    `task.iterations_per_epoch()` (rounded up, see :meth:`total_iterations`).

    Attributes:
        iterations: number of iterations (calls to `step()`), >= 1.
        epochs: number of epochs, > 0.
        eval_every: evaluate every this many iterations (and always at iteration 0 and at the end).
        checkpoint_every: checkpoint every this many iterations (and always at the end); None: only at
            the end.
        out_dir: directory for `config.json`, `metrics.jsonl` and `checkpoint.pt` (created if missing).
        progress: show a tqdm progress bar (it also hides itself when stderr is not a terminal).
        overwrite: allow a fresh run (`resume=False`) into a directory that already holds a run.
    """

    out_dir: Path
    iterations: int | None = None
    epochs: float | None = None
    eval_every: int = 1
    checkpoint_every: int | None = None
    progress: bool = True
    overwrite: bool = False

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

    def total_iterations(self, iterations_per_epoch: int) -> int:
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


@dataclass
class _Run:
    """The state of one call to :func:`run` (kept small: each method does one thing)."""

    algorithm: SteppableAlgorithm
    task: EvaluableTask
    config: RunConfig
    resolved: dict[str, Any]
    total: int
    iterations_per_epoch: int
    iteration: int = 0
    elapsed: float = 0.0
    log: MetricsLog | None = None
    last_checkpoint: int | None = None
    bar: Any = field(default=None, repr=False)

    @property
    def out_dir(self) -> Path:
        """The run directory."""
        return self.config.out_dir

    def eval_due(self, iteration: int) -> bool:
        """Evaluations happen at 0, every `eval_every` iterations and at the end."""
        return iteration == 0 or iteration % self.config.eval_every == 0 or iteration == self.total

    def checkpoint_due(self, iteration: int) -> bool:
        """Checkpoints happen every `checkpoint_every` iterations and at the end (never at 0)."""
        every = self.config.checkpoint_every
        return iteration == self.total or (every is not None and iteration % every == 0)

    def records(self) -> list[dict[str, Any]]:
        """Records written so far."""
        return self.log.records if self.log is not None else []

    def diverged(self, detail: str) -> DivergenceError:
        """The error to raise for a non-finite state at the current iteration, saying what was kept."""
        records = self.records()
        kept = f"metrics up to iteration {records[-1]['iteration']} in " if records else "no metrics in "
        kept += str(self.out_dir / METRICS_FILE)
        if self.last_checkpoint is None:
            kept += "; no checkpoint written"
        else:
            path = self.out_dir / CHECKPOINT_FILE
            kept += f"; last good checkpoint (iteration {self.last_checkpoint}) at {path}"
        return DivergenceError(self.iteration, records, f"{detail} ({kept})")

    def evaluate(self) -> dict[str, Any]:
        """Evaluate (no grad, untimed), log the record and show it on the progress bar."""
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
            "oracle_calls": {str(k): int(v) for k, v in self.algorithm.oracle_counts().items()},
            **{str(key): _to_builtin(value) for key, value in metrics.items()},
        }
        self.log.append(record)
        if self.bar is not None:
            self.bar.set_postfix(_postfix(record), refresh=False)
        return record

    def payload(self, state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds."""
        return {
            "format_version": CHECKPOINT_FORMAT,
            "algorithm": state,
            "runner": {"iteration": self.iteration, "elapsed": self.elapsed, "total": self.total},
            "config": self.resolved,
        }

    def step(self) -> None:
        """One timed `algorithm.step()`, then the cheap finite check if the algorithm offers one."""
        start = time.perf_counter()
        self.algorithm.step()
        self.elapsed += time.perf_counter() - start
        self.iteration += 1
        is_finite = getattr(self.algorithm, "is_finite", None)
        if callable(is_finite) and not is_finite():
            raise self.diverged("algorithm.is_finite() returned False")

    def after_step(self) -> None:
        """Evaluate and/or checkpoint if due; a non-finite state is never evaluated nor saved."""
        want_eval = self.eval_due(self.iteration)
        want_checkpoint = self.checkpoint_due(self.iteration)
        if not (want_eval or want_checkpoint):
            return
        state = self.algorithm.state_dict()
        if not state_is_finite(state):
            raise self.diverged("a floating tensor in state_dict() is not finite")
        if want_eval:
            self.evaluate()
        if want_checkpoint:
            save_checkpoint(self.out_dir / CHECKPOINT_FILE, self.payload(state))
            self.last_checkpoint = self.iteration

    def loop(self) -> None:
        """Step until `total` iterations, updating the progress bar."""
        while self.iteration < self.total:
            self.step()
            self.after_step()
            if self.bar is not None:
                self.bar.update(1)


def _check_fresh_dir(config: RunConfig) -> None:
    """Refuse to clobber an existing run unless `overwrite`; with it, remove the stale checkpoint."""
    checkpoint = config.out_dir / CHECKPOINT_FILE
    existing = [name for name in (CHECKPOINT_FILE, METRICS_FILE) if (config.out_dir / name).exists()]
    if existing and not config.overwrite:
        raise FileExistsError(
            f"{config.out_dir} already holds a run ({', '.join(existing)}); pass resume=True to continue it "
            f"or overwrite=True to start again"
        )
    checkpoint.unlink(missing_ok=True)


def _start_fresh(state: _Run) -> None:
    """Start a new log and evaluate the initial iterate (iteration 0)."""
    if not state_is_finite(state.algorithm.state_dict()):
        raise state.diverged("the initial state_dict() is not finite")
    state.log = MetricsLog(state.out_dir / METRICS_FILE)
    state.evaluate()


def _warn_config_change(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Warn when the experiment configuration differs from the one saved in the checkpoint."""
    keys = (set(saved) | set(current)) - {RUNNER_KEY}
    changed = sorted(key for key in keys if saved.get(key) != current.get(key))
    if changed:
        warnings.warn(
            f"resuming with a configuration that differs from the checkpoint's in {changed}",
            RuntimeWarning,
            stacklevel=4,
        )


def _load_for_resume(state: _Run) -> dict[str, Any]:
    """Read and check the checkpoint to resume from (before anything in `out_dir` is written)."""
    path = state.out_dir / CHECKPOINT_FILE
    try:
        payload = load_checkpoint(path)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(f"cannot resume: no checkpoint at {path}") from exc
    missing = sorted({"algorithm", "runner"} - set(payload))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; was it written by mbbo.runner?")
    if payload["runner"]["iteration"] > state.total:
        raise ValueError(
            f"checkpoint {path} is at iteration {payload['runner']['iteration']}, past the requested "
            f"{state.total} iterations"
        )
    _warn_config_change(payload.get("config", {}), state.resolved)
    return payload


def _resume(state: _Run, payload: dict[str, Any]) -> None:
    """Load the checkpoint into the algorithm, trim the log to its iteration, evaluate there if due."""
    state.algorithm.load_state_dict(payload["algorithm"])
    state.iteration = int(payload["runner"]["iteration"])
    state.elapsed = float(payload["runner"]["elapsed"])
    state.last_checkpoint = state.iteration
    keep_current = state.eval_due(state.iteration)
    state.log = MetricsLog.resume(
        state.out_dir / METRICS_FILE, until=state.iteration, include_until=keep_current
    )
    records = state.log.records
    if keep_current and not (records and records[-1]["iteration"] == state.iteration):
        state.evaluate()


def _iterations_per_epoch(task: EvaluableTask) -> int:
    """`task.iterations_per_epoch()`, validated."""
    value = task.iterations_per_epoch()
    _check_positive_int("task.iterations_per_epoch()", value)
    return value


def run(
    algorithm: SteppableAlgorithm,
    task: EvaluableTask,
    config: RunConfig,
    *,
    resume: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run `algorithm` for the configured budget, evaluating with `task`; return every metrics record.

    Each record (one per evaluation: iteration 0, every `eval_every` iterations, the last iteration) holds
    `iteration` (int), `epoch` (`iteration / task.iterations_per_epoch()`), `time` (cumulative seconds spent
    in `step()` only: evaluation, checkpointing and logging are excluded; a resumed run continues from the
    saved time), `oracle_calls` (`algorithm.oracle_counts()`) and every key of `task.evaluate(algorithm)`,
    which runs under `torch.no_grad()`.

    After every step the algorithm's optional `is_finite()` is called; without it every floating tensor of
    `state_dict()` is checked at evaluation and checkpoint points. A non-finite state raises
    :class:`DivergenceError` naming the iteration; the log keeps the records up to there and the last good
    checkpoint is left untouched.

    Args:
        algorithm: the object to step (see :class:`mbbo.protocols.SteppableAlgorithm`).
        task: the evaluator (see :class:`mbbo.protocols.EvaluableTask`).
        config: budget, frequencies, output directory and progress bar.
        resume: continue from `out_dir/checkpoint.pt` instead of starting afresh.
        extra_config: the resolved experiment configuration, saved in `config.json` and in checkpoints.

    Raises:
        DivergenceError: the state became non-finite.
        FileExistsError: a fresh run into a directory holding a run, without `config.overwrite`.
        CheckpointNotFoundError: `resume=True` and no checkpoint.
    """
    ipe = _iterations_per_epoch(task)
    state = _Run(
        algorithm=algorithm,
        task=task,
        config=config,
        resolved=_resolved_config(config, extra_config),
        total=config.total_iterations(ipe),
        iterations_per_epoch=ipe,
    )
    config.out_dir.mkdir(parents=True, exist_ok=True)
    payload = None
    if resume:
        payload = _load_for_resume(state)
    else:
        _check_fresh_dir(config)
    config_text = json.dumps(state.resolved, indent=2, sort_keys=True) + "\n"
    atomic_write_text(config.out_dir / CONFIG_FILE, config_text)
    if payload is not None:
        _resume(state, payload)
    else:
        _start_fresh(state)
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
