"""mbbo.state: generic snapshots of declared state, building blocks' `state_fields`, attributes exposed from a
State dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from mbbo.state import (
    SHARDED_ROWS,
    STATE_FORMAT,
    UNSET,
    StateField,
    StateFields,
    expose_state,
    generator_states,
    load_dataclass,
    load_generator_states,
    restored,
    sharded_names,
    snapshot,
)
from mbbo.steps import AdamState, CountState


class Counter(StateFields):
    state_fields = ("total", "history")

    def __init__(self) -> None:
        self.total = 0
        self.history = torch.zeros(3)


@dataclass
class Example:
    t: int = 0
    w: Tensor = UNSET
    rule: AdamState = UNSET
    counter: Counter = field(default_factory=Counter)
    maybe: Tensor | None = None
    rows: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)


def _example() -> Example:
    return Example(t=3, w=torch.arange(4.0), rule=AdamState(2, [torch.ones(2)], [torch.full((2,), 0.5)]),
                   rows=torch.zeros(2, 1))


def test_snapshot_is_a_detached_copy_of_plain_values() -> None:
    state = _example()
    state.counter.total = 7
    saved = snapshot(state)
    assert saved["t"] == 3 and saved["maybe"] is None and saved["counter"]["total"] == 7
    assert set(saved["counter"]) == {"total", "history"} and set(saved["rule"]) == {"count", "exp_avg", "exp_avg_sq"}
    saved["w"].add_(1.0)
    saved["rule"]["exp_avg"][0].add_(1.0)
    assert torch.equal(state.w, torch.arange(4.0)) and torch.equal(state.rule.exp_avg[0], torch.ones(2))
    with pytest.raises(TypeError, match=r"state\['bad'\]: cannot checkpoint a object"):
        snapshot({"bad": object()}, "state")


def test_load_dataclass_round_trip_rebuilds_frozen_states_and_loads_blocks_in_place() -> None:
    source = _example()
    source.counter.total, source.maybe = 5, torch.ones(1)
    target = Example(w=torch.zeros(4), rule=AdamState(0, [torch.zeros(2)], [torch.zeros(2)]), rows=torch.ones(2, 1))
    counter = target.counter
    load_dataclass(target, snapshot(source))
    assert target.counter is counter and counter.total == 5
    assert target.t == 3 and torch.equal(target.w, source.w) and torch.equal(target.maybe, torch.ones(1))
    assert isinstance(target.rule, AdamState) and target.rule.count == 2
    assert torch.equal(target.rule.exp_avg_sq[0], torch.full((2,), 0.5))
    assert sharded_names(target) == ["rows"]


def test_load_names_what_does_not_fit() -> None:
    target = _example()
    saved = snapshot(_example())
    del saved["w"]
    with pytest.raises(ValueError, match=r"algo: the checkpoint holds fields .* Example has"):
        load_dataclass(target, saved, "algo")
    saved = snapshot(_example()) | {"t": torch.ones(1)}
    with pytest.raises(TypeError, match=r"algo.t: the checkpoint holds a tensor where a int is expected"):
        load_dataclass(target, saved, "algo")
    with pytest.raises(ValueError, match="lacks"):
        Counter().load_state_dict({"total": 1})
    assert restored(CountState(1), {"count": 4}) == CountState(4)
    assert restored(None, torch.ones(2)).shape == (2,)


def test_expose_state_forwards_attributes_and_guards_names() -> None:
    class Holder:
        @dataclass
        class State:
            a: int = 1

        def __init__(self) -> None:
            self.state = self.State()

    expose_state(Holder)
    assert isinstance(Holder.__dict__["a"], StateField)
    h = Holder()
    h.a = 5
    assert h.state.a == 5 and h.a == 5 and "a" not in vars(h)

    class Clash:
        @dataclass
        class State:
            run: int = 0

        def run(self) -> None: ...

    with pytest.raises(TypeError, match="hides"):
        expose_state(Clash)


def test_generator_states_round_trip() -> None:
    gens = {"a": torch.Generator().manual_seed(1)}
    saved = generator_states(gens)
    first = torch.rand(2, generator=gens["a"])
    load_generator_states(gens, saved)
    assert torch.equal(torch.rand(2, generator=gens["a"]), first)
    with pytest.raises(ValueError, match=r"lacks the random generator state\(s\) \['a'\]"):
        load_generator_states(gens, {})
    assert STATE_FORMAT == 2
