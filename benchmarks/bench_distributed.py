"""Block-sharded BSVRB_v2 on T1: ms/iteration with R = 1 and R = 2 processes, bytes per iteration, and a model of
larger R.

T1 (a8a, the task's defaults: reshuffled blocks and rows, delayed lower update, U[0, 1) initialisation), m = 10^4
blocks, B = 100 sampled blocks, b = 64 rows, float32, `torch.set_num_threads(1)` in each process.

This machine is shared and noisy (the same configuration measured 7.6 and 12.5 ms per iteration in two spawns a
minute apart), so the configurations are not timed in separate spawns but interleaved in one pair of processes
(gloo on 127.0.0.1), and ratios are taken within each cycle. Per oracle mode (`--modes`: eager, or
`compile=True`, whose sharded update compiles with a symbolic block dimension), two processes build T1 and one
algorithm per configuration, warm each up for `--warmup` iterations (compilation included), then run `--cycles`
cycles; in each cycle every configuration runs `--iterations` iterations between two barriers:

- "R=1,B=25/50/100": rank 0 alone, unsharded (rank 1 waits in the barrier); the fit of the compute model;
- "R=2,B=100": both ranks block-sharded, gathering through shared memory (`mbbo.shm_exchange`, the default for
  ranks on one machine), and "R=2 (gloo)": the same through gloo's all_gather, polled (`mbbo.distributed.finish`;
  $MBBO_DIST_TRANSPORT=backend);
- "2 x R=1 concurrent,B=50": both ranks, each an independent unsharded run at B / 2: the machine's ceiling for
  R = 2 (perfect balance, no communication, whatever the two virtual cores deliver together).
- "R=1 (block_strata=2)" and "R=2 (block_strata=2)": the same with stratified block sampling (B / 2 blocks of each
  class i mod 2, so each rank owns exactly B / 2 of every sample; an mbbo option, not the paper's sampling):
  the speed-up without the imbalance of uniformly sampled blocks.
- "2 x R=1 lock-step (gloo)" and "(shared memory)": both ranks, each an independent unsharded run at B / 2 as in
  the ceiling, but the two meet after every iteration and exchange as many bytes as a sharded rank gathers at
  B / 2 blocks: through a gloo `all_gather_single` waited for by `mbbo.distributed.finish`, or through shared
  memory (`mbbo.shm_exchange`: a spin on counters, no system call, no communication thread). This is R = 2 with
  perfect sharding: perfect balance, no sampling or packing overhead, only the once-per-iteration meeting that any run
  equal to the 1-process trajectory needs (x_{t+1} enters every block's oracles at t + 1). R=1 at B over it
  bounds the speed-up any such implementation reaches on this machine.

Wall time (the slowest participating rank) and CPU time per iteration are recorded per cycle; the report gives
per-configuration medians over cycles, and the medians over cycles of the speed-up R=1 / R=2 and of the ceiling
R=1 / concurrent, with the machine's load (`uptime`) before and after.

Model of R processes (specs/distributed.md section 1): one iteration costs

    T(R, B) = c0 + c1 * E[max_r n_r(B, R)] + (R - 1) * alpha + (R - 1) / R * B * beta_bytes / bandwidth

with n_r the sampled blocks rank r owns (B blocks uniformly over R owners; its expected maximum is computed by
Monte Carlo), c0 (replicated work: x update, sampling) and c1 (per block) fitted on the R = 1 CPU times,
beta_bytes the measured bytes gathered per block, and a ring all_gather (R - 1 steps of latency alpha). The
network assumptions are stated in the results: within a node (R <= 8) alpha = 10 us and 25 GB/s, between nodes
alpha = 50 us and 12.5 GB/s. Evaluated at R = 8, 64, 512 and plotted against R for B in {10^2, 10^3, 10^4}
(m = 10^6: the iteration cost does not depend on m, only memory does).

    python benchmarks/bench_distributed.py [--cycles 20] [--iterations 20] [--warmup 150] [--modes eager compiled]

Writes benchmarks/results/distributed.json, distributed.md and distributed_model.png (atomic writes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import nnls

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "libsvm"
NETWORKS = {"intra-node (R <= 8)": (10e-6, 25e9), "inter-node (R > 8)": (50e-6, 12.5e9)}
MODEL_R = (8, 64, 512)
MODEL_B = (100, 1000, 10000)
MODES = ("eager", "compiled")
CONCURRENT = "2 x R=1 concurrent"
STRATA = "(block_strata=2)"
LOCKSTEP = "2 x R=1 lock-step"
GLOO = "(gloo)"
MEETINGS = ("gloo", "shared memory")


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def load_lines(r: dict[str, Any]) -> list[str]:
    """The report lines of the machine's load before and after a run."""
    return [f"load before: `{r['load_before']}`", f"load after: `{r['load_after']}`", ""]


def write_results(out: Path, result: dict[str, Any], text: str) -> None:
    """`out`.json and `out`.md (atomic writes), and the report printed."""
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write(out.with_suffix(".md"), text)
    print(text)


def configurations(B: int) -> list[tuple[str, int, bool, str, dict[str, str], int]]:
    """(label, block batch, sharded, who runs it ("rank0" or "both"), environment, block_strata) of one cycle
    (module docstring)."""
    return [*((f"R=1,B={bb}", bb, False, "rank0", {}, 1) for bb in (B // 4, B // 2, B)),
            (f"R=2,B={B}", B, True, "both", {"MBBO_DIST_WAIT": "poll"}, 1),
            (f"R=2 {GLOO},B={B}", B, True, "both", {"MBBO_DIST_TRANSPORT": "backend", "MBBO_DIST_WAIT": "poll"}, 1),
            (f"{CONCURRENT},B={B // 2}", B // 2, False, "both", {}, 1),
            (f"R=1 {STRATA},B={B}", B, False, "rank0", {}, 2),
            (f"R=2 {STRATA},B={B}", B, True, "both", {"MBBO_DIST_WAIT": "poll"}, 2),
            *((f"{LOCKSTEP} ({how}),B={B // 2}", B // 2, False, "both", {"MBBO_DIST_WAIT": "poll"}, 1)
              for how in MEETINGS)]


def meeting(label: str) -> str | None:
    """How the ranks of a lock-step configuration meet after each iteration ("gloo" or "shared memory"; None for the
    other configurations)."""
    if not label.startswith(LOCKSTEP):
        return None
    return next(how for how in MEETINGS if f"({how})" in label)


def _eager_calls(alg: Any) -> int:
    """Compiled-update calls that ran eagerly so far: the first call of each input signature (`TimedCompiled`; a
    sharded rank's signature changes with its number of sampled blocks)."""
    return sum(len(fn.seen) for fn in (alg.compiled_updates or {}).values())


def _timed(fn: Any, seconds: dict[str, float], key: str) -> Any:
    """`fn`, adding its wall time to `seconds[key]`."""
    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[key] += time.perf_counter() - start
    return timed


def _worker(rank: int, world: int, port: int, config: dict[str, Any], out: str) -> None:
    """One of the two ranks: T1 built twice (block-sharded and whole), one algorithm per configuration, the
    warm-up, then the interleaved cycles; saves per configuration and cycle its wall and CPU seconds and the
    gather statistics."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.distributed import BlockShard, finish, timeout_seconds
    from mbbo.shm_exchange import SharedMemoryExchange
    from mbbo.tasks.registry import get_task

    spec = get_task("hyperparam")
    settings = spec.make_settings({"dataset": "a8a", "data_dir": str(DATA), "num_blocks": config["m"],
                                   "batch_size": config["b"]})
    hyper = spec.hyper_defaults("bsvrb_v2", ["block_sampling", "estimator_init", "lower_update"])
    problems = {}  # by (sharded, transport): whole, sharded through shared memory, sharded through gloo
    for key in ((False, "auto"), (True, "auto"), (True, "backend")):
        problems[key], _ = spec.build(settings, block_batch=config["B"], dtype=torch.float32)
        os.environ["MBBO_DIST_TRANSPORT"] = key[1]
        problems[key].shard = BlockShard.from_process_group(config["m"]) if key[0] else BlockShard(config["m"])
    os.environ["MBBO_DIST_TRANSPORT"] = "auto"

    def problem_of(sharded: bool, env: dict[str, str]) -> Any:
        return problems[sharded, env.get("MBBO_DIST_TRANSPORT", "auto")]

    runs = [run for run in configurations(config["B"]) if run[3] == "both" or rank == 0]
    algs = {label: make_algorithm("bsvrb_v2", problem_of(sharded, env), seed=0, block_batch=bb,
                                  block_strata=strata, compile=config["compile"], **hyper)
            for label, bb, sharded, _, env, strata in runs}
    update_seconds = dict.fromkeys(algs, 0.0)  # wall time in `run_update` (the per-block part of the update)
    for label, alg in algs.items():
        alg.run_update = _timed(alg.run_update, update_seconds, label)  # type: ignore[method-assign]

    # the lock-step configurations exchange the bytes a sharded rank gathers at B / 2 blocks (P = 2 points)
    values = torch.randn(config["B"] // 2 * 2 * config["b"]).view(torch.uint8)
    received = torch.empty(2, values.numel(), dtype=torch.uint8)
    exchange = SharedMemoryExchange(timeout_seconds())

    def gloo_meeting() -> None:
        finish(dist.all_gather_single(received.view(-1), values, async_op=True))

    def shared_memory_meeting() -> None:  # as `BlockShard.gather` does through shared memory
        exchange.send_buffer(values.numel()).copy_(values)
        received.copy_(exchange.exchange(values.numel()))

    meetings = {"gloo": gloo_meeting, "shared memory": shared_memory_meeting}

    def iterations(label: str, env: dict[str, str], n: int) -> None:
        os.environ.update(env)
        meet = meetings.get(meeting(label) or "")
        for _ in range(n):
            algs[label].step()
            if meet is not None:
                meet()

    records: dict[str, dict[str, list[float]]] = {label: {} for label in algs}
    for label, _, _, _, env, _ in configurations(config["B"]):  # the same sequence of barriers on both ranks
        dist.barrier()
        if label in algs:
            iterations(label, env, config["warmup"])  # also compiles
        dist.barrier()
    for _ in range(config["cycles"]):
        for label, _, sharded, _, env, _ in configurations(config["B"]):
            dist.barrier()
            if label in algs:
                shard = problem_of(sharded, env).shard
                gather0, sent0, coll0, eager0 = (shard.gather_seconds, shard.bytes_sent, shard.collectives,
                                                 _eager_calls(algs[label]))
                update0 = update_seconds[label]
                start, cpu = time.perf_counter(), time.process_time()
                iterations(label, env, config["iterations"])
                cpu = time.process_time() - cpu
                dist.barrier()
                seconds = time.perf_counter() - start
                for key, value in (("wall", seconds), ("cpu", cpu), ("gather", shard.gather_seconds - gather0),
                                   ("bytes", shard.bytes_sent - sent0), ("collectives", shard.collectives - coll0),
                                   ("eager", _eager_calls(algs[label]) - eager0),
                                   ("update", update_seconds[label] - update0)):
                    records[label].setdefault(key, []).append(value)
            else:
                dist.barrier()
    dist.barrier()  # the loopback round trip: one barrier
    start = time.perf_counter()
    for _ in range(200):
        dist.barrier()
    torch.save({"records": records, "barrier_ms": 1e3 * (time.perf_counter() - start) / 200,
                "x_numel": problems[True, "auto"].dim_x}, f"{out}.{rank}")
    dist.destroy_process_group()


def measure(config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Spawn the two processes for one oracle mode; per configuration and cycle: the wall time of the slowest
    participating rank and its CPU time per iteration (ms), rank 0's gather statistics per iteration."""
    from mbbo.distributed import free_port

    out = str(tmp / f"mode-{config['compile']}")
    context = mp.start_processes(_worker, args=(2, free_port(), config, out), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 1800
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError("the benchmark's processes did not finish within 1800 s")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    n = config["iterations"]
    per: dict[str, Any] = {}
    for label in ranks[0]["records"]:
        recs = [r["records"][label] for r in ranks if label in r["records"]]
        cycles = len(recs[0]["wall"])
        per[label] = {
            "wall_ms": [1e3 * max(rec["wall"][c] for rec in recs) / n for c in range(cycles)],
            "cpu_ms": [1e3 * max(rec["cpu"][c] for rec in recs) / n for c in range(cycles)],
            "gather_ms": [1e3 * max(rec["gather"][c] for rec in recs) / n for c in range(cycles)],
            "update_ms": [1e3 * max(rec["update"][c] for rec in recs) / n for c in range(cycles)],
            "bytes_per_iteration": sum(recs[0]["bytes"]) / (n * cycles),
            "collectives_per_iteration": sum(recs[0]["collectives"]) / (n * cycles),
            "eager_iterations": max(sum(rec["eager"]) for rec in recs)}
    return {"configurations": per, "barrier_ms": ranks[0]["barrier_ms"], "x_numel": ranks[0]["x_numel"]}


def expected_max_owned(B: int, R: int, trials: int = 2000) -> float:
    """E[max_r n_r] when B distinct blocks fall on R owners (uniform sampling of blocks, i mod R ownership:
    for m >> B each block's owner is uniform and close to independent)."""
    if R == 1:
        return float(B)
    gen = torch.Generator().manual_seed(0)
    owners = torch.randint(R, (trials, B), generator=gen)
    counts = torch.zeros(trials, R).scatter_add_(1, owners, torch.ones(trials, B))
    return float(counts.max(dim=1).values.mean())


def model_time(B: int, R: int, c0: float, c1: float, bytes_per_block: float, balanced: bool = False) -> float:
    """Seconds per iteration at R processes (see the module docstring); `balanced`: every rank owns B / R of each
    sample (block_strata a multiple of R) instead of E[max_r n_r]."""
    if R == 1:
        return c0 + c1 * B
    alpha, bandwidth = NETWORKS["intra-node (R <= 8)"] if R <= 8 else NETWORKS["inter-node (R > 8)"]
    busiest = -(-B // R) if balanced else expected_max_owned(B, R)
    return (c0 + c1 * busiest + (R - 1) * alpha
            + (R - 1) / R * B * bytes_per_block / bandwidth)


def fit_mode(r1: dict[str, float], r2: dict[str, float], batches: list[int], B: int, gathered: float
             ) -> dict[str, Any]:
    """Least squares of R = 1 CPU seconds = c0 + c1 * B over `batches` (CPU time: what the process computes,
    not what the loaded machine grants it), with c0, c1 >= 0, bytes per block, and the model's predictions.

    Non-negative least squares (`scipy.optimize.nnls`): where R = 1 grows faster than linearly in B (a batch that
    outgrows the L2 cache), the unconstrained line has a negative c0, and its predictions are meaningless (a
    negative time at large R). The result then has `c0_ms` = 0 and the unconstrained value in
    `unconstrained_c0_ms`, which the report prints."""
    design = np.array([[1.0, float(bb)] for bb in batches])
    seconds = np.array([r1[f"R=1,B={bb}"] / 1e3 for bb in batches])
    free_c0 = float(np.linalg.lstsq(design, seconds, rcond=None)[0][0])
    c0, c1 = (float(v) for v in nnls(design, seconds)[0])
    # rank 0's buffer is padded to the larger rank's count of blocks: bytes per block from E[max] at R = 2
    bytes_per_block = gathered / expected_max_owned(B, 2)
    loopback = r2[f"R=2,B={B}"] / 1e3 - (c0 + c1 * expected_max_owned(B, 2))
    model = {f"B={b}": {f"R={r}": {"ms_per_iteration": 1e3 * model_time(b, r, c0, c1, bytes_per_block),
                                   "speedup": model_time(b, 1, c0, c1, bytes_per_block)
                                   / model_time(b, r, c0, c1, bytes_per_block),
                                   "speedup_balanced": model_time(b, 1, c0, c1, bytes_per_block)
                                   / model_time(b, r, c0, c1, bytes_per_block, balanced=True)}
                        for r in (1, 2, *MODEL_R) if r <= b}
             for b in MODEL_B}
    return {"c0_ms": 1e3 * c0, "c1_ms_per_block": 1e3 * c1, "unconstrained_c0_ms": 1e3 * free_c0,
            "bytes_per_block": bytes_per_block, "wall_minus_cpu_model_ms_R2": 1e3 * loopback, "model": model}


def clamped_note(fit: dict[str, Any]) -> str:
    """The report's caveat where the fit held c0 at 0 (empty otherwise)."""
    free = fit.get("unconstrained_c0_ms", fit["c0_ms"])
    if free >= 0:
        return ""
    return (f" (c0 held at 0: the unconstrained line gives c0 = {free:.2f} ms, because R = 1 grows faster than "
            "linearly in B here; the predictions below are then only a rough guide)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=20, help="interleaved cycles of all configurations")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per configuration and cycle")
    p.add_argument("--warmup", type=int, default=150,
                   help="iterations before the cycles (compilation; a sharded compiled rank runs each new block "
                        "count eagerly once)")
    p.add_argument("--num-blocks", type=int, default=10_000)
    p.add_argument("--block-batch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="eager oracles and/or compile=True (compilation in the warm-up)")
    p.add_argument("--out", type=Path, default=RESULTS / "distributed")
    args = p.parse_args(argv)
    B = args.block_batch
    if B < 4 or B % 2:
        raise SystemExit(f"--block-batch must be an even integer >= 4 (B / 4 and B / 2 are timed too), got {B}")
    base = {"m": args.num_blocks, "b": args.batch_size, "iterations": args.iterations, "warmup": args.warmup,
            "cycles": args.cycles, "B": B}
    load_before = uptime()
    started = time.perf_counter()
    modes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            got = measure({**base, "compile": mode == "compiled"}, Path(tmp))
            per = got["configurations"]
            one, two, gloo = f"R=1,B={B}", f"R=2,B={B}", f"R=2 {GLOO},B={B}"
            one_strata, two_strata = f"R=1 {STRATA},B={B}", f"R=2 {STRATA},B={B}"
            ceiling = f"{CONCURRENT},B={B // 2}"

            def ratios(num: str, den: str, per: dict[str, Any] = per) -> list[float]:
                return [a / b for a, b in zip(per[num]["wall_ms"], per[den]["wall_ms"], strict=True)]

            median = {k: statistics.median(v["wall_ms"]) for k, v in per.items()}
            cpu = {k: statistics.median(v["cpu_ms"]) for k, v in per.items()}
            fit = fit_mode(cpu, median, [B // 4, B // 2, B], B, per[two]["bytes_per_iteration"])
            speedups = {"R2": ratios(one, two), "R2_gloo": ratios(one, gloo), "ceiling": ratios(one, ceiling),
                        "R2_strata": ratios(one_strata, two_strata),
                        **{f"lockstep ({how})": ratios(one, f"{LOCKSTEP} ({how}),B={B // 2}") for how in MEETINGS}}
            modes[mode] = {
                "ms_per_iteration": median, "cpu_ms_per_iteration": cpu,
                "all": {k: v["wall_ms"] for k, v in per.items()},
                "speedup_per_cycle": speedups,
                "speedup_R2": statistics.median(speedups["R2"]),
                "speedup_R2_cpu": cpu[one] / cpu[two],
                "speedup_R2_gloo": statistics.median(speedups["R2_gloo"]),
                "speedup_R2_strata": statistics.median(speedups["R2_strata"]),
                "ceiling_R2": statistics.median(speedups["ceiling"]),
                "lockstep_bound_R2": {how: statistics.median(speedups[f"lockstep ({how})"]) for how in MEETINGS},
                "eager_iterations": {k: v["eager_iterations"] for k, v in per.items()},
                "gather_buffer_bytes_per_rank_per_iteration": per[two]["bytes_per_iteration"],
                "collectives_per_iteration": per[two]["collectives_per_iteration"],
                "gather_ms_per_iteration_R2": {k: statistics.median(per[k]["gather_ms"])
                                               for k in (two, gloo, two_strata)},
                "update_ms_per_iteration": {k: statistics.median(v["update_ms"]) for k, v in per.items()},
                "barrier_ms_R2": got["barrier_ms"], "x_numel": got["x_numel"],
                "fit": {k: v for k, v in fit.items() if k != "model"}, "model": fit["model"]}
            print(f"{mode}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in median.items())
                  + f"; speed-up {modes[mode]['speedup_R2']:.2f}, block_strata=2 "
                  f"{modes[mode]['speedup_R2_strata']:.2f}, ceiling {modes[mode]['ceiling_R2']:.2f}, lock-step "
                  "bound " + ", ".join(f"{how} {v:.2f}" for how, v in modes[mode]["lockstep_bound_R2"].items()),
                  flush=True)
    load_after = uptime()
    result = {
        "setting": {"task": "hyperparam a8a (T1, task defaults)", "algorithm": "bsvrb_v2", "dtype": "float32",
                    "num_blocks": args.num_blocks, "block_batch": B, "batch_size": args.batch_size,
                    "threads_per_process": 1, "iterations_per_cycle": args.iterations, "warmup": args.warmup,
                    "cycles": args.cycles, "torch": torch.__version__, "cpus": os.cpu_count()},
        "load_before": load_before, "load_after": load_after, "seconds": time.perf_counter() - started,
        "modes": modes,
        "networks": {k: {"latency_us": a * 1e6, "bandwidth_GBps": bw / 1e9} for k, (a, bw) in NETWORKS.items()},
        "gpu": "no GPU / NCCL machine was available: no R = 1 ... 8 GPU measurement",
    }
    write_results(args.out, result, report(result))
    plot(result, args.out.parent / f"{args.out.name}_model.png")
    return result


def report(r: dict[str, Any]) -> str:
    s = r["setting"]
    lines = [f"# Block-sharded BSVRB_v2 on T1 (a8a, m = {s['num_blocks']}, B = {s['block_batch']}, "
             f"b = {s['batch_size']}, float32, 1 thread per process)", "", *load_lines(r)]
    for mode, m in r["modes"].items():
        lines += [f"## {mode} oracles", "",
                  "| configuration | wall ms / iteration: median over cycles (min - max) | CPU ms / iteration, "
                  "slowest rank | ms in the per-block update (`run_update`) | iterations run eagerly (new block "
                  "counts) |", "|---|---|---|---|---|"]
        for k, v in m["ms_per_iteration"].items():
            walls = m["all"][k]
            lines.append(f"| {k} | {v:.1f} ({min(walls):.1f} - {max(walls):.1f}) | "
                         f"{m['cpu_ms_per_iteration'][k]:.1f} | {m['update_ms_per_iteration'][k]:.1f} | "
                         f"{m['eager_iterations'][k]} |")
        quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
                     for k, v in m["speedup_per_cycle"].items()}
        f = m["fit"]
        gather = ", ".join(f"{k}: {v:.2f} ms" for k, v in m["gather_ms_per_iteration_R2"].items())
        lines += ["", f"speed-up at R = 2 (median over cycles of R=1 / R=2; quartiles): **{m['speedup_R2']:.2f}** "
                  f"({quartiles['R2'][0]:.2f} - {quartiles['R2'][2]:.2f}) gathering through shared memory, "
                  f"{m['speedup_R2_gloo']:.2f} ({quartiles['R2_gloo'][0]:.2f} - {quartiles['R2_gloo'][2]:.2f}) "
                  f"through gloo; {m['speedup_R2_cpu']:.2f} in CPU time of the slowest rank", "",
                  f"with stratified block sampling (block_strata=2: each rank owns B / 2 of every sample; R=1 {STRATA} "
                  f"/ R=2 {STRATA}): **{m['speedup_R2_strata']:.2f}** ({quartiles['R2_strata'][0]:.2f} - "
                  f"{quartiles['R2_strata'][2]:.2f})", "",
                  f"the machine's ceiling (R=1 at B over two concurrent independent runs at B / 2, per cycle): "
                  f"**{m['ceiling_R2']:.2f}** ({quartiles['ceiling'][0]:.2f} - {quartiles['ceiling'][2]:.2f})",
                  "",
                  "the bound of any run equal to the 1-process trajectory (R=1 at B over two unsharded runs at B / 2 "
                  "that meet after every iteration, per cycle): "
                  + ", ".join(f"**{v:.2f}** ({quartiles[f'lockstep ({how})'][0]:.2f} - "
                              f"{quartiles[f'lockstep ({how})'][2]:.2f}) meeting through {how}"
                              for how, v in m["lockstep_bound_R2"].items()),
                  "",
                  f"gather buffer per rank and iteration: {m['gather_buffer_bytes_per_rank_per_iteration']:.0f} "
                  f"bytes ({m['collectives_per_iteration']:.0f} collective per iteration; x has {m['x_numel']} "
                  "entries)", "",
                  f"ms per iteration in the gather (slowest rank: packing, all_gather, waiting, reordering): {gather}; "
                  f"one barrier (loopback round trip) {m['barrier_ms_R2']:.2f} ms",
                  "",
                  f"fit: c0 = {f['c0_ms']:.2f} ms, c1 = {f['c1_ms_per_block']:.3f} ms per block, "
                  f"{f['bytes_per_block']:.0f} bytes per block; R = 2 wall time minus the CPU model: "
                  f"{f['wall_minus_cpu_model_ms_R2']:.2f} ms" + clamped_note(f), "",
                  "| B | " + " | ".join(f"R = {x}" for x in (2, *MODEL_R)) + " |",
                  "|---|" + "---|" * (1 + len(MODEL_R))]
        for key, name in (("speedup", ""), ("speedup_balanced", " (block_strata = R)")):
            for b, row in m["model"].items():
                cells = [f"{row[f'R={x}'][key]:.1f}" if f"R={x}" in row else "-" for x in (2, *MODEL_R)]
                lines.append(f"| {b[2:]}{name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [r["gpu"], ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in zip(r["modes"], ("-", "--"), strict=False):
        f = r["modes"][mode]["fit"]
        c0, c1, bpb = f["c0_ms"] / 1e3, f["c1_ms_per_block"] / 1e3, f["bytes_per_block"]
        for b in MODEL_B:
            rs = [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if x <= b]
            ax.plot(rs, [model_time(b, 1, c0, c1, bpb) / model_time(b, x, c0, c1, bpb) for x in rs], marker="o",
                    linestyle=style, label=f"B = {b}, {mode}")
    ax.plot([1, 512], [1, 512], color="grey", linestyle=":", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("processes R")
    ax.set_ylabel("predicted speed-up T(1) / T(R)")
    ax.set_title("T1 model, m = 1e6 (fitted on this machine)")
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


if __name__ == "__main__":
    main()
