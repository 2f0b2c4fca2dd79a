"""Block-sharded BSVRB_v2 on T1: ms/iteration with R = 1 and R = 2 processes, bytes per iteration, and a model of
larger R.

T1 (a8a, the task's defaults: reshuffled blocks and rows, delayed lower update, U[0, 1) initialisation), m = 10^4
blocks, B = 100 sampled blocks, b = 64 rows, float32. Each configuration runs in freshly spawned processes (gloo on
127.0.0.1 for R = 2) with `torch.set_num_threads(1)` each; after `--warmup` iterations, `--iterations` iterations
are timed between two barriers: wall time, and the CPU time of the slowest rank (what the processes compute,
whatever share of the shared cores the machine grants them). R = 1 is also timed at B = 25 and 50 to fit the
compute model. Both oracle modes are measured (`--modes`): eager, and compiled (`compile=True`: torch.compile'd
oracles, compiled during the warm-up, from the persistent cache after the first round; a sharded rank's
oracles take a symbolic block dimension). Rounds alternate the modes and R = 1 / R = 2 (one spawn each), and the
median over `--repeats` rounds is reported with the machine's load (`uptime`) before and after.

Model of R processes (specs/distributed.md section 1): one iteration costs

    T(R, B) = c0 + c1 * E[max_r n_r(B, R)] + (R - 1) * alpha + (R - 1) / R * B * beta_bytes / bandwidth

with n_r the sampled blocks rank r owns (B blocks uniformly over R owners; its expected maximum is computed by
Monte Carlo), c0 (replicated work: x update, sampling) and c1 (per block) fitted on the R = 1 CPU times,
beta_bytes the measured bytes gathered per block, and a ring all_gather (R - 1 steps of latency alpha). The
network assumptions are stated in the results: within a node (R <= 8) alpha = 10 us and 25 GB/s, between nodes
alpha = 50 us and 12.5 GB/s. Evaluated at R = 8, 64, 512 and plotted against R for B in {10^2, 10^3, 10^4}
(m = 10^6: the iteration cost does not depend on m, only memory does).

    python benchmarks/bench_distributed.py [--iterations 50] [--repeats 2] [--num-blocks 10000] [--modes eager compiled]

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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "libsvm"
NETWORKS = {"intra-node (R <= 8)": (10e-6, 25e9), "inter-node (R > 8)": (50e-6, 12.5e9)}
MODEL_R = (8, 64, 512)
MODEL_B = (100, 1000, 10000)
MODES = ("eager", "compiled")


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _worker(rank: int, world: int, port: int, config: dict[str, Any], out: str) -> None:
    """One rank: build T1 once, then for each B of `config["B"]`: shard, warm up, time the iterations between
    barriers (wall time and this process's CPU time)."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.distributed import BlockShard
    from mbbo.tasks.registry import get_task

    spec = get_task("hyperparam")
    settings = spec.make_settings({"dataset": "a8a", "data_dir": str(DATA), "num_blocks": config["m"],
                                   "batch_size": config["b"]})
    problem, _ = spec.build(settings, block_batch=max(config["B"]), dtype=torch.float32)
    problem.shard = BlockShard.from_process_group(problem.num_blocks)
    hyper = spec.hyper_defaults("bsvrb_v2", ["block_sampling", "estimator_init", "lower_update"])
    results = {}
    for B in config["B"]:
        alg = make_algorithm("bsvrb_v2", problem, seed=0, block_batch=B, compile=config["compile"], **hyper)
        for _ in range(config["warmup"]):  # also compiles (a rank's first two block counts with --compile)
            alg.step()
        shard = problem.shard
        sent0, coll0, gather0 = shard.bytes_sent, shard.collectives, shard.gather_seconds
        if world > 1:
            dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(config["iterations"]):
            alg.step()
        cpu = time.process_time() - cpu
        if world > 1:
            dist.barrier()
        seconds = time.perf_counter() - start
        n = config["iterations"]
        results[B] = {"ms_per_iteration": 1e3 * seconds / n, "cpu_ms_per_iteration": 1e3 * cpu / n,
                      "buffer_bytes_per_iteration": (shard.bytes_sent - sent0) / n,
                      "collectives_per_iteration": (shard.collectives - coll0) / n, "x_numel": problem.dim_x,
                      "gather_ms_per_iteration": 1e3 * (shard.gather_seconds - gather0) / n}
    if world > 1:  # the loopback round trip: one barrier
        dist.barrier()
        start = time.perf_counter()
        for _ in range(200):
            dist.barrier()
        results["barrier_ms"] = 1e3 * (time.perf_counter() - start) / 200
    torch.save(results, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, config: dict[str, Any], tmp: Path) -> dict[int, dict[str, Any]]:
    """Spawn `world` processes for the block batches of `config`: per B, the slowest rank's wall and CPU times,
    rank 0's bytes."""
    from mbbo.distributed import free_port

    out = str(tmp / f"r{world}")
    context = mp.start_processes(_worker, args=(world, free_port(), config, out), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"R = {world} did not finish within 600 s")
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    return {B: {"ms_per_iteration": max(r[B]["ms_per_iteration"] for r in ranks),
                "cpu_ms_per_iteration": max(r[B]["cpu_ms_per_iteration"] for r in ranks),
                "buffer_bytes_per_iteration": ranks[0][B]["buffer_bytes_per_iteration"],
                "collectives_per_iteration": ranks[0][B]["collectives_per_iteration"],
                "gather_ms_per_iteration": max(r[B]["gather_ms_per_iteration"] for r in ranks),
                "barrier_ms": ranks[0].get("barrier_ms"),
                "x_numel": ranks[0][B]["x_numel"]} for B in config["B"]}


def expected_max_owned(B: int, R: int, trials: int = 2000) -> float:
    """E[max_r n_r] when B distinct blocks fall on R owners (uniform sampling of blocks, i mod R ownership:
    for m >> B each block's owner is uniform and close to independent)."""
    if R == 1:
        return float(B)
    gen = torch.Generator().manual_seed(0)
    owners = torch.randint(R, (trials, B), generator=gen)
    counts = torch.zeros(trials, R).scatter_add_(1, owners, torch.ones(trials, B))
    return float(counts.max(dim=1).values.mean())


def model_time(B: int, R: int, c0: float, c1: float, bytes_per_block: float) -> float:
    """Seconds per iteration at R processes (see the module docstring)."""
    if R == 1:
        return c0 + c1 * B
    alpha, bandwidth = NETWORKS["intra-node (R <= 8)"] if R <= 8 else NETWORKS["inter-node (R > 8)"]
    return (c0 + c1 * expected_max_owned(B, R) + (R - 1) * alpha
            + (R - 1) / R * B * bytes_per_block / bandwidth)


def fit_mode(r1: dict[str, float], r2: dict[str, float], batches: list[int], B: int, gathered: float
             ) -> dict[str, Any]:
    """Least squares of R = 1 CPU seconds = c0 + c1 * B over `batches` (CPU time: what the process computes,
    not what the loaded machine grants it), bytes per block, and the model's predictions."""
    xs = torch.tensor([float(bb) for bb in batches], dtype=torch.float64)
    ys = torch.tensor([r1[f"R=1,B={bb}"] for bb in batches], dtype=torch.float64) / 1e3
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    c0, c1 = (float(v) for v in torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1))
    # rank 0's buffer is padded to the larger rank's count of blocks: bytes per block from E[max] at R = 2
    bytes_per_block = gathered / expected_max_owned(B, 2)
    loopback = r2[f"R=2,B={B}"] / 1e3 - (c0 + c1 * expected_max_owned(B, 2))
    model = {f"B={b}": {f"R={r}": {"ms_per_iteration": 1e3 * model_time(b, r, c0, c1, bytes_per_block),
                                   "speedup": model_time(b, 1, c0, c1, bytes_per_block)
                                   / model_time(b, r, c0, c1, bytes_per_block)}
                        for r in (1, 2, *MODEL_R) if r <= b}
             for b in MODEL_B}
    return {"c0_ms": 1e3 * c0, "c1_ms_per_block": 1e3 * c1, "bytes_per_block": bytes_per_block,
            "wall_minus_cpu_model_ms_R2": 1e3 * loopback, "model": model}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-blocks", type=int, default=10_000)
    p.add_argument("--block-batch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="eager oracles and/or torch.compile'd ones (compile=True; compilation in the warm-up)")
    p.add_argument("--out", type=Path, default=RESULTS / "distributed")
    args = p.parse_args(argv)
    base = {"m": args.num_blocks, "b": args.batch_size, "iterations": args.iterations, "warmup": args.warmup}
    B = args.block_batch
    runs = {1: [B // 4, B // 2, B], 2: [B]}
    load_before = uptime()
    started = time.perf_counter()
    times: dict[str, dict[str, dict[str, list[float]]]] = {mode: {} for mode in args.modes}
    extra: dict[str, dict[str, dict[str, Any]]] = {mode: {} for mode in args.modes}
    gathers: dict[str, list[float]] = {mode: [] for mode in args.modes}
    barriers: dict[str, list[float]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in args.modes:
                for r, batches in runs.items():
                    config = {**base, "B": batches, "compile": mode == "compiled"}
                    for bb, got in measure(r, config, Path(tmp)).items():
                        key = f"R={r},B={bb}"
                        for kind in ("ms_per_iteration", "cpu_ms_per_iteration"):
                            times[mode].setdefault(kind, {}).setdefault(key, []).append(got[kind])
                        extra[mode][key] = got
                        if r == 2:
                            gathers[mode].append(got["gather_ms_per_iteration"])
                            barriers[mode].append(got["barrier_ms"])
                        print(f"{mode} R={r} B={bb}: {got['ms_per_iteration']:.1f} ms/iteration (wall), "
                              f"{got['cpu_ms_per_iteration']:.1f} ms CPU (slowest rank)", flush=True)
    load_after = uptime()
    modes: dict[str, Any] = {}
    for mode in args.modes:
        median = {k: statistics.median(v) for k, v in times[mode]["ms_per_iteration"].items()}
        cpu = {k: statistics.median(v) for k, v in times[mode]["cpu_ms_per_iteration"].items()}
        gathered = extra[mode][f"R=2,B={B}"]["buffer_bytes_per_iteration"]
        fit = fit_mode(cpu, median, runs[1], B, gathered)
        modes[mode] = {
            "ms_per_iteration": median, "cpu_ms_per_iteration": cpu, "all": times[mode],
            "speedup_R2": median[f"R=1,B={B}"] / median[f"R=2,B={B}"],
            "speedup_R2_cpu": cpu[f"R=1,B={B}"] / cpu[f"R=2,B={B}"],
            "gather_buffer_bytes_per_rank_per_iteration": gathered,
            "collectives_per_iteration": extra[mode][f"R=2,B={B}"]["collectives_per_iteration"],
            "gather_ms_per_iteration_R2": statistics.median(gathers[mode]),
            "barrier_ms_R2": statistics.median(barriers[mode]),
            "x_numel": extra[mode][f"R=2,B={B}"]["x_numel"],
            "fit": {k: v for k, v in fit.items() if k != "model"}, "model": fit["model"]}
    result = {
        "setting": {"task": "hyperparam a8a (T1, task defaults)", "algorithm": "bsvrb_v2", "dtype": "float32",
                    "num_blocks": args.num_blocks, "block_batch": B, "batch_size": args.batch_size,
                    "threads_per_process": 1, "iterations": args.iterations, "warmup": args.warmup,
                    "repeats": args.repeats, "torch": torch.__version__, "cpus": os.cpu_count()},
        "load_before": load_before, "load_after": load_after, "seconds": time.perf_counter() - started,
        "modes": modes,
        "networks": {k: {"latency_us": a * 1e6, "bandwidth_GBps": bw / 1e9} for k, (a, bw) in NETWORKS.items()},
        "gpu": "no GPU / NCCL machine was available: no R = 1 ... 8 GPU measurement",
    }
    atomic_write(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write(args.out.with_suffix(".md"), report(result))
    plot(result, args.out.parent / f"{args.out.name}_model.png")
    print(report(result))
    return result


def report(r: dict[str, Any]) -> str:
    s = r["setting"]
    lines = [f"# Block-sharded BSVRB_v2 on T1 (a8a, m = {s['num_blocks']}, B = {s['block_batch']}, "
             f"b = {s['batch_size']}, float32, 1 thread per process)", "",
             f"load before: `{r['load_before']}`", f"load after: `{r['load_after']}`", ""]
    for mode, m in r["modes"].items():
        lines += [f"## {mode} oracles", "",
                  "| configuration | wall ms / iteration (median; repeats) | CPU ms / iteration, slowest rank |",
                  "|---|---|---|"]
        for k, v in m["ms_per_iteration"].items():
            walls = ", ".join(f"{t:.1f}" for t in m["all"]["ms_per_iteration"][k])
            lines.append(f"| {k} | {v:.1f} ({walls}) | {m['cpu_ms_per_iteration'][k]:.1f} |")
        f = m["fit"]
        lines += ["", f"speed-up at R = 2: {m['speedup_R2']:.2f} (wall), {m['speedup_R2_cpu']:.2f} (CPU time of "
                  "the slowest rank)", "",
                  f"gather buffer per rank and iteration: {m['gather_buffer_bytes_per_rank_per_iteration']:.0f} "
                  f"bytes ({m['collectives_per_iteration']:.0f} collective per iteration; x has {m['x_numel']} "
                  "entries)", "",
                  f"R = 2: {m['gather_ms_per_iteration_R2']:.2f} ms per iteration in the gather (slowest rank: "
                  f"packing, all_gather, reordering); one barrier (loopback round trip) {m['barrier_ms_R2']:.2f} ms",
                  "",
                  f"fit: c0 = {f['c0_ms']:.2f} ms, c1 = {f['c1_ms_per_block']:.3f} ms per block, "
                  f"{f['bytes_per_block']:.0f} bytes per block; R = 2 wall time minus the CPU model: "
                  f"{f['wall_minus_cpu_model_ms_R2']:.2f} ms", "",
                  "| B | " + " | ".join(f"R = {x}" for x in (2, *MODEL_R)) + " |",
                  "|---|" + "---|" * (1 + len(MODEL_R))]
        for b, row in m["model"].items():
            cells = [f"{row[f'R={x}']['speedup']:.1f}" if f"R={x}" in row else "-" for x in (2, *MODEL_R)]
            lines.append(f"| {b[2:]} | " + " | ".join(cells) + " |")
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
