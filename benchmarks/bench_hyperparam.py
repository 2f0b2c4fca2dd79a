"""Speed and memory of the T1 multi-block hyper-parameter task (a8a, w8a): library vs targets vs a hand-written floor.

Times the library's `bsvrb_v1`, `bsvrb_v2` and `rsvrb` (via `mbbo.algorithms.registry.make_algorithm`) and the
hand-written closed-form BSVRB_v2 (`benchmarks/handwritten_bsvrb_v2.py`, same trajectory as the library's), at
the authors' settings: m = 100 blocks, B = 10 per iteration, b = 32, float64, one thread by default.

Timing: all algorithms live in one process and are stepped in interleaved chunks (round robin, `--chunk`
iterations each) so that machine noise hits them alike; after `--warmup` iterations each, `--repeats` repeats
of `--iterations` iterations; the reported ms/iteration is the median over repeats (evaluation excluded).
Memory: one fresh subprocess per (data set, algorithm): peak RSS after `--warmup` + `--memory-iterations` steps
minus the RSS after data loading. After loading, the freed heap is trimmed and the peak (VmHWM) is reset to the
current RSS (`/proc/self/clear_refs`), so the loader's transient peak does not hide the algorithm's memory.
`getrusage(RUSAGE_SELF).ru_maxrss` is recorded as well, but it cannot be reset once any thread has exited,
so on Linux its delta is usually 0 (the loader's peak); it is the fallback when /proc is unavailable.

    python benchmarks/bench_hyperparam.py                       # both data sets, all algorithms
    python benchmarks/bench_hyperparam.py --datasets a8a --iterations 50 --repeats 1 --no-memory
    python benchmarks/bench_hyperparam.py --profile bsvrb_v2 --profile-dataset a8a

Outputs (atomic writes): benchmarks/results/hyperparam_speed.json and .md; with --profile,
benchmarks/results/profile_<alg>_<dataset>.txt (profile_<alg>_<dataset>_compiled.txt with --compile).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import datetime as dt
import gc
import hashlib
import importlib.util
import io
import json
import os
import platform
import pstats
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from mbbo.algorithms.bsvrb import BSVRBv2Config
from mbbo.algorithms.registry import make_algorithm
from mbbo.problem import MultiBlockProblem
from mbbo.tasks.hyperparam import HyperparamTask, load_task

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "libsvm"
DEFAULT_OUT = BENCH_DIR / "results"

HANDWRITTEN = "handwritten_bsvrb_v2"
LIBRARY = ("bsvrb_v1", "bsvrb_v2", "rsvrb")
ALGORITHMS = (*LIBRARY, HANDWRITTEN)

#: Targets (specs: a8a, one thread): ms per iteration; RSVRB peak memory; generic BSVRB_v2 / hand-written.
TARGET_MS = {"a8a": {"bsvrb_v2": 2.0, "bsvrb_v1": 3.0, "rsvrb": 10.0}}
TARGET_PEAK_BYTES = {"a8a": {"rsvrb": 1e9}}
#: Generic / hand-written BSVRB_v2 (issue 11): eager, and with compile=True (the whole update as one graph).
TARGET_RATIOS = {"eager": 2.5, "compiled": 1.3}
#: The authors' code on this kind of machine (specs/tasks.md, T1): ms per iteration and RSVRB's peak memory.
AUTHORS_MS = {"a8a": {"bsvrb_v1": 560.0, "bsvrb_v2": 210.0, "rsvrb": 3900.0}}
AUTHORS_PEAK_BYTES = {"a8a": {"rsvrb": 5.7e9}}

#: Library files whose hashes identify the measured version (the hot path may change between runs).
LIBRARY_FILES = ("algorithms/bsvrb.py", "algorithms/rsvrb.py", "algorithms/base.py", "blocks.py", "oracles.py",
                 "problem.py", "trackers.py", "projections.py", "tasks/hyperparam.py")
MEMORY_TAG = "MEMORY_RESULT "


class Steppable(Protocol):
    """What the benchmark needs from an algorithm."""

    x: torch.Tensor

    def step(self) -> None: ...

    def lower_variables(self) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def load_handwritten() -> ModuleType:
    """The hand-written module beside this file (benchmarks/ is not a package)."""
    name = "handwritten_bsvrb_v2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / "handwritten_bsvrb_v2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def atomic_write(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_threads(threads: int) -> int:
    """Sets torch's intra-op (and, if still possible, inter-op) thread count; returns the intra-op count."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


def load(dataset: str, args: argparse.Namespace) -> tuple[HyperparamTask, MultiBlockProblem]:
    # rows with replacement, as the hand-written floor draws them (the task's default is the authors' reshuffling)
    task = load_task(dataset, args.data_dir, num_blocks=args.blocks, batch_size=args.batch_size,
                     dtype=torch.float64, seed=args.seed, row_sampling="replacement")
    return task, task.problem()


def build(name: str, task: HyperparamTask, problem: MultiBlockProblem, args: argparse.Namespace) -> Steppable:
    """A library algorithm by name (its default hyper-parameters, the authors'), or the hand-written
    BSVRB_v2 with the library's BSVRB_v2 defaults (so both follow the same trajectory)."""
    if name != HANDWRITTEN:
        extra = {"compile": True} if getattr(args, "compile", False) else {}
        return make_algorithm(name, problem, seed=args.seed, block_batch=args.block_batch,  # type: ignore[return-value]
                              **extra)
    cfg = BSVRBv2Config(block_batch=args.block_batch)
    hw = load_handwritten()
    return hw.HandwrittenBSVRBv2(task, problem, seed=args.seed, block_batch=cfg.block_batch, lr=cfg.lr,
                                 lower_lr=cfg.step_size("lower_lr", problem.num_blocks),
                                 linsys_lr=cfg.step_size("linsys_lr", problem.num_blocks), alpha=cfg.alpha,
                                 gamma=float(cfg.gamma), beta=cfg.beta, v_radius=cfg.v_radius,
                                 init_batch_size=cfg.init_batch_size)


def jacobian_bytes(alg: Any) -> int | None:
    fn: Callable[[], int] | None = getattr(alg, "jacobian_memory_bytes", None)
    return int(fn()) if fn is not None else None


def library_fingerprint() -> dict[str, Any]:
    """Git commit (read-only queries), whether src/ has uncommitted changes, and hashes of the hot-path files."""
    out: dict[str, Any] = {}
    for key, cmd in (("commit", ["git", "rev-parse", "HEAD"]), ("src_status", ["git", "status", "--porcelain", "src"])):
        try:
            res = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=20, check=False)
            out[key] = res.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out[key] = None
    src = PROJECT_ROOT / "src" / "mbbo"
    out["file_sha256"] = {f: hashlib.sha256((src / f).read_bytes()).hexdigest()[:16]
                          for f in LIBRARY_FILES if (src / f).is_file()}
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# memory (fresh subprocess per algorithm)
# ---------------------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> bool:
    """Returns freed heap pages to the kernel (glibc `malloc_trim(0)`), so that later allocations that reuse
    them show up as RSS growth instead of hiding in memory the loader freed."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _status_bytes(key: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in bytes (None when unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: loads one data set, then builds and steps one algorithm; prints a JSON line.

    Peak = (peak RSS at the end) - (RSS after loading). The preferred peak is VmHWM after a reset to the
    current RSS once the data are loaded and the freed heap is trimmed. `ru_maxrss` cannot be reset once a
    thread has exited (the kernel keeps the group's maximum), so on Linux it usually stays at the loader's
    transient peak; it is recorded too, but used only when /proc is unavailable.
    """
    set_threads(args.threads)
    dataset, name = args.datasets[0], args.memory_child
    task, problem = load(dataset, args)
    gc.collect()
    trimmed = _trim_heap()
    reset = _reset_peak_rss()
    base_rss, base_maxrss = _status_bytes("VmRSS"), _maxrss_bytes()
    t0 = time.perf_counter()
    alg = build(name, task, problem, args)
    init_s = time.perf_counter() - t0
    init_hwm = _status_bytes("VmHWM")
    steps = args.warmup + args.memory_iterations
    for _ in range(steps):
        alg.step()
    end_hwm, end_rss, end_maxrss = _status_bytes("VmHWM"), _status_bytes("VmRSS"), _maxrss_bytes()
    use_hwm = reset and base_rss is not None and end_hwm is not None and init_hwm is not None
    result = {
        "dataset": dataset, "algorithm": name, "steps": steps, "init_seconds": init_s,
        "method": "VmHWM after reset - VmRSS after loading" if use_hwm else "ru_maxrss delta",
        "peak_delta_bytes": (end_hwm - base_rss) if use_hwm else end_maxrss - base_maxrss,  # type: ignore[operator]
        "init_peak_delta_bytes": (init_hwm - base_rss) if use_hwm else None,  # type: ignore[operator]
        "end_rss_delta_bytes": None if end_rss is None or base_rss is None else end_rss - base_rss,
        "baseline_rss_bytes": base_rss, "heap_trimmed": trimmed, "peak_reset_after_loading": reset,
        "ru_maxrss_baseline_bytes": base_maxrss, "ru_maxrss_end_bytes": end_maxrss,
        "ru_maxrss_delta_bytes": end_maxrss - base_maxrss, "jacobian_memory_bytes": jacobian_bytes(alg)}
    print(MEMORY_TAG + json.dumps(result), flush=True)


def measure_memory(dataset: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, "--datasets", dataset,
           "--data-dir", str(args.data_dir), "--threads", str(args.threads), "--seed", str(args.seed),
           "--blocks", str(args.blocks), "--block-batch", str(args.block_batch),
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--memory-iterations", str(args.memory_iterations)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=PROJECT_ROOT)
    for line in res.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    return {"dataset": dataset, "algorithm": name, "error": (res.stderr or res.stdout)[-2000:]}


# ---------------------------------------------------------------------------------------------------------
# timing (one process, interleaved)
# ---------------------------------------------------------------------------------------------------------


def time_dataset(dataset: str, names: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing of all algorithms on one data set."""
    load_avg_start = os.getloadavg()
    t0 = time.perf_counter()
    task, problem = load(dataset, args)
    load_s = time.perf_counter() - t0
    algs: dict[str, Steppable] = {}
    init_s: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        algs[name] = build(name, task, problem, args)
        init_s[name] = time.perf_counter() - t0
    for name in names:  # warm-up (allocator, lazy initialisation, first two-point iteration)
        for _ in range(args.warmup):
            algs[name].step()
    repeats: dict[str, list[float]] = {n: [] for n in names}
    repeats_cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = list(names[r % len(names):]) + list(names[: r % len(names)])
        spent = dict.fromkeys(names, 0.0)
        spent_cpu = dict.fromkeys(names, 0.0)
        done = 0
        while done < args.iterations:
            chunk = min(args.chunk, args.iterations - done)
            for name in order:
                alg = algs[name]
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(chunk):
                    alg.step()
                spent[name] += time.perf_counter() - start
                spent_cpu[name] += time.process_time() - start_cpu
            done += chunk
        for name in names:
            repeats[name].append(1e3 * spent[name] / args.iterations)
            repeats_cpu[name].append(1e3 * spent_cpu[name] / args.iterations)
        print(f"  [{dataset}] repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{n} {repeats[n][-1]:.3f} ms" for n in names), flush=True)
    result: dict[str, Any] = {"dataset": dataset, "n_train": task.X_train.shape[0], "n_val": task.X_val.shape[0],
                              "dim_y": task.dim, "load_seconds": load_s, "algorithms": {}}
    for name in names:
        alg = algs[name]
        ev = task.evaluate(alg)
        result["algorithms"][name] = {
            "ms_per_iteration": statistics.median(repeats[name]), "repeats_ms": repeats[name],
            "cpu_ms_per_iteration": statistics.median(repeats_cpu[name]), "repeats_cpu_ms": repeats_cpu[name],
            "init_seconds": init_s[name], "finite": bool(torch.isfinite(alg.x).all())
            and bool(torch.isfinite(alg.lower_variables()).all()),
            "val_loss_end": ev["val_loss"], "iterations_run": args.warmup + args.repeats * args.iterations,
            "jacobian_memory_bytes": jacobian_bytes(alg)}
    if HANDWRITTEN in algs and "bsvrb_v2" in algs:  # same seed, same number of steps: same trajectory
        a, b = algs[HANDWRITTEN], algs["bsvrb_v2"]
        result["handwritten_vs_library_max_abs_diff"] = {
            "x": float((a.x - b.x).abs().max()),
            "y": float((a.lower_variables() - b.lower_variables()).abs().max()),
            "v": float((a.linear_system_variables() - b.linear_system_variables()).abs().max()),  # type: ignore[attr-defined]
        }
    result["loadavg_start"] = list(load_avg_start)
    result["loadavg_end"] = list(os.getloadavg())
    return result


# ---------------------------------------------------------------------------------------------------------
# targets and reports
# ---------------------------------------------------------------------------------------------------------


def _verdict(value: float, target: float) -> dict[str, Any]:
    factor = value / target
    return {"target": target, "factor": factor, "met": factor <= 1.0}


def compare(result: dict[str, Any], compiled: bool = False) -> None:
    """Adds target comparisons (factor = measured / target; <= 1 means met) in place."""
    target_ratio = TARGET_RATIOS["compiled" if compiled else "eager"]
    ds = result["dataset"]
    algs = result["algorithms"]
    for name, rec in algs.items():
        ms = rec["ms_per_iteration"]
        if name in TARGET_MS.get(ds, {}):
            rec["time_target"] = _verdict(ms, TARGET_MS[ds][name])
            rec["cpu_time_target"] = _verdict(rec["cpu_ms_per_iteration"], TARGET_MS[ds][name])
        if name in AUTHORS_MS.get(ds, {}):
            rec["authors_ms"] = AUTHORS_MS[ds][name]
            rec["speedup_vs_authors"] = AUTHORS_MS[ds][name] / ms
        peak = rec.get("memory", {}).get("peak_delta_bytes")
        if peak is not None and name in TARGET_PEAK_BYTES.get(ds, {}):
            rec["memory_target"] = _verdict(peak, TARGET_PEAK_BYTES[ds][name])
        if peak is not None and name in AUTHORS_PEAK_BYTES.get(ds, {}):
            rec["authors_peak_bytes"] = AUTHORS_PEAK_BYTES[ds][name]
    if HANDWRITTEN in algs and "bsvrb_v2" in algs:
        ratio = algs["bsvrb_v2"]["ms_per_iteration"] / algs[HANDWRITTEN]["ms_per_iteration"]
        result["generic_over_handwritten"] = {"ratio": ratio, **_verdict(ratio, target_ratio)}
        ratio_cpu = algs["bsvrb_v2"]["cpu_ms_per_iteration"] / algs[HANDWRITTEN]["cpu_ms_per_iteration"]
        result["generic_over_handwritten_cpu"] = {"ratio": ratio_cpu, **_verdict(ratio_cpu, target_ratio)}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _factor(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    return f"{rec['factor']:.2f}x ({'met' if rec['met'] else 'MISSED'})"


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# T1 hyper-parameter task: speed and memory",
        "",
        f"Measured {meta['started']} to {meta['finished']} (UTC) on {meta['machine']['cpu'] or 'unknown CPU'} "
        f"({meta['machine']['logical_cpus']} logical CPUs, shared), torch {meta['machine']['torch']}, "
        f"**{meta['threads']} thread(s)** (torch.get_num_threads() = {meta['torch_threads']}), float64.",
        f"Settings: m = {meta['blocks']}, B = {meta['block_batch']}, b = {meta['batch_size']}, seed {meta['seed']}; "
        f"{meta['warmup']} warm-up iterations, then {meta['repeats']} repeats x {meta['iterations']} iterations, "
        f"interleaved in chunks of {meta['chunk']}; ms/iteration = median over repeats (evaluation excluded).",
        f"Memory: fresh subprocess per algorithm, peak RSS (VmHWM) after {meta['warmup']} + "
        f"{meta['memory_iterations']} iterations minus the RSS after data loading (heap trimmed and peak reset "
        "after loading; ru_maxrss is in the JSON but stays at the loader's peak).",
        f"Library: commit {str(meta['library'].get('commit'))[:10]}, uncommitted changes under src/: "
        f"{'yes' if meta['library'].get('src_status') else 'no'} (file hashes in the JSON).",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Factor = measured / target (<= 1: met). Speed-up = authors' time / ours. Wall = perf_counter (what the "
        "targets refer to); CPU = process_time of the same chunks (less sensitive to other processes on the "
        "shared cores).",
        "",
    ]
    for result in report["datasets"]:
        ds = result["dataset"]
        lines += [f"## {ds} (n_train {result['n_train']}, n_val {result['n_val']}, d_y {result['dim_y']})", "",
                  "| algorithm | wall ms/iter (median) | repeats (wall ms) | CPU ms/iter | time target | factor (wall) "
                  "| factor (CPU) | authors (ms) | speed-up | peak mem (MB) | mem target | RSVRB Jacobian (MB) "
                  "| val loss at end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, rec in result["algorithms"].items():
            peak = rec.get("memory", {}).get("peak_delta_bytes")
            tt, mt, authors = rec.get("time_target"), rec.get("memory_target"), rec.get("authors_ms")
            target = "-" if tt is None else f"<= {tt['target']:g} ms"
            mem_target = "-" if mt is None else f"<= {mt['target'] / 1e9:g} GB: {_factor(mt)}"
            authors_s = "-" if authors is None else f"{authors:g}"
            speedup = "-" if authors is None else f"{rec['speedup_vs_authors']:.0f}x"
            reps = " / ".join(f"{v:.3f}" for v in rec["repeats_ms"])
            lines.append(f"| {name} | {rec['ms_per_iteration']:.3f} | {reps} | {rec['cpu_ms_per_iteration']:.3f} | "
                         f"{target} | {_factor(tt)} | {_factor(rec.get('cpu_time_target'))} | "
                         f"{authors_s} | {speedup} | {_mb(peak)} | {mem_target} | "
                         f"{_mb(rec.get('jacobian_memory_bytes'))} | {rec['val_loss_end']:.5f} |")
        ratio = result.get("generic_over_handwritten")
        if ratio is not None:
            cpu = result["generic_over_handwritten_cpu"]
            lines += ["", f"Generic bsvrb_v2 / hand-written: **{ratio['ratio']:.2f}x** wall, {cpu['ratio']:.2f}x CPU "
                      f"(target <= {ratio['target']:g}x: {_factor(ratio)} wall, {_factor(cpu)} CPU)."]
        diff = result.get("handwritten_vs_library_max_abs_diff")
        if diff is not None:
            lines.append("Hand-written vs library bsvrb_v2 after the same iterations, max |diff|: "
                         + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + ".")
        if ds in AUTHORS_PEAK_BYTES:
            lines.append(f"Authors' RSVRB peak: {AUTHORS_PEAK_BYTES[ds]['rsvrb'] / 1e9:g} GB.")
        if ds not in TARGET_MS:
            lines.append(f"No time or memory targets are set for {ds} (the targets are for a8a).")
        load_start = ", ".join(f"{v:.2f}" for v in result["loadavg_start"])
        load_end = ", ".join(f"{v:.2f}" for v in result["loadavg_end"])
        lines.append(f"Load average (1/5/15 min) during timing: {load_start} at start, {load_end} at end "
                     f"({meta['machine']['logical_cpus']} logical CPUs).")
        lines.append("")
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    for result in report["datasets"]:
        print(f"\n{result['dataset']}: ms/iteration (median of {report['meta']['repeats']}), "
              f"threads = {report['meta']['threads']}")
        print(f"{'algorithm':24s} {'wall ms':>9s} {'CPU ms':>9s} {'target':>8s} {'factor (wall)':>16s} "
              f"{'authors':>8s} {'speed-up':>9s} {'peak MB':>9s}")
        for name, rec in result["algorithms"].items():
            tt, authors = rec.get("time_target"), rec.get("authors_ms")
            target = "-" if tt is None else f"{tt['target']:g}"
            authors_s = "-" if authors is None else f"{authors:g}"
            speedup = "-" if authors is None else f"{rec['speedup_vs_authors']:.0f}x"
            peak = _mb(rec.get("memory", {}).get("peak_delta_bytes"))
            print(f"{name:24s} {rec['ms_per_iteration']:9.3f} {rec['cpu_ms_per_iteration']:9.3f} {target:>8s} "
                  f"{_factor(tt):>16s} {authors_s:>8s} "
                  f"{speedup:>9s} {peak:>9s}")
        ratio = result.get("generic_over_handwritten")
        if ratio is not None:
            cpu = result["generic_over_handwritten_cpu"]
            print(f"generic bsvrb_v2 / hand-written = {ratio['ratio']:.2f}x wall, {cpu['ratio']:.2f}x CPU "
                  f"(target <= {ratio['target']:g}x): {_factor(ratio)} wall")


# ---------------------------------------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------------------------------------


def profile(args: argparse.Namespace) -> Path:
    """torch.profiler (operators) then cProfile (Python functions), each on --profile-iterations iterations."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, dataset, n = args.profile, args.profile_dataset, args.profile_iterations
    task, problem = load(dataset, args)
    alg = build(name, task, problem, args)
    for _ in range(args.warmup):
        alg.step()
    t0 = time.perf_counter()
    for _ in range(n):
        alg.step()
    plain_ms = 1e3 * (time.perf_counter() - t0) / n
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n):
            alg.step()
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_top)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                  row_limit=args.profile_top)
    py = cProfile.Profile()
    py.enable()
    for _ in range(n):
        alg.step()
    py.disable()
    buf = io.StringIO()
    stats = pstats.Stats(py, stream=buf)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    stats.sort_stats("cumulative").print_stats(args.profile_top)
    header = (f"profile of {name} on {dataset}: {n} iterations after {args.warmup} warm-up; {now()} UTC; "
              f"threads {torch.get_num_threads()}; m {args.blocks}, B {args.block_batch}, b {args.batch_size}, "
              f"float64\nwithout profiler: {plain_ms:.3f} ms/iteration\ncommand: {shlex.join(sys.argv)}\n")
    text = (header + "\n=== torch.profiler, by operator (self CPU time) ===\n" + by_op
            + "\n=== torch.profiler, by operator and input shapes ===\n" + by_shape
            + "\n=== cProfile (tottime, then cumulative) ===\n" + buf.getvalue())
    suffix = "_compiled" if getattr(args, "compile", False) and name != HANDWRITTEN else ""
    path = Path(args.out) / f"profile_{name}_{dataset}{suffix}.txt"
    atomic_write(path, text)
    print(header + f"saved {path}")
    return path


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["a8a", "w8a"])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--iterations", type=int, default=200, help="timed iterations per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--chunk", type=int, default=10, help="iterations per algorithm per round-robin turn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=100, help="m")
    p.add_argument("--block-batch", type=int, default=10, help="B")
    p.add_argument("--batch-size", type=int, default=32, help="b")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-iterations", type=int, default=None,
                   help="iterations in each memory subprocess (default: --iterations)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the library's oracles (timing only: implies --no-memory; writes *_compiled)")
    p.add_argument("--profile", choices=ALGORITHMS, default=None, help="profile one algorithm and exit")
    p.add_argument("--profile-dataset", default="a8a")
    p.add_argument("--profile-iterations", type=int, default=50)
    p.add_argument("--profile-top", type=int, default=30)
    p.add_argument("--memory-child", choices=ALGORITHMS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile:
        args.no_memory = True
    if args.memory_iterations is None:
        args.memory_iterations = args.iterations
    for key in ("iterations", "repeats", "chunk", "threads", "memory_iterations", "profile_iterations"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(args)
        return
    threads = set_threads(args.threads)
    if args.profile is not None:
        profile(args)
        return
    started = now()
    meta = {"started": started, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "threads": args.threads, "torch_threads": threads, "datasets": args.datasets,
            "algorithms": args.algorithms, "iterations": args.iterations, "repeats": args.repeats,
            "warmup": args.warmup, "chunk": args.chunk, "memory_iterations": args.memory_iterations,
            "blocks": args.blocks, "block_batch": args.block_batch, "batch_size": args.batch_size,
            "seed": args.seed, "dtype": "float64", "data_dir": str(args.data_dir), "machine": machine(),
            "library": library_fingerprint()}
    results = []
    for dataset in args.datasets:
        print(f"timing {dataset} ...", flush=True)
        result = time_dataset(dataset, args.algorithms, args)
        if not args.no_memory:
            for name in args.algorithms:
                print(f"  memory {dataset} {name} ...", flush=True)
                result["algorithms"][name]["memory"] = measure_memory(dataset, name, args)
        compare(result, compiled=bool(args.compile))
        results.append(result)
    meta["finished"] = now()
    report = {"meta": meta, "targets": {"ms": TARGET_MS, "peak_bytes": TARGET_PEAK_BYTES, "ratio": TARGET_RATIOS},
              "authors": {"ms": AUTHORS_MS, "peak_bytes": AUTHORS_PEAK_BYTES}, "datasets": results}
    out = Path(args.out)
    stem = "hyperparam_speed_compiled" if args.compile else "hyperparam_speed"
    meta["compile"] = bool(args.compile)
    atomic_write(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / f"{stem}.md", markdown(report))
    print_table(report)
    print(f"\nsaved {out / (stem + '.json')} and {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
