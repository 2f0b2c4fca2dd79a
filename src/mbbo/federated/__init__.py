"""Federated and decentralised bilevel optimisation: FedNest (and LFedNest, FedNest_SGD, LFedNest_SVRG),
FedMBO [template] and DSBO [template], on one small federated layer.

- :mod:`~mbbo.federated.data`: per-client padded data, the iid and label-shard splits, ``FederatedProblem``;
- :mod:`~mbbo.federated.sampling`: ``ClientSampler`` (n of M, fresh per communication), counter-based batches;
- :mod:`~mbbo.federated.local`: ``LocalSolver`` (SGD / SVRG local steps), ``Aggregator`` (mean / by size);
- :mod:`~mbbo.federated.comm`: ``CommCounter`` and the simulated / ``torch.distributed`` back-ends;
- :mod:`~mbbo.federated.mixing`: ``MixingMatrix`` (ring, random regular; doubly stochastic, connected);
- :mod:`~mbbo.federated.oracles`: per-client oracles vmapped over clients (``torch.func``);
- :mod:`~mbbo.federated.launch`: ``--nproc`` process launcher (gloo on 127.0.0.1).
"""

from __future__ import annotations

from mbbo.federated.base import FederatedAlgorithm
from mbbo.federated.dsbo import DSBO
from mbbo.federated.fedmbo import FedMBO
from mbbo.federated.fednest import FedNest, FedNestSGD, LFedNest, LFedNestSVRG

METHODS: dict[str, type[FederatedAlgorithm]] = {
    c.name: c for c in (FedNest, LFedNest, FedNestSGD, LFedNestSVRG, FedMBO, DSBO)
}
"""Federated methods by name (``mbbo run --task fed_hyperrep --algorithm NAME``)."""

__all__ = ["METHODS", "make_method"]


def make_method(name: str, problem: object, *, seed: int = 0, backend: object = None, **hyper: object
                ) -> FederatedAlgorithm:
    """Builds a federated method by name (ValueError listing the known names)."""
    if name not in METHODS:
        raise ValueError(f"unknown federated method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](problem, seed=seed, backend=backend, **hyper)  # type: ignore[arg-type]
