"""The task registry: settings, algorithm fit, building (problem, evaluator) for the runner."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from mbbo.algorithms import registry as algorithm_registry
from mbbo.algorithms.bsvrb import BSVRBv2
from mbbo.algorithms.registry import algorithm_names, make_algorithm
from mbbo.config import coerce_fields, coerce_value, field_types
from mbbo.tasks import registry
from mbbo.tasks.hyperparam import HyperparamSettings, HyperparamTask
from mbbo.tasks.quadratic import QuadraticEvaluator, QuadraticSettings, build_quadratic
from mbbo.tasks.registry import (
    BuiltTask,
    IncompatibleAlgorithmError,
    TaskAdapter,
    TaskSpec,
    algorithm_class,
    get_task,
    is_single_block,
    register_task,
    task_names,
)


@pytest.fixture
def isolated_tasks(monkeypatch: pytest.MonkeyPatch) -> dict[str, TaskSpec]:
    """A private copy of the task registry for tests that register tasks."""
    tasks = dict(registry.TASKS)
    monkeypatch.setattr(registry, "TASKS", tasks)
    return tasks


def _toy_spec(**kwargs: object) -> TaskSpec:
    """A quadratic-based spec with extra options."""
    return TaskSpec(name="toy", description="toy", settings_cls=QuadraticSettings,
                    builder=build_quadratic, **kwargs)


# --- names ---------------------------------------------------------------------------------------------


def test_task_names_and_get_task() -> None:
    assert {"hyperparam", "quadratic"} <= set(task_names())
    assert task_names() == sorted(task_names())
    assert get_task("quadratic").name == "quadratic"
    with pytest.raises(ValueError, match=r"unknown task 'quadratc'.*did you mean quadratic"):
        get_task("quadratc")


def test_algorithm_class_plain_and_restarted() -> None:
    assert algorithm_class("bsvrb_v2") == (BSVRBv2, False)
    assert algorithm_class("re_bsvrb_v2") == (BSVRBv2, True)
    with pytest.raises(ValueError, match=r"unknown algorithm 'nope'.*Known: .*bsvrb_v1"):
        algorithm_class("nope")


# --- typed values --------------------------------------------------------------------------------------


def test_coerce_value_conversions_and_errors() -> None:
    assert coerce_value("lr", 1, float) == 1.0 and isinstance(coerce_value("lr", 1, float), float)
    assert coerce_value("n", 1e4, int) == 10_000 and isinstance(coerce_value("n", 1e4, int), int)
    assert coerce_value("g", 0.5, float | str) == 0.5
    assert coerce_value("g", "theory", float | str) == "theory"
    assert coerce_value("d", None, str | None) is None
    assert coerce_value("flag", True, bool) is True
    assert coerce_value("betas", [0.9, 1], tuple[float, float]) == (0.9, 1.0)
    assert coerce_value("sizes", [1, 2, 3], tuple[int, ...]) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"'betas': expected tuple\[float, float\]"):
        coerce_value("betas", [0.9], tuple[float, float])
    with pytest.raises(ValueError, match=r"bad value for setting 'n': expected int, got 1.5"):
        coerce_value("n", 1.5, int)
    with pytest.raises(ValueError, match=r"'lazy'.*expected bool"):
        coerce_value("lazy", 1, bool)
    with pytest.raises(ValueError, match=r"'n'.*expected int"):
        coerce_value("n", True, int)  # a bool is never a number
    with pytest.raises(ValueError, match=r"hyper-parameter 'lr'.*expected float, got 'abc'"):
        coerce_value("lr", "abc", float, what="hyper-parameter")


def test_field_types_and_coerce_fields() -> None:
    types_ = field_types(QuadraticSettings)
    assert types_["num_blocks"] is int and types_["mu"] is float
    assert coerce_fields(QuadraticSettings, {"mu": 1, "num_blocks": 3.0}) == {"mu": 1.0, "num_blocks": 3}
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['nope'\]; valid: .*num_blocks"):
        coerce_fields(QuadraticSettings, {"nope": 1})


# --- settings ------------------------------------------------------------------------------------------


def test_hyperparam_settings_aliases_and_defaults() -> None:
    spec = get_task("hyperparam")
    defaults = spec.defaults()
    assert defaults["dataset"] == "a8a" and defaults["num_blocks"] == 100 and defaults["data_seed"] == 0
    assert "seed" not in spec.setting_names() and "data_seed" in spec.setting_names()
    settings = spec.make_settings({"data_seed": 3, "flip_probability": 0.2, "lam": 1})
    assert isinstance(settings, HyperparamSettings)
    assert settings.seed == 3 and settings.flip_probability == 0.2 and settings.lam == 1.0
    assert spec.settings_dict(settings)["data_seed"] == 3
    assert spec.dataset(settings) == "a8a"
    assert spec.setting_types()["data_dir"] == (str | None)


def test_make_settings_errors() -> None:
    spec = get_task("quadratic")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['seed'\] for task 'quadratic'.*data_seed"):
        spec.make_settings({"seed": 1})
    with pytest.raises(ValueError, match=r"quadratic setting 'num_blocks': expected int"):
        spec.make_settings({"num_blocks": "many"})
    with pytest.raises(ValueError, match=r"num_blocks must be a positive integer"):
        spec.make_settings({"num_blocks": 0})


@pytest.mark.parametrize(("changes", "message"), [
    ({"dim_y": 0}, "dim_y must be a positive integer"),
    ({"mu": 2.0, "L": 1.0}, "need 0 < mu <= L"),
    ({"noise": -1.0}, "noise must be a finite number >= 0"),
    ({"hessian_noise": math.inf}, "hessian_noise must be"),
])
def test_quadratic_settings_validate(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(QuadraticSettings(), **changes).validate()


# --- algorithms that fit --------------------------------------------------------------------------------


MULTI_BLOCK = {"bsvrb_v1", "bsvrb_v2", "rsvrb", "ma_v1", "ma_v2"}


def test_multi_block_algorithms_fit_every_task_single_block_ones_need_one_block() -> None:
    # the methods for constrained lower levels fit only the constrained tasks (test_constrained.py)
    single = [n for n in algorithm_names() if is_single_block(algorithm_class(n)[0])
              and not getattr(algorithm_class(n)[0], "constrained_only", False)]
    assert "soba" in single and not MULTI_BLOCK & set(single)
    for name in ("hyperparam", "quadratic"):
        spec = get_task(name)
        fitting = spec.compatible_algorithms()
        assert MULTI_BLOCK | {"re_" + n for n in MULTI_BLOCK} <= set(fitting)
        assert not set(single) & set(fitting)
        spec.check_algorithm("re_rsvrb")
        one_block = spec.make_settings({"num_blocks": 1})
        needs_rows = {"saba", "re_saba"} if not spec.finite_sum else set()  # the quadratic draws noise
        assert set(single) - needs_rows <= set(spec.compatible_algorithms(one_block))
        with pytest.raises(IncompatibleAlgorithmError, match=r"soba is a single-block algorithm.*set num_blocks=1"):
            spec.check_algorithm("soba")
        spec.check_algorithm("soba", one_block)
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_task("quadratic").check_algorithm("nope")


def test_problem_level_check_uses_unsuitable_for() -> None:
    spec = get_task("quadratic")
    settings = spec.make_settings({"num_blocks": 1})
    problem, _ = spec.build(settings)
    spec.check_algorithm("soba", settings, problem)
    assert "finite-sum" in (spec.misfit("saba", settings) or "")  # the spec declares its noise samplers
    spec = dataclasses.replace(spec, finite_sum=True)  # a spec that does not: only the built problem tells
    assert spec.misfit("saba", settings) is None
    reason = spec.misfit("saba", settings, problem)
    assert reason is not None and reason.startswith("saba: ") and "finite-sum" in reason
    with pytest.raises(IncompatibleAlgorithmError, match=r"'saba' does not fit task 'quadratic': saba: .*finite-sum"):
        spec.check_algorithm("saba", settings, problem)
    assert "saba" not in spec.compatible_algorithms(settings, problem)


def test_restarted_variant_needs_restart_method(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoRestart(BSVRBv2):
        name = "norestart"
        restart = None  # type: ignore[assignment]

    monkeypatch.setitem(algorithm_registry.ALGORITHMS, "norestart", NoRestart)
    spec = get_task("quadratic")
    assert spec.misfit("norestart") is None
    with pytest.raises(ValueError, match=r"norestart has no restarted variant 're_norestart'.*restartable algorithms"):
        spec.misfit("re_norestart")


def test_allow_list_misfit_says_why() -> None:
    spec = _toy_spec(algorithms=("bsvrb_v2",), algorithms_reason="needs Hessian-vector products only")
    assert spec.misfit("bsvrb_v2") is None and spec.misfit("re_bsvrb_v2") is None
    assert "accepts only bsvrb_v2" in spec.misfit("rsvrb")
    with pytest.raises(IncompatibleAlgorithmError,
                       match=r"algorithm 'rsvrb' does not fit task 'toy': task 'toy' accepts only bsvrb_v2 "
                             r"\(needs Hessian-vector products only\)\. Algorithms that fit: bsvrb_v2 \(and their"):
        spec.check_algorithm("rsvrb")
    assert issubclass(IncompatibleAlgorithmError, ValueError)


def test_single_block_declared_by_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    class SingleBlock(BSVRBv2):
        name = "single"
        single_block = True

    monkeypatch.setitem(algorithm_registry.ALGORITHMS, "single", SingleBlock)
    assert is_single_block(SingleBlock) and not is_single_block(BSVRBv2)
    spec = get_task("quadratic")
    with pytest.raises(IncompatibleAlgorithmError, match=r"single is a single-block algorithm.*num_blocks=10"):
        spec.check_algorithm("single")
    spec.check_algorithm("single", spec.make_settings({"num_blocks": 1}))
    assert "single" not in spec.compatible_algorithms()


def test_custom_fits_hook() -> None:
    spec = _toy_spec(fits=lambda name, cls, settings: "no lazy blocks here" if name == "ma_v1" else None)
    assert spec.misfit("ma_v1") == "no lazy blocks here"
    with pytest.raises(IncompatibleAlgorithmError, match="no lazy blocks here"):
        spec.check_algorithm("ma_v1")
    assert "ma_v1" not in spec.compatible_algorithms() and "ma_v2" in spec.compatible_algorithms()


# --- registration ---------------------------------------------------------------------------------------


def test_register_task(isolated_tasks: dict[str, TaskSpec]) -> None:
    spec = register_task(_toy_spec())
    assert isolated_tasks["toy"] is spec and "toy" in task_names()
    with pytest.raises(ValueError, match="already registered"):
        register_task(_toy_spec())
    register_task(dataclasses.replace(_toy_spec(), description="again"), replace=True)
    assert get_task("toy").description == "again"
    with pytest.raises(ValueError, match=r"aliases of task 'bad' name unknown settings fields \['nope'\]"):
        register_task(dataclasses.replace(_toy_spec(), name="bad", aliases={"x": "nope"}))
    with pytest.raises(ValueError, match=r"dataset_setting 'dataset' of task 'bad2' is not one of its settings"):
        register_task(dataclasses.replace(_toy_spec(), name="bad2", dataset_setting="dataset"))


# --- building -------------------------------------------------------------------------------------------


def test_build_quadratic_closed_form_metrics() -> None:
    spec = get_task("quadratic")
    settings = spec.make_settings({"num_blocks": 5, "dim_x": 3, "dim_y": 2})
    built = spec.build(settings, block_batch=2)
    assert isinstance(built, BuiltTask)
    problem, evaluator = built
    assert problem.num_blocks == 5 and problem.dim_x == 3
    assert isinstance(evaluator, TaskAdapter) and isinstance(evaluator.task, QuadraticEvaluator)
    assert evaluator.iterations_per_epoch() == 3  # ceil(5 / 2)
    algorithm = make_algorithm("bsvrb_v2", problem, block_batch=2)
    metrics = evaluator.evaluate(algorithm)
    q = evaluator.task.quadratic
    x0 = torch.zeros(3, dtype=torch.float64)
    assert metrics["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(q.hypergradient(x0))), rel=1e-12)
    assert metrics["objective"] == pytest.approx(float(q.objective(x0)), rel=1e-12)
    expected_lower = float(torch.linalg.vector_norm(q.lower_solution(x0), dim=-1).mean())  # y0 = 0
    assert metrics["lower_error"] == pytest.approx(expected_lower, rel=1e-12)


def test_build_quadratic_float32_and_device_check() -> None:
    spec = get_task("quadratic")
    problem, _ = spec.build(spec.make_settings({"num_blocks": 2}), dtype=torch.float32)
    assert problem.x0.dtype == torch.float32
    with pytest.raises(ValueError, match=r"task 'quadratic' runs only on cpu, not on 'cuda'"):
        spec.build(device="cuda")
    with pytest.raises(ValueError, match=r"block_batch must be an integer >= 1"):
        spec.build(block_batch=0)


def test_build_hyperparam_breast_cancer() -> None:
    spec = get_task("hyperparam")
    settings = spec.make_settings({"dataset": "breast_cancer", "num_blocks": 3, "batch_size": 8})
    problem, evaluator = spec.build(settings, block_batch=2)
    task = evaluator.task
    assert isinstance(task, HyperparamTask) and problem.num_blocks == 3
    assert evaluator.iterations_per_epoch() == task.X_train.shape[0] / (2 * 8)  # fractional: 364 / 16
    metrics = evaluator.evaluate(make_algorithm("bsvrb_v1", problem, block_batch=2))
    assert {"val_loss", "test_loss", "test_accuracy"} <= set(metrics)


def test_task_adapter_delegates() -> None:
    @dataclass
    class Fake:
        def iterations_per_epoch(self, block_batch: int) -> int:
            return 100 // block_batch

        def evaluate(self, algorithm: object) -> dict[str, float]:
            return {"value": float(algorithm)}  # type: ignore[arg-type]

    adapter = TaskAdapter(Fake(), block_batch=4)
    assert adapter.iterations_per_epoch() == 25
    assert adapter.evaluate(2) == {"value": 2.0}


def test_list_does_not_claim_finite_sum_algorithms_fit_the_noise_quadratic(capsys) -> None:
    from mbbo.cli import main

    spec = get_task("quadratic")
    one_block = spec.make_settings({"num_blocks": 1})
    assert "saba" not in spec.compatible_algorithms(one_block)
    assert "needs a finite-sum problem" in (spec.misfit("saba", one_block) or "")
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("  quadratic"):out.index("  regularization")]
    also = section[section.index("with num_blocks=1 also"):section.index("with num_blocks=1 and")]
    assert "saba" not in section and "srba" not in also and "vrbo" not in also
    assert "refresh_batch_size, period set (no finite sum here): srba, vrbo" in section


def test_registry_imports_alone_and_defines_no_task() -> None:
    """`import mbbo.tasks.registry` alone gives every task, and each task is defined in its own module."""
    import inspect
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mbbo

    src = str(Path(mbbo.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import mbbo.tasks.registry as r; print(','.join(r.task_names()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == task_names()
    assert {"hyperparam", "quadratic", "ndcg"} <= set(task_names())
    for name, spec in registry.TASKS.items():
        assert spec.settings_cls.__module__ != registry.__name__, name
        assert spec.builder.__module__ != registry.__name__, name
    own = {k for k, v in vars(registry).items() if inspect.isclass(v) and v.__module__ == registry.__name__}
    assert own == {"BuiltTask", "IncompatibleAlgorithmError", "TaskAdapter", "TaskSpec"}
    import ast

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(registry))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not [m for m in imported if m.startswith("mbbo.tasks")]  # no cycle: the task modules import it
    assert get_task("quadratic").settings_cls is QuadraticSettings
    assert get_task("hyperparam").settings_cls is HyperparamSettings
