"""torch.compile in mbbo: persistent caches, the measured compile time, and the `auto` rule.

What is compiled: an algorithm whose iteration is one update between its sampling and its bookkeeping
(`BilevelAlgorithm.run_update`, `compiles_whole_update`: BSVRB_v2, `ma_v2`) has that update compiled as one graph
(table reads and writes, oracles, trackers, hypergradient, upper step; on a block-sharded rank, everything before
the collective: `linear_system_terms`); the others have each oracle compiled (`Oracles.use_compiled`). Both go
through `TimedCompiled`.

* Persistent caches. `enable_persistent_cache()` turns on Inductor's FX graph cache
  (`torch._inductor.config.fx_graph_cache`) and the AOTAutograd cache
  (`torch._functorch.config.enable_autograd_cache`) and points `TORCHINDUCTOR_CACHE_DIR` at
  `<mbbo cache>/torch_compile` (`mbbo.data.cache_dir()`: `$MBBO_CACHE`, else `~/.cache/mbbo`) unless the
  variable is already set to another folder than torch's default. A second process compiling the same
  oracles on the same shapes then loads the compiled code instead of generating it again (Dynamo still traces
  the Python code, which is what remains of the compile time on a warm cache).
* Compile time. `TimedCompiled` wraps one `torch.compile`d function and times every call during which Dynamo
  produced a new graph (its `unique_graphs` counter moved): a first compilation, a recompilation for a new input
  signature, or one triggered by another guard. Such a call is compilation plus one execution (milliseconds
  against seconds); it is added to `seconds`, which the runner reports as `compile_time` and subtracts from the
  run's `time`. A shape is compiled when it comes a second time (its first call runs eagerly), so one-off shapes
  such as a one-point first iteration are not compiled (the estimator initialisation, whose chunks may repeat a
  shape, runs eagerly: `Oracles.eager`). `dynamic=False` (one process) specialises each compilation on the
  shapes; a block-sharded
  process (`mbbo.distributed`) holds a different number of the sampled blocks at every iteration, so its
  update (or oracles) use automatic dynamic shapes (`dynamic=None`: the second block count seen recompiles once
  with a symbolic block dimension, and later counts reuse it) instead of one compilation per count. A counted
  update still runs the first call of each block count eagerly, to record its oracle counts (at most B + 1
  such iterations in a run).
* `auto`. `should_compile(eager_seconds_per_iteration, remaining_iterations)`: compile when the estimated eager
  time of the rest of the run exceeds `AUTO_MIN_EAGER_SECONDS` = `AUTO_COMPILE_SECONDS / AUTO_SAVED_FRACTION`
  (60 s): compilation is budgeted at 30 s (issue 11's target for a fresh cache; measured for BSVRB_v2 on T1 in
  benchmarks/results/compile_cache_bsvrb_v2.md: 29 s fresh, 5.3 s warm in wall time) and compiled oracles save about
  half of an iteration (2x measured on T1), so compilation is repaid only when the eager remainder is longer
  than 60 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from mbbo.data.cache import cache_dir

__all__ = ["AUTO_COMPILE_SECONDS", "AUTO_MIN_EAGER_SECONDS", "AUTO_SAVED_FRACTION", "COMPILE_CHOICES",
           "Counted", "TimedCompiled", "compile_cache_dir", "enable_persistent_cache", "graphs_compiled",
           "should_compile"]

COMPILE_CHOICES = ("auto", "yes", "no")
#: Expected cost of compiling the oracles of one algorithm on a fresh cache (seconds).
AUTO_COMPILE_SECONDS = 30.0
#: Expected fraction of an eager iteration that compiled oracles save.
AUTO_SAVED_FRACTION = 0.5
#: `auto` compiles when the eager remainder of the run is estimated above this (seconds).
AUTO_MIN_EAGER_SECONDS = AUTO_COMPILE_SECONDS / AUTO_SAVED_FRACTION


def compile_cache_dir() -> Path:
    """Where the persistent torch.compile caches live: `<mbbo cache>/torch_compile`."""
    return cache_dir() / "torch_compile"


def enable_persistent_cache() -> Path:
    """Turn on the FX graph and AOTAutograd caches under `compile_cache_dir()` (an already set
    `TORCHINDUCTOR_CACHE_DIR` wins); returns the cache directory in use."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing Inductor's config sets the variable to torch's default: only a different value is the user's
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    # graphs with a torch.cond (`MovingBlocks.read` in a compiled update) are cacheable: its branches are
    # subgraphs of the cached graph module (Inductor bypasses the cache for higher-order operators unless marked)
    inductor_config.unsafe_marked_cacheable_functions = {
        **inductor_config.unsafe_marked_cacheable_functions, "torch.ops.higher_order.cond": torch.__version__}
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled so far in this process (its `unique_graphs` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a `dynamic=False` compilation is specialised on: tensor shapes, dtypes, devices; dict keys; other
    values. Walked by hand (tuples, named tuples, lists, dicts, dataclasses): half the time of `tree_leaves` on a
    compiled update's arguments, a cost paid at every call."""
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, torch.Tensor):
            out.append((a.shape, a.dtype, a.device))
        elif isinstance(a, (tuple, list)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for key, b in a.items():
                out.append(key)
                walk(b)
        elif dataclasses.is_dataclass(a) and not isinstance(a, type):  # e.g. XGrad: its fields' signatures
            out.append(type(a))
            for field in dataclasses.fields(a):
                walk(getattr(a, field.name))
        else:
            out.append(a)

    walk(args)
    return tuple(out)


class Counted(Protocol):
    """What keeps oracle counters (`mbbo.oracles.Oracles`): `counts`, and `counting`, which a compiled graph
    must see False (its Python counting would be baked in as constants)."""

    counts: Counter[str]
    counting: bool


class TimedCompiled:
    """`torch.compile(fn, dynamic=dynamic)` whose calls that compile are timed into `seconds`.

    With `dynamic=False` an input signature (`_signature`) is compiled only when it comes a second time: its
    first call runs `fn` eagerly. One-off shapes (estimator initialisation, the one-point first iteration) then
    cost no compilation, and a run compiles only the shapes it repeats. With automatic dynamic shapes
    (`dynamic=None`, block-sharded ranks) and nothing counted, every call goes to the compiled function.

    `counted`: `fn` calls counted oracles, as a whole iteration's update does. Their counts depend only on the
    input signature, so the eager first call of a signature (under either `dynamic`) records what it counted, and
    each compiled call runs with `counted.counting` off and adds that record.
    """

    def __init__(self, fn: Callable[..., Any], *, dynamic: bool | None = False, counted: Counted | None = None
                 ) -> None:
        self.eager = fn
        self.fn = torch.compile(fn, dynamic=dynamic)
        self.by_signature = dynamic is False or counted is not None
        self.counted = counted
        self.seen: dict[tuple[Any, ...], Counter[str]] = {}  # signatures called so far, with their counts
        self.seconds = 0.0
        self.compilations = 0  # calls that compiled
        self.graphs = 0  # graphs they compiled (more than one per call: graph breaks)

    def __call__(self, *args: Any) -> Any:
        counts: Counter[str] = Counter()
        if self.by_signature:
            key = _signature(args)
            if key not in self.seen:
                before = Counter(self.counted.counts) if self.counted is not None else Counter()
                out = self.eager(*args)
                self.seen[key] = Counter(self.counted.counts) - before if self.counted is not None else Counter()
                return out
            counts = self.seen[key]
        before = graphs_compiled()
        start = time.perf_counter()
        with self._uncounted():
            out = self.fn(*args)
        if graphs_compiled() != before:
            self.seconds += time.perf_counter() - start
            self.compilations += 1
            self.graphs += graphs_compiled() - before
        if self.counted is not None:
            self.counted.counts.update(counts)
        return out

    @contextlib.contextmanager
    def _uncounted(self) -> Iterator[None]:
        if self.counted is None:
            yield
            return
        self.counted.counting = False
        try:
            yield
        finally:
            self.counted.counting = True


def should_compile(eager_seconds_per_iteration: float, remaining_iterations: int) -> bool:
    """The `auto` rule: compile iff the estimated eager remainder exceeds `AUTO_MIN_EAGER_SECONDS`."""
    return eager_seconds_per_iteration * remaining_iterations > AUTO_MIN_EAGER_SECONDS
