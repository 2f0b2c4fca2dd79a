"""The CPU cost of the block-sharded code path itself, without communication: one process, one core.

T1 (a8a, task defaults), m = 10^4, B = 100, b = 64, float32, BSVRB_v2, compiled, 1 thread. One process times,
interleaved in `--cycles` cycles of `--iterations` iterations each:

- "R=1,B=50": the unsharded run at B / 2 (what each of two perfectly split ranks would compute);
- "rank 0 of 2, no network,B=100": rank 0 of R = 2 at B (`block_strata=2`, so it owns exactly B / 2 of each
  sample), its all_gather replaced by a local copy of its own buffer into every rank's slot, completed at once;
- "R=1,B=100": the unsharded run at B.

No second process runs, nothing is sent and no rank waits: the difference between the first two rows is what the
sharded path adds on one core (the row draw for all B blocks, the placement of the sample, packing and reordering,
and the eager mean and upper step after the collective, which the 1-process run has inside its compiled graph).
R=1,B=100 / rank-0 is then the speed-up R = 2 could reach on two such cores with a free, instant collective.

    python benchmarks/bench_distributed_overhead.py [--cycles 15] [--iterations 20] [--warmup 150]

Writes benchmarks/results/distributed_overhead.{json,md} (atomic writes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_distributed import DATA, RESULTS, load_lines, uptime, write_results

NO_NETWORK = "rank 0 of 2, no network"


class CompletedWork:
    """A collective that has already completed (what `mbbo.distributed.finish` waits for)."""

    def is_completed(self) -> bool:
        return True

    def wait(self) -> bool:
        return True


def local_all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any = None,
                            async_op: bool = False) -> CompletedWork:
    """`dist.all_gather_single` without a network: this rank's `tensor` in every rank's slot of `output`."""
    slots = output.view(-1, tensor.numel())
    slots.copy_(tensor.reshape(1, -1).expand_as(slots))
    return CompletedWork()


def configurations(B: int) -> list[tuple[str, int, bool]]:
    """(label, block batch, rank 0 of 2 without network) of one cycle."""
    return [(f"R=1,B={B // 2}", B // 2, False), (f"{NO_NETWORK},B={B}", B, True), (f"R=1,B={B}", B, False)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=15)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--out", type=Path, default=RESULTS / "distributed_overhead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.distributed import BlockShard
    from mbbo.tasks.registry import get_task

    m, B, b = 10_000, 100, 64
    dist.all_gather_single = local_all_gather_single  # this process only: no group is initialised
    os.environ["MBBO_DIST_WAIT"] = "block"  # the work has completed: `finish` only calls its `wait`
    spec = get_task("hyperparam")
    settings = spec.make_settings({"dataset": "a8a", "data_dir": str(DATA), "num_blocks": m, "batch_size": b})
    hyper = spec.hyper_defaults("bsvrb_v2", ["block_sampling", "estimator_init", "lower_update"])
    algs = {}
    for label, bb, sharded in configurations(B):
        problem, _ = spec.build(settings, block_batch=bb, dtype=torch.float32)
        if sharded:
            problem.shard = BlockShard(m, 0, 2)
        algs[label] = make_algorithm("bsvrb_v2", problem, seed=0, block_batch=bb, block_strata=2 if sharded else 1,
                                     compile=True, **hyper)
    load_before = uptime()
    for alg in algs.values():
        for _ in range(args.warmup):
            alg.step()
    ms: dict[str, list[float]] = {label: [] for label in algs}
    for _ in range(args.cycles):
        for label, alg in algs.items():
            start = time.perf_counter()
            for _ in range(args.iterations):
                alg.step()
            ms[label].append(1e3 * (time.perf_counter() - start) / args.iterations)
    half, rank0, whole = (label for label, _, _ in configurations(B))
    result = {"setting": {"task": "hyperparam a8a (T1, task defaults)", "algorithm": "bsvrb_v2", "m": m, "B": B,
                          "b": b, "dtype": "float32", "compile": True, "threads": 1, "cycles": args.cycles,
                          "iterations": args.iterations, "warmup": args.warmup, "torch": torch.__version__},
              "load_before": load_before, "load_after": uptime(),
              "ms_per_iteration": {k: statistics.median(v) for k, v in ms.items()}, "all": ms,
              "sharded_overhead_ms": statistics.median(a - h for a, h in zip(ms[rank0], ms[half], strict=True)),
              "speedup_bound_R2": statistics.median(w / a for w, a in zip(ms[whole], ms[rank0], strict=True))}
    write_results(args.out, result, report(result))
    return result


def report(r: dict[str, Any]) -> str:
    s = r["setting"]
    lines = [f"# The block-sharded code path without communication: T1, m = {s['m']}, B = {s['B']}, b = {s['b']}, "
             f"compiled, 1 process, 1 thread, {s['cycles']} cycles of {s['iterations']} iterations", "",
             *load_lines(r),
             "| configuration | ms / iteration (median over cycles) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["ms_per_iteration"].items()]
    lines += ["", f"what the sharded path adds on one core (rank 0 of 2 at B minus R = 1 at B / 2, per cycle): "
              f"**{r['sharded_overhead_ms']:.2f} ms** per iteration", "",
              f"speed-up bound at R = 2 with a free, instant collective (R = 1 at B over rank 0 of 2, per cycle): "
              f"**{r['speedup_bound_R2']:.2f}**", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
