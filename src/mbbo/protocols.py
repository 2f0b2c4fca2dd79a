"""The two contracts the runner relies on: it knows neither the maths nor the data format."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class SteppableAlgorithm(Protocol):
    """What the runner drives: one `step()` is one iteration of the algorithm.

    `state_dict()` holds every tensor, counter and random-generator state, so that
    `load_state_dict(state_dict())` followed by more steps is bit-identical to never having stopped.
    """

    iteration: int

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def oracle_counts(self) -> dict[str, int]: ...


class EvaluableTask(Protocol):
    """What the runner evaluates: metrics of the algorithm's current iterate (full data, no grad)."""

    def iterations_per_epoch(self) -> float: ...  # may be fractional: epoch = iteration / this

    def evaluate(self, algorithm: Any) -> dict[str, float]: ...
