"""The runnable tasks, one module each; importing this package registers them all in
:data:`mbbo.tasks.registry.TASKS` (each task module registers its own spec; the registry imports no task)."""

from mbbo.tasks import (  # noqa: F401 - imported for their registration
    constrained_tasks,
    federated,
    hyperparam,
    ndcg,
    quadratic,
    zoo_tasks,
)
