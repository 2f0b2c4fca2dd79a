"""The `mbbo` command line: `mbbo run`, `mbbo plot`, `mbbo list`.

    mbbo run --task quadratic --algorithm bsvrb_v2 --iterations 200 --set lr=0.01 block_batch=5
    mbbo run --task hyperparam --dataset a8a --data-dir ../shared/data/libsvm --algorithm bsvrb_v1 --epochs 200
    mbbo run --config experiment.yaml --set flip_probability=0.2
    mbbo run --out runs/a --resume                 # continue a run: its own config.json gives everything
    mbbo run --config runs/a/config.json --out runs/b --set lr=0.01   # a new run from an old run's configuration
    mbbo plot runs/* --x epoch --y val_loss -o val_loss.png --logy
    mbbo list

Configuration of `mbbo run`, later layers winning: defaults < config file (`--config`, YAML or TOML) <
command-line flags < `--set key=value`; with `--resume`, the run's own `OUT/config.json` comes first. A run's
`config.json` is also accepted by `--config`. The config file and `--set` take

- run options: `task`, `algorithm`, `epochs`, `iterations`, `eval_every`, `checkpoint_every`,
  `checkpoint_seconds`, `divergence_factor`, `seed`, `threads`, `dtype`, `device`, `out`;
- task settings (e.g. `num_blocks`, `batch_size`, `flip_probability`, `dataset`; see `mbbo list`);
- algorithm hyper-parameters (e.g. `lr`, `block_batch`) and, for restarted `re_<name>` algorithms, the restart
  options (`stage_length`, `decay`, `growth`, `output`).

A bare key is routed by name; a key that is both a task setting and a hyper-parameter must be written
`settings.KEY` or `hyper.KEY` (in files: a `settings:` / `hyper:` section). An unknown key is an error listing
the valid ones. Values are parsed as YAML scalars (`1e-3` is a float, `true` a bool, `null` None).

Errors in the input (bad names, keys, values, missing files, data errors) print `mbbo: error: ...` and exit
with status 2; a diverging run exits with status 1; unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import signal
import sys
import tempfile
import textwrap
import threading
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mbbo
from mbbo.algorithms.registry import ALGORITHMS, RESTART_OPTIONS, make_algorithm
from mbbo.algorithms.restart import Restarted
from mbbo.checkpoint import CheckpointError
from mbbo.compilation import COMPILE_CHOICES
from mbbo.config import apply_overrides, coerce_fields, coerce_value, load_config
from mbbo.data.libsvm import available_datasets, available_single_datasets
from mbbo.distributed import (
    BlockShard,
    DistributedError,
    RankGroup,
    init_from_env,
    timeout_seconds,
    world_from_env,
)
from mbbo.plotting import X_AXES, plot_runs
from mbbo.runner import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    RESERVED_KEYS,
    DivergenceError,
    RunConfig,
    RunInterrupted,
    RunLockedError,
    RunWriteError,
    run,
)
from mbbo.tasks.registry import TASKS, TaskSpec, get_task, task_names
from mbbo.validation import check_choice, check_int, check_real

__all__ = ["DTYPES", "Experiment", "RunOptions", "build_parser", "main", "resolve_experiment"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
SETTINGS_SECTION = "settings"
HYPER_SECTION = "hyper"
DEFAULT_EPOCHS = 1.0
EXIT_USAGE = 2
EXIT_FAILURE = 1


@dataclass
class RunOptions:
    """Options of one run that are neither task settings nor hyper-parameters.

    Attributes:
        task, algorithm: registered names (required).
        epochs, iterations: the budget; at most one (neither: 1 epoch).
        eval_every: evaluate every this many iterations (None: once per epoch).
        checkpoint_every: checkpoint every this many iterations (None: after evaluations within a 2 % time
            budget, at least every `checkpoint_seconds`, and at the end).
        checkpoint_seconds: the longest wall time between two default checkpoints (None: no bound).
        divergence_factor: stop when the iterate's norm or a metric grows past this factor times its
            initial magnitude (None: only NaN/inf stop a run).
        seed: the algorithm's seed (its random streams); the task's data seed is a task setting.
        threads: `torch.set_num_threads`.
        dtype: `float32` or `float64`.
        device: a torch device string (`cpu`, `cuda`, `cuda:1`, ...).
        out: output folder (None: `runs/<task>-<dataset>-<algorithm>-s<seed>`).
        compile: "auto" (default), "yes" or "no" (booleans mean yes / no): wrap the algorithm's oracles in
            `torch.compile` (one-off compile time, reported as `compile_time` and kept out of `time`; faster
            iterations). "auto" times the first eager iterations and compiles when the rest of the run repays
            it (`mbbo.compilation.should_compile`); config.json records the choice under `compile_choice`.
    """

    task: str | None = None
    algorithm: str | None = None
    epochs: float | None = None
    iterations: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = 300.0
    divergence_factor: float | None = 1e8
    seed: int = 0
    threads: int = 1
    dtype: str = "float64"
    device: str = "cpu"
    out: str | None = None
    compile: bool | str = "auto"


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunOptions))


# ---------------------------------------------------------------------------------------------------------
# configuration layers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One configuration source, split into run options, explicit sections and bare keys to route."""

    source: str
    run: dict[str, Any]
    settings: dict[str, Any]
    hyper: dict[str, Any]
    bare: dict[str, Any]


#: Keys of a run's config.json that describe the run rather than configure it.
RECORD_ONLY_KEYS = ("dataset", "torch_version", "mbbo_version", "compile_choice")
BUDGET_KEYS = ("iterations", "epochs", "eval_every", "checkpoint_every", "checkpoint_seconds", "divergence_factor")


def _from_run_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's `config.json` as a configuration layer: the budget from its `runner` section, the restart
    options as bare keys, the record-only keys (data set name, versions) dropped."""
    layer = {k: v for k, v in values.items() if k not in (*RECORD_ONLY_KEYS, "runner", "restart")}
    runner = values.get("runner") or {}
    layer.update({k: runner[k] for k in BUDGET_KEYS if runner.get(k) is not None})
    layer.update(values.get("restart") or {})
    return layer


def _split_layer(values: Mapping[str, Any], source: str) -> _Layer:
    """Sort a flat (or `settings:`/`hyper:`-sectioned) mapping into a layer."""
    layer = _Layer(source, {}, {}, {}, {})
    for key, value in values.items():
        if key in RUN_KEYS:
            layer.run[key] = value
        elif key in (SETTINGS_SECTION, HYPER_SECTION):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: {key!r} must be a mapping of {key} names to values, got {value!r}")
            getattr(layer, key).update(value)
        else:
            layer.bare[str(key)] = value
    return layer


def _merge_run(layers: Sequence[_Layer]) -> dict[str, Any]:
    """Run options of all layers, later winning; a layer giving `epochs` or `iterations` replaces both."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if "epochs" in layer.run or "iterations" in layer.run:
            merged.pop("epochs", None)
            merged.pop("iterations", None)
        merged.update(layer.run)
    return merged


def _restart_defaults() -> dict[str, Any]:
    """Default values of the restart options (from `Restarted.__init__`)."""
    parameters = inspect.signature(Restarted.__init__).parameters
    return {name: parameters[name].default for name in RESTART_OPTIONS}


def _restart_types() -> dict[str, Any]:
    """Type annotations of the restart options."""
    hints = typing.get_type_hints(Restarted.__init__)
    return {name: hints.get(name, Any) for name in RESTART_OPTIONS}


@dataclass
class _Keys:
    """The keys valid for one (task, algorithm) pair, for routing and error messages."""

    task: str
    algorithm: str
    settings: list[str]
    hyper: list[str]
    restart: list[str]

    def all(self) -> list[str]:
        """Every valid key."""
        return [*RUN_KEYS, *self.settings, *self.hyper, *self.restart]

    def unknown(self, key: str, source: str, kind: str = "key") -> ValueError:
        """The error for an unknown key: names it, its source, close matches and every valid key."""
        close = difflib.get_close_matches(key, self.all(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        restart = f" Restart options: {', '.join(self.restart)}." if self.restart else ""
        if not self.restart and key in RESTART_OPTIONS:
            return ValueError(
                f"{key!r} (from {source}) is a restart option; it applies only to restarted algorithms "
                f"({'re_' + self.algorithm})"
            )
        return ValueError(
            f"unknown {kind} {key!r} (from {source}) for task {self.task!r} and algorithm {self.algorithm!r}.{hint}"
            f" Valid keys: run options: {', '.join(RUN_KEYS)}. Task settings: {', '.join(self.settings)}."
            f" Hyper-parameters of {self.algorithm}: {', '.join(self.hyper)}.{restart}"
        )


def _route(layer: _Layer, keys: _Keys) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task settings, hyper-parameters and restart options) of one layer, every key checked."""
    settings: dict[str, Any] = {}
    hyper: dict[str, Any] = {}
    algorithm_keys = set(keys.hyper) | set(keys.restart)
    for key, value in layer.settings.items():
        if key not in keys.settings:
            raise keys.unknown(key, layer.source, "task setting")
        settings[key] = value
    for key, value in layer.hyper.items():
        if key not in algorithm_keys:
            raise keys.unknown(key, layer.source, "hyper-parameter")
        hyper[key] = value
    for key, value in layer.bare.items():
        is_setting, is_hyper = key in keys.settings, key in algorithm_keys
        if is_setting and is_hyper:
            raise ValueError(
                f"key {key!r} (from {layer.source}) is both a setting of task {keys.task!r} and a hyper-parameter "
                f"of {keys.algorithm!r}; write {SETTINGS_SECTION}.{key} or {HYPER_SECTION}.{key}"
            )
        if is_setting:
            settings[key] = value
        elif is_hyper:
            hyper[key] = value
        else:
            raise keys.unknown(key, layer.source)
    return settings, hyper


# ---------------------------------------------------------------------------------------------------------
# the resolved experiment
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """A fully resolved `mbbo run`: every value filled in, nothing built yet.

    Attributes:
        spec: the task.
        settings: the task's settings object.
        options: run options (task and algorithm names are set).
        hyper: every hyper-parameter of the algorithm (defaults filled in).
        restart: every restart option for `re_<name>` algorithms, else None.
        out_dir: the output folder.
    """

    spec: TaskSpec
    settings: Any
    options: RunOptions
    hyper: dict[str, Any]
    restart: dict[str, Any] | None
    out_dir: Path

    @property
    def algorithm(self) -> str:
        """The algorithm name."""
        assert self.options.algorithm is not None
        return self.options.algorithm

    @property
    def dataset(self) -> str | None:
        """The data set, or None for tasks without data."""
        return self.spec.dataset(self.settings)

    def config(self) -> dict[str, Any]:
        """The resolved configuration saved (as `extra_config`) in `config.json` and checkpoints."""
        resolved: dict[str, Any] = {
            "task": self.spec.name,
            "dataset": self.dataset,
            "algorithm": self.algorithm,
            "settings": self.spec.settings_dict(self.settings),
            "hyper": dict(self.hyper),
        }
        if self.restart is not None:
            resolved["restart"] = dict(self.restart)
        resolved.update(
            seed=self.options.seed,
            threads=self.options.threads,
            dtype=self.options.dtype,
            device=self.options.device,
            compile=self.options.compile,
            torch_version=str(torch.__version__),
            mbbo_version=mbbo.__version__,
        )
        return resolved


def _flag_layer(args: argparse.Namespace) -> _Layer:
    """The run options and data flags given on the command line."""
    run_flags = {key: getattr(args, key, None) for key in RUN_KEYS}
    layer = _Layer("command-line flags", {k: v for k, v in run_flags.items() if v is not None}, {}, {}, {})
    for flag, key in (("dataset", "dataset"), ("data_dir", "data_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            layer.bare[key] = value
    return layer


def _data_flags(layer: _Layer, spec: TaskSpec) -> None:
    """Map `--dataset` / `--data-dir` onto the task's settings (error for tasks without data)."""
    for key, setting, flag in (("dataset", spec.dataset_setting, "--dataset"),
                               ("data_dir", spec.data_dir_setting, "--data-dir")):
        if key in layer.bare:
            value = layer.bare.pop(key)
            if setting is None:
                raise ValueError(f"task {spec.name!r} takes no {flag} (it has no data set)")
            layer.settings[setting] = value


def _check_dtype_device(options: RunOptions) -> None:
    """Raise ValueError for an unknown dtype, a malformed device or an unavailable accelerator."""
    if options.dtype not in DTYPES:
        raise ValueError(f"bad value for dtype: {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        device = torch.device(options.device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad value for device: {options.device!r} ({exc})") from exc
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"device {options.device!r} requested but {device.type} is not available here")


def _default_out(spec: TaskSpec, options: RunOptions, dataset: str | None) -> Path:
    """`runs/<task>-<dataset>-<algorithm>-s<seed>` (without the data set part for tasks without data)."""
    parts = [spec.name, *([Path(dataset).name] if dataset else []), str(options.algorithm), f"s{options.seed}"]
    return Path("runs") / "-".join(parts)


MAX_SEED = 2**63 - 1


def _check_run_options(options: RunOptions) -> None:
    """The same ranges whether an option comes from a flag, `--set` or a config file."""
    for name in ("iterations", "eval_every", "checkpoint_every"):
        value = getattr(options, name)
        if value is not None:
            check_int(name, value, low=1)
    check_int("threads", options.threads, low=1)
    if options.epochs is not None:
        check_real("epochs", options.epochs, 0.0, None, low_open=True)
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or not 0 <= options.seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {options.seed!r}")
    if options.out is not None and not str(options.out).strip():
        raise ValueError("out is empty: give a folder name, or leave --out out for the default folder")
    if isinstance(options.compile, bool):
        options.compile = "yes" if options.compile else "no"
    check_choice("compile", options.compile, COMPILE_CHOICES)


def resolve_experiment(args: argparse.Namespace) -> Experiment:
    """Resolve an `mbbo run` namespace into an :class:`Experiment` (nothing is loaded or built).

    Raises:
        ValueError: a missing task or algorithm, an unknown name or key, or a bad value (the message names it).
        FileNotFoundError: a missing config file.
    """
    file_values = load_config(args.config) if args.config else {}
    if "runner" in file_values:
        file_values = _from_run_config(file_values)
    set_values = apply_overrides({}, list(args.set or []))
    own = Path(args.out) / CONFIG_FILE if args.resume and args.out else None
    run_values = _from_run_config(load_config(own)) if own is not None and own.is_file() else {}
    layers = [
        _split_layer(run_values, f"the run's own {own}"),
        _split_layer(file_values, f"config file {args.config}"),
        _flag_layer(args),
        _split_layer(set_values, "--set"),
    ]
    options = RunOptions(**coerce_fields(RunOptions, _merge_run(layers), what="run option"))
    _check_run_options(options)
    if options.task is None:
        raise ValueError(f"no task given: pass --task (one of {', '.join(task_names())}) or set 'task'")
    if options.algorithm is None:
        raise ValueError("no algorithm given: pass --algorithm (see `mbbo list`) or set 'algorithm'")
    if options.epochs is None and options.iterations is None:
        options.epochs = DEFAULT_EPOCHS
    spec = get_task(options.task)
    cls, restarted = spec.algorithm_class(options.algorithm)
    keys = _Keys(options.task, options.algorithm, spec.setting_names(),
                 [f.name for f in dataclasses.fields(cls.Config)], list(RESTART_OPTIONS) if restarted else [])
    setting_values: dict[str, Any] = {}
    hyper_values: dict[str, Any] = spec.hyper_defaults(cls.name, [f.name for f in dataclasses.fields(cls.Config)])
    for layer in layers:
        _data_flags(layer, spec)
        settings, hyper = _route(layer, keys)
        setting_values.update(settings)
        hyper_values.update(hyper)
    settings_obj = spec.make_settings(setting_values)
    spec.check_algorithm(options.algorithm, settings_obj)
    restart_given = {k: hyper_values.pop(k) for k in RESTART_OPTIONS if k in hyper_values}
    hyper_given = coerce_fields(cls.Config, hyper_values, what=f"{cls.name} hyper-parameter")
    hyper = dataclasses.asdict(cls.Config(**hyper_given))
    restart = None
    if restarted:
        types_ = _restart_types()
        restart = _restart_defaults()
        for key, value in restart_given.items():
            restart[key] = coerce_value(key, value, types_[key], what="restart option")
    _check_dtype_device(options)
    spec.check_device(options.device)
    dataset = spec.dataset(settings_obj)
    out_dir = Path(options.out) if options.out else _default_out(spec, options, dataset)
    return Experiment(spec, settings_obj, options, hyper, restart, out_dir)


# ---------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """A metric for the summary line."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _check_writable(out_dir: Path) -> None:
    """Create `out_dir` and write a scratch file in it, so that a read-only or full disk fails up front."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as probe:
            probe.write(b"mbbo")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ValueError(f"cannot write in the output folder {out_dir}: {exc.strerror or exc}; choose another "
                         "--out") from exc


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Fail early (before any data is loaded) on a clobbered run, a missing checkpoint or a folder that
    cannot be written."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder; choose another output folder")
    if resume and not (out_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {out_dir / CHECKPOINT_FILE}")
    existing = [name for name in (CHECKPOINT_FILE, METRICS_FILE) if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            f"--overwrite to start again"
        )
    _check_writable(out_dir)


def _world() -> tuple[int, int]:
    """(rank, world size) from torchrun-style variables ((0, 1) for a single process)."""
    return world_from_env()


def _check_multiprocess(spec: TaskSpec, algorithm: str | None, world: int, how: str) -> None:
    """Fail at start-up when the task or the algorithm does not run on several processes."""
    if not spec.distributed:
        able = ", ".join(name for name in task_names() if TASKS[name].distributed)
        raise ValueError(f"task {spec.name!r} does not run on several processes ({how}); the tasks that do: {able}")
    if spec.sharded and algorithm is not None:
        cls, _ = spec.algorithm_class(algorithm)
        if not getattr(cls, "shardable", False):
            raise ValueError(f"algorithm {algorithm!r} does not run block-sharded over several processes ({how}); "
                             "the ones that do: bsvrb_v1, bsvrb_v2, ma_v1, ma_v2, rsvrb and their re_<name> variants")


def _lost_process(exc: RuntimeError, rank: int, world: int, advice: str) -> DistributedError:
    """The error of a rank whose collective failed (`exc`): another process died or timed out."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(
        f"rank {rank} of {world}: a collective failed ({first[:300]}); another process probably died (see its "
        f"error) or did not answer within $MBBO_DIST_TIMEOUT = {timeout_seconds():g} s.{advice}")


def _cmd_run(args: argparse.Namespace) -> int:
    """`mbbo run`: resolve, build, run, report. Under torchrun / --nproc, rank 0 writes OUT and rank r > 0
    writes in OUT/rank<r>: for the federated tasks its own log and checkpoint (each rank resumes from its own);
    for the block-sharded tasks its checkpoint shards only (rank 0 writes the log and the manifest)."""
    experiment = resolve_experiment(args)
    rank, world = _world()
    group = None
    if world > 1:
        _check_multiprocess(experiment.spec, experiment.algorithm, world, f"WORLD_SIZE={world}")
        if rank > 0:
            experiment = dataclasses.replace(experiment, out_dir=experiment.out_dir / f"rank{rank}")
            args.no_progress = True
        if experiment.spec.sharded:  # block-sharded: the runner writes checkpoint sets, rank 0 the log
            init_from_env(device=experiment.options.device)
            group = RankGroup()
    options = experiment.options
    # validate the budget before anything is loaded; eval_every is fixed once the epoch length is known
    run_config = RunConfig(out_dir=experiment.out_dir, iterations=options.iterations, epochs=options.epochs,
                           eval_every=options.eval_every or 1, checkpoint_every=options.checkpoint_every,
                           checkpoint_seconds=options.checkpoint_seconds,
                           divergence_factor=options.divergence_factor,
                           progress=not args.no_progress, overwrite=args.overwrite,
                           # a sharded run's ranks follow rank 0's timed choice (broadcast by the runner)
                           compile_auto=options.compile == "auto" and (world == 1 or group is not None))
    # a rank > 0 of a sharded run has no checkpoint.pt of its own (rank 0 holds the manifest)
    _check_out_dir(experiment.out_dir, args.resume and (group is None or rank == 0), args.overwrite)
    if isinstance(options.threads, bool) or options.threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {options.threads!r}")
    torch.set_num_threads(options.threads)
    options.threads = torch.get_num_threads()
    problem, evaluator = experiment.spec.build(
        experiment.settings, block_batch=int(experiment.hyper.get("block_batch", 1)),
        dtype=DTYPES[options.dtype], device=options.device,
    )
    experiment.spec.check_algorithm(experiment.algorithm, experiment.settings, problem)
    if group is not None:
        try:
            problem.shard = BlockShard.from_process_group(problem.num_blocks)  # refuses R > m
        except RuntimeError as exc:
            if isinstance(exc, DistributedError):
                raise
            raise _lost_process(exc, rank, world, "") from exc
        block_batch = int(experiment.hyper.get("block_batch", 1))
        if block_batch < world:
            raise ValueError(f"block_batch = {block_batch} sampled blocks cannot keep {world} processes busy (each "
                             f"computes the sampled blocks it owns): use at most {block_batch} processes or set "
                             f"block_batch >= {world}")
    extra = {"compile": True} if options.compile == "yes" else {}
    if experiment.spec.make_method is not None:
        algorithm = experiment.spec.make_method(experiment.algorithm, problem, evaluator, options.seed,
                                                dict(experiment.hyper))
    else:
        algorithm = make_algorithm(experiment.algorithm, problem, seed=options.seed, **experiment.hyper,
                                   **(experiment.restart or {}), **extra)
    if options.eval_every is None:
        per_epoch = max(1, round(evaluator.iterations_per_epoch()))
        run_config = dataclasses.replace(run_config, eval_every=per_epoch)
    try:
        records = run(algorithm, evaluator, run_config, resume=args.resume, extra_config=experiment.config(),
                      group=group)
    except RunInterrupted as exc:
        print(f"mbbo: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mbbo: interrupted; continue from the last checkpoint in {experiment.out_dir} with --resume",
              file=sys.stderr)
        return 130
    except (DivergenceError, RunWriteError) as exc:
        print(f"mbbo: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as exc:
        if group is None or isinstance(exc, CheckpointError | RunLockedError):
            raise
        raise _lost_process(exc, rank, world, f" Resume from the last complete checkpoint set with: mbbo run --out "
                                              f"{args.out or experiment.out_dir} --resume --nproc {world}") from exc
    if rank > 0:
        return 0
    files = ", ".join(name for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE)
                      if (experiment.out_dir / name).exists())
    print(f"results in {experiment.out_dir} ({files})")
    if records:
        last = records[-1]
        metrics = ", ".join(f"{k}={_format_value(v)}" for k, v in last.items()
                            if k not in RESERVED_KEYS and isinstance(v, int | float))
        print(f"final: iteration {last['iteration']}, epoch {last['epoch']:.4g}: {metrics}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    """`mbbo plot`: one figure of a metric against epochs, time or oracle calls."""
    path = plot_runs(args.run_dirs, args.x, args.y, args.output, label_from=args.label_from, logy=args.logy)
    print(f"wrote {path}")
    return 0


def _wrap(label: str, items: Sequence[str], indent: int = 6) -> str:
    """`label: a, b, c` wrapped to 100 columns."""
    text = f"{label}: {', '.join(items) if items else '-'}"
    return textwrap.fill(text, width=100, initial_indent=" " * indent, subsequent_indent=" " * (indent + 2))


def _without_restarts(names: Sequence[str]) -> list[str]:
    """Base names only (`re_<name>` fits wherever `<name>` does)."""
    return [name for name in names if not name.startswith("re_")]


def _list_tasks() -> list[str]:
    """Lines describing every task."""
    lines = ["Tasks (mbbo run --task NAME; settings via --set NAME=VALUE; re_<name> fits where <name> does):"]
    for name in task_names():
        spec = TASKS[name]
        lines.append(f"  {name}")
        lines.append(textwrap.fill(spec.description, width=100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
        lines.append(_wrap("settings", [f"{k}={v!r}" for k, v in spec.defaults().items()]))
        for algorithm, values in spec.algorithm_defaults.items():
            label = "hyper-parameter defaults" + ("" if algorithm == "*" else f" of {algorithm}")
            lines.append(_wrap(label, [f"{k}={v!r}" for k, v in values.items()]))
        lines.append(_wrap("metrics", list(spec.metrics)))
        fitting = spec.compatible_algorithms()
        lines.append(_wrap("algorithms that fit (default settings)", _without_restarts(fitting)))
        for method, config in (spec.methods or {}).items():  # the task's own methods take only their settings
            lines.append(_wrap(f"hyper-parameters of {method}",
                               [f"{k}={v!r}" for k, v in dataclasses.asdict(config()).items()]))
        if "num_blocks" in spec.setting_names() and spec.defaults()["num_blocks"] != 1:
            single = spec.compatible_algorithms(spec.make_settings({"num_blocks": 1}))
            extra = [name for name in _without_restarts(single) if name not in fitting]
            conditional = [name for name in extra if not spec.finite_sum
                           and getattr(ALGORITHMS[name], "needs_finite_sum", None) == "by default"]
            if extra:
                lines.append(_wrap("with num_blocks=1 also", [n for n in extra if n not in conditional]))
            if conditional:
                lines.append(_wrap("with num_blocks=1 and refresh_batch_size, period set (no finite sum here)",
                                   conditional))
    return lines


def _list_algorithms() -> list[str]:
    """Lines describing every algorithm and the restart options."""
    lines = ["Algorithms (mbbo run --algorithm NAME; hyper-parameters via --set NAME=VALUE):"]
    for name in sorted(ALGORITHMS):
        defaults = dataclasses.asdict(ALGORITHMS[name].Config())
        lines.append(f"  {name}")
        lines.append(_wrap("hyper-parameters", [f"{k}={v!r}" for k, v in defaults.items()]))
    restart = [f"{k}={v!r}" for k, v in _restart_defaults().items()]
    lines.append("  re_<name>  (restarted variant of any algorithm above)")
    lines.append(_wrap("restart options", restart))
    return lines


def _list_datasets() -> list[str]:
    """Lines describing every known data set."""
    lines = ["Data sets (mbbo run --dataset NAME; any LIBSVM pair NAME, NAME.t in --data-dir also works):"]
    described = dict(sorted(available_datasets().items()))
    described.update({name: f"{text} (task svm_slack, which splits it)"
                      for name, text in sorted(available_single_datasets().items())})
    for name, description in described.items():
        lines.append(f"  {name}")
        lines.append(textwrap.fill(description, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    """`mbbo list [tasks|algorithms|datasets]`."""
    sections = {"tasks": _list_tasks, "algorithms": _list_algorithms, "datasets": _list_datasets}
    chosen = [args.what] if args.what else list(sections)
    blocks = ["\n".join(sections[name]()) for name in chosen]
    print("\n\n".join(blocks))
    return 0


# ---------------------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`1e4` is accepted as 10000)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if not (math.isfinite(value) and value.is_integer() and value >= 1):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(value)


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    """argparse type: an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _run_epilog() -> str:
    """What `--set` takes, task by task, and where to read the rest."""
    lines = ["task settings (--set NAME=VALUE; defaults and fitting algorithms: `mbbo list tasks`):"]
    for name in task_names():
        lines.append(textwrap.fill(", ".join(TASKS[name].setting_names()), width=100,
                                   initial_indent=f"  {name}: ", subsequent_indent=" " * 6))
    lines += [
        "algorithm hyper-parameters (--set NAME=VALUE): `mbbo list algorithms` shows every algorithm's, with",
        "  defaults; restarted re_<name> algorithms also take stage_length, decay, growth, output.",
        "run options in files or --set: checkpoint_seconds (300), divergence_factor (1e8; null turns the growth",
        "  check off). Continue a run with `mbbo run --out OUT --resume`.",
    ]
    return "\n".join(lines)


def _add_run_parser(subparsers: Any) -> None:
    """The `run` subcommand."""
    p = subparsers.add_parser(
        "run", help="run an algorithm on a task",
        description="Run an algorithm on a task; writes OUT/config.json, OUT/metrics.jsonl, OUT/checkpoint.pt. "
                    "Precedence: defaults < --config file < flags < --set.",
        epilog=_run_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", help=f"task name ({', '.join(task_names())})")
    p.add_argument("--algorithm", help="algorithm name (see `mbbo list algorithms`)")
    p.add_argument("--dataset", help="data set of the task (see `mbbo list datasets`)")
    p.add_argument("--data-dir", dest="data_dir", help="folder holding the data files (NAME and NAME.t)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_float, help=f"epochs to run (default {DEFAULT_EPOCHS:g})")
    budget.add_argument("--iterations", type=_positive_int, help="iterations to run")
    p.add_argument("--eval-every", dest="eval_every", type=_positive_int,
                   help="evaluate every K iterations (default: once per epoch)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive_int,
                   help="checkpoint every N iterations (default: only at the end)")
    p.add_argument("--seed", type=_int, help="seed of the algorithm's random streams (default 0)")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="floating type (default float64)")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--out", help="output folder (default runs/<task>-<dataset>-<algorithm>-s<seed>)")
    p.add_argument("--config", help="YAML or TOML file of run options, task settings and hyper-parameters")
    p.add_argument("--set", dest="set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override a run option, task setting or hyper-parameter (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", nargs="?", const="yes", choices=COMPILE_CHOICES, default=None,
                   help="torch.compile the oracles: auto (default: when the first eager iterations say the run "
                        "repays it, choice in config.json), yes (bare --compile) or no; compile time is "
                        "reported as compile_time, out of time")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that already holds a run")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="run in N local processes (gloo on 127.0.0.1): the multi-block tasks (hyperparam, quadratic) "
                        "shard their blocks over them, the federated tasks their clients")
    p.set_defaults(func=_cmd_run)


def _add_plot_parser(subparsers: Any) -> None:
    """The `plot` subcommand."""
    p = subparsers.add_parser(
        "plot", help="plot a metric of several runs",
        description="Plot METRIC against epochs, time or oracle calls for run folders; runs differing only by "
                    "seed are drawn as mean +- std (x = epoch).",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl)")
    p.add_argument("--x", choices=X_AXES, default="epoch", help="x axis (default epoch)")
    p.add_argument("--y", required=True, metavar="METRIC", help="metric to plot (e.g. val_loss, grad_norm)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="image file (.png, .pdf, .svg, ...)")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("--label-from", dest="label_from", default=None,
                   help="config key giving the legend label (default: algorithm, else the folder name)")
    p.set_defaults(func=_cmd_plot)


def _add_list_parser(subparsers: Any) -> None:
    """The `list` subcommand."""
    p = subparsers.add_parser("list", help="list tasks, algorithms and data sets",
                              description="List tasks (settings, defaults), algorithms (hyper-parameter "
                                          "defaults) and data sets.")
    p.add_argument("what", nargs="?", choices=("tasks", "algorithms", "datasets"), help="only this section")
    p.set_defaults(func=_cmd_list)


def build_parser() -> argparse.ArgumentParser:
    """The `mbbo` argument parser with its `run`, `plot` and `list` subcommands."""
    parser = argparse.ArgumentParser(
        prog="mbbo", description="Stochastic (multi-block) bilevel optimisation: run, plot, list.",
    )
    parser.add_argument("--version", action="version", version=f"mbbo {mbbo.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(subparsers)
    _add_plot_parser(subparsers)
    _add_list_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv` (default `sys.argv[1:]`), run the command, return the exit status.

    Input errors print `mbbo: error: <message>` to stderr and return 2; argparse's own errors (and `--help`)
    return its exit status; a diverged run returns 1.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    previous = _terminate_as_interrupt()
    try:
        if getattr(args, "nproc", None) and args.nproc > 1 and _world() == (0, 1):
            if args.task is not None:  # fail before spawning
                _check_multiprocess(get_task(args.task), args.algorithm, args.nproc, "--nproc")
            from mbbo.distributed import launch

            return launch(sys.argv[1:] if argv is None else list(argv), args.nproc)
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError,
            RunLockedError) as exc:
        print(f"mbbo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DistributedError as exc:
        print(f"mbbo: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except RunInterrupted as exc:  # a signal before the run started (loading data, building, warm-up)
        print(f"mbbo: {exc.message} before the run started; nothing was written", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mbbo: interrupted (Ctrl-C) before the run started; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt() -> Any:
    """Outside the run loop (which checkpoints on signals), SIGTERM interrupts like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
