"""The algorithms' class hierarchy is flat: every registered algorithm derives directly from one base
(`SingleBlockAlgorithm`, `MultiBlockAlgorithm`, or `BilevelAlgorithm` itself), with no other algorithm, family base
or mixin in between; what algorithms share lives in building blocks they call (`mbbo.algorithms.pieces`,
`mbbo.trackers`, `mbbo.linsolve`, `mbbo.steps`, ...), not in chains of overridden hooks."""

from __future__ import annotations

import pytest

from mbbo.algorithms import ALGORITHMS
from mbbo.algorithms._template import TemplateAID
from mbbo.algorithms.base import BilevelAlgorithm, MultiBlockAlgorithm
from mbbo.algorithms.single import SingleBlockAlgorithm

BASES = (BilevelAlgorithm, SingleBlockAlgorithm, MultiBlockAlgorithm)
CLASSES = {**ALGORITHMS, TemplateAID.name: TemplateAID}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_algorithm_derives_directly_from_one_base(name: str) -> None:
    cls = CLASSES[name]
    chain = [k for k in cls.__mro__ if issubclass(k, BilevelAlgorithm)]
    assert len(chain) <= 3, f"{name}: {[k.__name__ for k in chain]}"
    assert cls.__mro__[1] in BASES and all(k in BASES for k in chain[1:]), [k.__name__ for k in chain]
    assert cls.__mro__ == (*chain, object), f"{name} mixes in {[k.__name__ for k in cls.__mro__]}"


def test_no_registered_algorithm_subclasses_another() -> None:
    registered = set(ALGORITHMS.values())
    for name, cls in CLASSES.items():
        assert not (set(cls.__mro__[1:]) & registered), name
