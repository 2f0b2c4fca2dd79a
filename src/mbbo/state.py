"""Explicit, generically checkpointed state (in the spirit of optax's NamedTuple states and torch.optim).

Everything that changes while an algorithm or a building block runs is declared once, and saving / restoring
it is derived from that declaration, so that no class writes its own `state_dict` code:

- an algorithm declares a dataclass `State` (extending `BilevelAlgorithm.State` or `FederatedAlgorithm.State`)
  whose fields are its iterates, previous iterates, estimators, counters and nested building blocks;
- a building block (`MovingBlocks`, `BlockSampler`, `RowSampler`, ...) lists its state attributes in
  `state_fields` and inherits `StateFields`.

A value is saved by `snapshot`: tensors are cloned, numbers / strings / None kept, dataclasses (the step rules'
states) and lists / tuples / dicts saved field by field, and objects with a `state_dict` (building blocks)
saved by it. `restored` is the inverse, given the value it replaces. `expose_state(cls)` makes each field of
`cls.State` an attribute of the instances (`algorithm.v` reads and writes `algorithm.state.v`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

SCALARS = (bool, int, float, str)
# layout of the algorithms' `state_dict` (1: hand-written per-algorithm dicts, before issue 11)
STATE_FORMAT = 2
# default of the State fields that an algorithm's __init__ sets (dataclass fields after defaulted ones need one)
UNSET: Any = None


def snapshot(value: Any, where: str = "state") -> Any:
    """A detached copy of `value` made of tensors, numbers, strings, None, lists and dicts."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, SCALARS):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: snapshot(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if hasattr(value, "state_dict"):
        return value.state_dict()
    if isinstance(value, list | tuple):
        return [snapshot(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: snapshot(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: cannot checkpoint a {type(value).__name__}; state holds tensors, numbers, "
                    "dataclasses, lists, dicts or objects with state_dict / load_state_dict")


def restored(current: Any, saved: Any, where: str = "state") -> Any:
    """The value that replaces `current` when `saved` (a `snapshot`) is loaded; objects with a
    `load_state_dict` are loaded in place and returned."""
    if isinstance(saved, Tensor):
        if current is not None and not isinstance(current, Tensor):
            raise TypeError(f"{where}: the checkpoint holds a tensor where a {type(current).__name__} is expected")
        return saved.detach().clone()
    if current is None and not isinstance(saved, SCALARS):
        return snapshot(saved, where)
    if current is None or isinstance(current, SCALARS):
        if saved is not None and not isinstance(saved, SCALARS):
            raise TypeError(f"{where}: the checkpoint holds a {type(saved).__name__} where a number is expected")
        return saved
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        values = _fields_of(current, saved, where)
        return type(current)(**values)  # frozen dataclasses (step-rule states) are rebuilt, not mutated
    if hasattr(current, "load_state_dict"):
        current.load_state_dict(saved)
        return current
    if isinstance(current, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(current):
            raise ValueError(f"{where}: the checkpoint holds {saved!r:.60} where {len(current)} values are expected")
        return type(current)(restored(c, s, f"{where}[{i}]") for i, (c, s) in enumerate(zip(current, saved,
                                                                                          strict=True)))
    if isinstance(current, Mapping):
        return {k: restored(current.get(k), v, f"{where}[{k!r}]") for k, v in saved.items()}
    raise TypeError(f"{where}: cannot restore a {type(current).__name__}")


def _fields_of(current: Any, saved: Any, where: str) -> dict[str, Any]:
    """The restored fields of dataclass `current` from the mapping `saved` (same field names, else an error)."""
    names = [f.name for f in dataclasses.fields(current)]
    if not isinstance(saved, Mapping) or set(saved) != set(names):
        have = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise ValueError(f"{where}: the checkpoint holds fields {have}, {type(current).__name__} has {sorted(names)}")
    return {n: restored(getattr(current, n), saved[n], f"{where}.{n}") for n in names}


def load_dataclass(current: Any, saved: Any, where: str = "state") -> None:
    """Loads `saved` into the (mutable) dataclass `current` field by field, in place."""
    for name, value in _fields_of(current, saved, where).items():
        setattr(current, name, value)


class StateFields:
    """Mixin for building blocks: `state_dict` / `load_state_dict` from the attributes named in `state_fields`."""

    state_fields: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        return {name: snapshot(getattr(self, name), f"{type(self).__name__}.{name}") for name in self.state_fields}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [n for n in self.state_fields if n not in state]
        if missing:
            raise ValueError(f"{type(self).__name__}: the checkpoint lacks {missing}")
        for name in self.state_fields:
            setattr(self, name, restored(getattr(self, name), state[name], f"{type(self).__name__}.{name}"))


def generator_states(generators: Mapping[str, torch.Generator]) -> dict[str, Tensor]:
    """The states of named random generators (saved beside the State)."""
    return {k: g.get_state() for k, g in generators.items()}


def load_generator_states(generators: Mapping[str, torch.Generator], states: Mapping[str, Tensor]) -> None:
    missing = sorted(set(generators) - set(states))
    if missing:
        raise ValueError(f"the checkpoint lacks the random generator state(s) {missing}")
    for k, g in generators.items():
        g.set_state(states[k])


def expose_state(cls: type) -> None:
    """Makes each field f of `cls.State` readable and writable as `instance.f` (kept in `instance.state`)."""
    for f in dataclasses.fields(cls.State):  # type: ignore[attr-defined]
        existing = next((k.__dict__[f.name] for k in cls.__mro__ if f.name in k.__dict__), None)
        if isinstance(existing, StateField):
            continue
        if existing is not None:
            raise TypeError(f"{cls.__name__}: state field {f.name!r} hides the class attribute of that name")
        setattr(cls, f.name, StateField(f.name))


class StateField:
    """Descriptor forwarding `instance.<name>` to `instance.state.<name>`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.state, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.state, self.name, value)


# metadata of a State field whose rows are split over processes (one row per owned client / agent): saved
# gathered, loaded as this process's rows. Declared `x: Tensor = field(default=UNSET, metadata=SHARDED_ROWS)`.
SHARDED_ROWS = {"sharded_rows": True}


def sharded_names(state: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(state) if f.metadata.get("sharded_rows")]
