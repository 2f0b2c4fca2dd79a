"""The contract every registered algorithm keeps (and `algorithms/_template.py`), checked on a tiny problem it fits:

- save -> load -> step is bit-identical to stepping on (the declared `State` is complete);
- the same seed gives the same trajectory;
- every bad hyper-parameter (generated from the `Config` field types) is rejected with a message naming it;
- zero in a numeric field is rejected naming it, or the steps stay finite with it;
- a few steps keep everything finite;
- the oracle counters never decrease, grow at every step, and grow as `oracle_calls_per_step()` declares;
- every restarted variant (`re_<name>`, default configuration) steps across stage boundaries with its step sizes
  decayed; an algorithm without `restart()` has no `re_` variant.

A new algorithm is covered as soon as it is registered (`mbbo.algorithms.register_algorithm`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

import pytest
import torch

from mbbo.algorithms import ALGORITHMS, algorithm_names, make_algorithm, register_algorithm
from mbbo.algorithms._template import TemplateAID
from mbbo.algorithms.base import BilevelAlgorithm, MultiBlockAlgorithm
from mbbo.problem import MultiBlockProblem
from mbbo.tasks.registry import get_task

CLASSES: dict[str, type[BilevelAlgorithm]] = {**ALGORITHMS, TemplateAID.name: TemplateAID}

# tiny instances of the registry's tasks, tried in order: the first one an algorithm fits is used
PROBLEMS: list[tuple[str, dict[str, Any]]] = [
    ("benchopt_quadratic", {"n_inner": 24, "n_outer": 24, "d_in": 3, "d_out": 2, "batch_size": 4}),
    ("quadratic", {"num_blocks": 4, "dim_x": 3, "dim_y": 2, "batch_size": 2}),
    ("toy_coupled", {"dim": 3}),
    ("toy_sflcb", {}),
]
STEPS_BEFORE_SAVE, STEPS_AFTER = 3, 2
# integer loop lengths above this are cut to it (fast steps; the contract does not depend on them)
MAX_LOOP = 2
LOOP_WORDS = ("steps", "terms", "rounds", "epochs")


@functools.cache
def _problem(index: int) -> MultiBlockProblem:
    task, settings = PROBLEMS[index]
    spec = get_task(task)
    return spec.build(spec.make_settings(settings), block_batch=2)[0]


@functools.cache
def fitting_problem(name: str) -> MultiBlockProblem:
    """The first tiny problem the algorithm fits; multi-block methods try the multi-block ones first."""
    cls = CLASSES[name]
    order = sorted(range(len(PROBLEMS)), key=lambda i: issubclass(cls, MultiBlockAlgorithm) and i == 0)
    for index in order:
        task, settings = PROBLEMS[index]
        spec = get_task(task)
        if name in ALGORITHMS and spec.misfit(name, spec.make_settings(settings)) is not None:
            continue
        problem = _problem(index)
        if cls.unsuitable_for(problem) is None and (name in ALGORITHMS or problem.num_blocks == 1):
            return problem
    raise AssertionError(f"no tiny problem fits {name}: add one to PROBLEMS")


def small_hyper(name: str, problem: MultiBlockProblem) -> dict[str, Any]:
    """Overrides that keep a step cheap: B = 2 blocks, loops of at most MAX_LOOP."""
    config = CLASSES[name].Config()
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "block_batch":
            out[f.name] = min(2, problem.num_blocks)
        elif (isinstance(value, int) and not isinstance(value, bool) and value > MAX_LOOP
              and any(w in f.name for w in LOOP_WORDS)):
            out[f.name] = MAX_LOOP
    return out


def build(name: str, seed: int = 0, **hyper: Any) -> BilevelAlgorithm:
    problem = fitting_problem(name)
    return CLASSES[name](problem, seed=seed, **{**small_hyper(name, problem), **hyper})


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-identical nested states (tensors equal with the same dtype; NaNs nowhere)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


NAMES = sorted(CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_step_is_bit_identical(name: str) -> None:
    reference = build(name, seed=3)
    for _ in range(STEPS_BEFORE_SAVE):
        reference.step()
    saved = reference.state_dict()
    resumed = build(name, seed=11)  # another seed: everything must come from the checkpoint
    resumed.load_state_dict(saved)
    assert_same(resumed.state_dict(), saved)
    for _ in range(STEPS_AFTER):
        reference.step()
        resumed.step()
    assert_same(resumed.state_dict(), reference.state_dict())
    assert torch.equal(resumed.x, reference.x)
    assert torch.equal(resumed.lower_variables(), reference.lower_variables())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_a_copy(name: str) -> None:
    algorithm = build(name)
    algorithm.step()
    saved = algorithm.state_dict()
    before = algorithm.x.clone()
    saved["state"]["x"].add_(1.0)
    assert torch.equal(algorithm.x, before)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_trajectory_and_finite(name: str) -> None:
    a, b = build(name, seed=5), build(name, seed=5)
    for _ in range(STEPS_BEFORE_SAVE):
        a.step()
        b.step()
        assert torch.equal(a.x, b.x) and torch.equal(a.lower_variables(), b.lower_variables())
        assert a.is_finite()
        assert all(bool(torch.isfinite(t).all()) for t in a.state_tensors() if t.is_floating_point())
    assert_same(a.state_dict(), b.state_dict())
    assert a.iteration == STEPS_BEFORE_SAVE


@pytest.mark.parametrize("name", NAMES)
def test_oracle_counters_grow_as_declared(name: str) -> None:
    algorithm = build(name)
    previous = algorithm.oracle_counts()
    for k in range(STEPS_BEFORE_SAVE):
        algorithm.step()
        now = algorithm.oracle_counts()
        assert all(now.get(kind, 0) >= count for kind, count in previous.items()), (k, previous, now)
        assert sum(now.values()) > sum(previous.values()), f"step {k} made no oracle call"
        declared = algorithm.oracle_calls_per_step()
        if declared is not None and k > 0:
            grown = {kind: now.get(kind, 0) - previous.get(kind, 0) for kind in set(now) | set(declared)}
            assert {kd: n for kd, n in grown.items() if n} == {kd: n for kd, n in declared.items() if n}, k
        previous = now


RESTARTED = sorted(n for n in algorithm_names() if n.startswith("re_"))


@pytest.mark.parametrize("name", RESTARTED)
def test_restarted_variant_steps_across_stage_boundaries(name: str) -> None:
    """`re_<name>` with the default configuration (stages of 1, then 2 steps): each stage boundary decays the step
    sizes in use (defaults resolved) and restarts; everything stays finite."""
    base = name.removeprefix("re_")
    problem = fitting_problem(base)
    algorithm = make_algorithm(name, problem, seed=0, stage_length=1, **small_hyper(base, problem))
    initial = {k: algorithm.inner.hyper(k) for k in algorithm.decayed}
    for _ in range(3):
        algorithm.step()
        assert algorithm.is_finite()
    assert algorithm.stage == 2 and algorithm.iteration == 3
    for k, value in initial.items():
        assert algorithm.inner.hyper(k) == pytest.approx(value / algorithm.decay**2, rel=1e-12), k


def test_no_restarted_variant_without_restart() -> None:
    unrestartable = sorted(n for n, c in ALGORITHMS.items() if not hasattr(c, "restart"))
    assert unrestartable, "every algorithm restarts: drop this test's premise"
    for name in unrestartable:
        assert f"re_{name}" not in algorithm_names()
        with pytest.raises(ValueError, match=rf"{name} has no restarted variant .*restartable algorithms: .*bsvrb_v1"):
            make_algorithm(f"re_{name}", fitting_problem(name))


# --- bad hyper-parameters, generated from the Config field types -------------------------------------------


def _allowed(annotation: Any) -> set[type]:
    """The plain types a field's annotation admits (int, float, bool, str, NoneType); others are dropped."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set().union(*(_allowed(a) for a in typing.get_args(annotation)))
    if annotation is type(None) or annotation is None:
        return {type(None)}
    if annotation in (int, float, bool, str):
        return {annotation}
    if typing.get_origin(annotation) is typing.Literal:
        return {str}
    return {object}


def bad_values(annotation: Any, default: Any) -> list[Any]:
    """Values no field of this type may take: non-finite and signed-negative numbers, booleans for numbers,
    strings for numbers, numbers for flags and names, None for required fields, an unknown name for a
    choice."""
    if typing.get_origin(annotation) is tuple:  # a fixed-length tuple of numbers (Adam's betas)
        good = tuple(default)
        return [None, "0.9", good[:-1], (math.nan, *good[1:]), (True, *good[1:]), (-1.0, *good[1:])]
    allowed = _allowed(annotation)
    if object in allowed:
        return []
    out: list[Any] = []
    if type(None) not in allowed:
        out.append(None)
    if float in allowed or int in allowed:
        out += [math.nan, math.inf, -math.inf, True, -1.0 if float in allowed else -1]
        if str not in allowed:
            out.append("1")
        if float not in allowed:
            out.append(1.5)
    if bool in allowed and not (allowed & {int, float}):
        out += [1, "yes"]
    if str in allowed and not (allowed & {int, float}):
        out += [1 if default is None or isinstance(default, str) else "?", "no-such-choice"]
    return out


def _cases() -> list[tuple[str, str, Any]]:
    cases = []
    for name in NAMES:
        config_cls = CLASSES[name].Config
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            default = getattr(config_cls(), f.name)
            cases += [(name, f.name, bad) for bad in bad_values(hints[f.name], default)]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", NAMES)
def test_every_hyper_parameter_field_gets_bad_values(name: str) -> None:
    """Each Config field has a plain type (the generator below can feed it bad values), or is listed here."""
    config_cls = CLASSES[name].Config
    hints = typing.get_type_hints(config_cls)
    untyped = [f.name for f in dataclasses.fields(config_cls)
               if object in _allowed(hints[f.name]) and typing.get_origin(hints[f.name]) is not tuple]
    assert set(untyped) <= {"projection"}, untyped  # a Projection object / radius / None (checked in test_zoo_f2sa)


@pytest.mark.parametrize(("name", "field", "bad"), CASES, ids=[f"{n}-{f}-{b!r}" for n, f, b in CASES])
def test_bad_hyper_parameter_is_rejected_naming_it(name: str, field: str, bad: Any) -> None:
    problem = fitting_problem(name)
    hyper = {**small_hyper(name, problem), field: bad}
    with pytest.raises((ValueError, TypeError)) as info:
        CLASSES[name](problem, seed=0, **hyper)
    assert field in str(info.value), str(info.value)


# --- the registry ------------------------------------------------------------------------------------------


def test_register_algorithm_adds_and_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    from mbbo.algorithms import make_algorithm, registry

    monkeypatch.setattr(registry, "ALGORITHMS", dict(registry.ALGORITHMS))
    assert register_algorithm(TemplateAID) is TemplateAID
    problem = fitting_problem(TemplateAID.name)
    algorithm = make_algorithm("template_aid", problem, seed=0, lr=0.05)
    algorithm.step()
    assert algorithm.config.lr == 0.05 and "template_aid" in registry.algorithm_names()
    assert "re_template_aid" in registry.algorithm_names()

    class Clash(TemplateAID):
        name = "template_aid"

    with pytest.raises(ValueError, match="registered already"):
        register_algorithm(Clash)
    assert register_algorithm(Clash, replace=True) is Clash

    class Restartish(TemplateAID):
        name = "re_thing"

    with pytest.raises(ValueError, match="name must be"):
        register_algorithm(Restartish)
    with pytest.raises(TypeError, match="BilevelAlgorithm subclass"):
        register_algorithm(int)  # type: ignore[type-var]


def test_old_checkpoint_format_is_refused() -> None:
    algorithm = build("soba")
    old = {k: v for k, v in algorithm.state_dict().items() if k not in ("format", "state")}
    old |= {"algorithm": {"v": algorithm.v.clone()}, "x": algorithm.x.clone()}
    with pytest.raises(ValueError, match="state format 1"):
        algorithm.load_state_dict(old)


def test_a_state_field_cannot_hide_a_method() -> None:
    with pytest.raises(TypeError, match="hides"):
        class Bad(TemplateAID):
            @dataclasses.dataclass
            class State(TemplateAID.State):
                step: int = 0


@pytest.mark.parametrize("name", ["bsvrb_v2", "soba", "rsvrb"])
def test_restarted_save_load_step_is_bit_identical(name: str) -> None:
    """`re_<name>`: the stage counters and the reservoir-sampled iterate are state too (stages of 2 steps)."""
    from mbbo.algorithms.restart import Restarted

    def make(seed: int) -> Restarted:
        return Restarted(build(name, seed=seed), stage_length=2, output="uniform")

    reference = make(3)
    for _ in range(STEPS_BEFORE_SAVE):
        reference.step()
    resumed = make(11)
    resumed.load_state_dict(reference.state_dict())
    for _ in range(STEPS_AFTER + 2):
        reference.step()
        resumed.step()
    assert reference.stage == resumed.stage >= 2
    assert_same(resumed.state_dict(), reference.state_dict())
    with pytest.raises(ValueError, match="state format 1"):
        resumed.load_state_dict({"inner": reference.inner.state_dict(), "stage": 1})


def _zero_cases() -> list[tuple[str, str, Any]]:
    cases = []
    for name in NAMES:
        config_cls = CLASSES[name].Config
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            allowed = _allowed(hints[f.name])
            if object in allowed or not allowed & {int, float}:
                continue
            cases.append((name, f.name, 0.0 if float in allowed else 0))
    return cases


ZERO_CASES = _zero_cases()


@pytest.mark.parametrize(("name", "field", "zero"), ZERO_CASES, ids=[f"{n}-{f}" for n, f, _ in ZERO_CASES])
def test_zero_is_rejected_naming_it_or_keeps_the_steps_finite(name: str, field: str, zero: Any) -> None:
    """Zero, the boundary of every numeric field: either the Config rejects it with the field's name (a step
    size, a count, a radius, a regularisation that must be positive), or the algorithm takes its steps with
    everything finite (zero is a meaningful value: no momentum, no decay, ...)."""
    problem = fitting_problem(name)
    hyper = {**small_hyper(name, problem), field: zero}
    try:
        algorithm = CLASSES[name](problem, seed=0, **hyper)
    except (ValueError, TypeError) as error:
        assert field in str(error), str(error)
        return
    for _ in range(STEPS_BEFORE_SAVE):
        algorithm.step()
        assert algorithm.is_finite(), f"{name} with {field}={zero!r} was accepted but is not finite"
        assert all(bool(torch.isfinite(t).all()) for t in algorithm.state_tensors() if t.is_floating_point())
