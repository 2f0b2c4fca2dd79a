"""JAX reference for T3 (benchopt's quadratic): benchopt's SOBA / SABA / SRBA JAX iterations on mbbo's rank-1
factor data, and benchopt's instance drawn with JAX's random generator. Needs the optional `bench-jax` extra
(`pip install 'mbbo[bench-jax]'`, i.e. `jax[cpu]`); nothing in the library imports this module.

Sources, in benchopt/benchmark_bilevel (read, then re-written here; not copied):
  * solvers/saba.py `saba_jax`, solvers/srba.py `srba_jax` and the JAX form of solvers/soba.py: one `jax.jit`
    of a `jax.lax.scan` over `eval_freq` = 128 iterations; per iteration one `jax.vjp` of grad_z g at (z, x)
    pulled back with v for (hvp, cross_v), one `jax.grad` of f in (z, x), then
        z <- z - rho dz,   v <- v - rho dv,   x <- x - gamma dx
    with (dz, dv, dx) = (grad_z g, hvp + grad_z f, cross_v + grad_x f) for SOBA, their SAGA estimates over the
    fixed mini-batches for SABA (memory rows per batch, running mean in row -2), and for SRBA the recursive
    (SARAH) differences at (z_t, x_t, v_t) and (z_{t-1}, x_{t-1}, v_{t-1}), restarted from the full batch every
    `period = int((n_inner + n_outer) * period_frac / batch_size)` iterations (`lax.cond`);
  * benchmark_utils/minibatch_sampler.py (`init_sampler`): contiguous mini-batches `start = batch_size * order[i]`
    sliced with `lax.dynamic_slice`, the batch order permuted with `jax.random.permutation` every epoch;
  * benchmark_utils/learning_rate_scheduler.py: step sizes s / (t + 1)^e;
  * benchmark_utils/gen_matrices.py and datasets/quadratic.py for `benchopt_instance` (below).
The one change, as in issue 11: benchopt's loss reads dense per-sample matrices A_i, B_i, C_i; here it reads
their rank-1 factors (the row table of `mbbo.tasks.zoo_tasks.pack_level`), the same function of (z, x).
Sign convention is benchopt's: v ~ -A^{-1} grad_z f (mbbo's v has the other sign).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

#: XLA on one thread (set before jax is imported): no Eigen thread pool, one intra-op thread.
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
EVAL_FREQ = 128  # benchopt's iterations per jitted call (its `eval_freq`)


def import_jax(one_thread: bool = True) -> Any:
    """`jax` (configured before its first import: one XLA thread if `one_thread`), or ImportError."""
    if one_thread and "jax" not in __import__("sys").modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_ONE_THREAD}".strip()
    import jax

    return jax


# ---------------------------------------------------------------------------------------------------------
# benchopt's instance, drawn with JAX's generator
# ---------------------------------------------------------------------------------------------------------


def _level_factors(jax: Any, key: Any, n: int, d_in: int, d_out: int, l_in: float, l_out: float,
                   l_cross: float, mu: float) -> dict[str, np.ndarray]:
    """One call of benchopt's `gen_matrices` (same key splits and draws, float32 as JAX's default), returning
    the rank-1 factors instead of the dense matrices: A_i = u_i u_i^T, B_i = w_i w_i^T, C_i = p_i q_i^T.
    (benchopt assigns D[:k, :k] into a jnp array, which JAX refuses; `.at[].set` is what it means.)"""
    jnp = jax.numpy
    keys = jax.random.split(key, 10)
    basis, *_ = jnp.linalg.svd(jax.random.normal(keys[0], (d_in, 1)))
    sqrt_yy = basis @ jnp.diag(jnp.logspace(jnp.log10(mu) / 2, jnp.log10(l_in) / 2, d_in)) @ basis.T
    u = jax.random.normal(keys[1], (n, 1, d_in)) @ sqrt_yy
    basis, *_ = jnp.linalg.svd(jax.random.normal(keys[2], (d_out, 1)))
    diag = jnp.r_[0, jnp.logspace(jnp.log10(mu) / 2, jnp.log10(l_out) / 2, d_out - 1)]
    w = jax.random.normal(keys[3], (n, 1, d_out)) @ (basis @ jnp.diag(diag) @ basis.T)
    left, _, right = jnp.linalg.svd(jax.random.normal(keys[4], (d_out, d_in)))
    k = min(d_in, d_out)
    dc = jnp.zeros((d_out, d_in)).at[:k, :k].set(jnp.diag(jnp.logspace(jnp.log10(mu), jnp.log10(l_cross), k)))
    zeta = jax.random.normal(keys[5], (n, 1, d_in))
    p = (left @ dc @ zeta.transpose(0, 2, 1))[:, :, 0]  # C_i = (U D zeta_i)(zeta_i^T V^T)
    q = (zeta @ right.T)[:, 0, :]
    lin_y = jax.random.normal(keys[6], (n, d_in))
    lin_x = jax.random.normal(keys[7], (n, d_out))
    return {name: np.asarray(a, dtype=np.float64) for name, a in
            (("u", u[:, 0, :]), ("w", w[:, 0, :]), ("p", p), ("q", q), ("lin_y", lin_y), ("lin_x", lin_x))}


def benchopt_instance(settings: Any) -> Any:
    """benchopt's instance for `settings` (`mbbo.tasks.zoo_tasks.BenchoptQuadraticSettings`): keys
    `split(PRNGKey(random_state), 2)` for the inner and outer levels, as `datasets/quadratic.py` (its retries
    reuse the same key, so one draw is the instance). Returned as a float64 `BenchoptQuadratic` of the factors
    (drawn in float32, as benchopt does)."""
    import torch

    from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic, QuadraticLevel

    jax = import_jax()
    s = settings
    keys = jax.random.split(jax.random.PRNGKey(s.random_state), 2)
    levels = []
    for key, n, l_in, l_out, l_cross in ((keys[0], s.n_inner, s.L_inner_inner, s.L_outer_inner, s.L_cross_inner),
                                         (keys[1], s.n_outer, s.L_inner_outer, s.L_outer_outer, s.L_cross_outer)):
        factors = _level_factors(jax, key, n, s.d_in, s.d_out, l_in, l_out, l_cross, s.mu)
        levels.append(QuadraticLevel(**{k: torch.from_numpy(v) for k, v in factors.items()}))
    config = {"generator": "jax", "random_state": s.random_state, "jax": jax.__version__,
              "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
    return BenchoptQuadratic(levels[0], levels[1], config)


# ---------------------------------------------------------------------------------------------------------
# the solvers
# ---------------------------------------------------------------------------------------------------------


def _factor_loss(jnp: Any, d_in: int, d_out: int, z: Any, x: Any, rows: Any) -> Any:
    """mean_i 1/2 (u_i^T z)^2 + 1/2 (w_i^T x)^2 + (p_i^T x)(q_i^T z) + lin_y_i^T z + lin_x_i^T x on packed rows
    [u | q | lin_y | w | p | lin_x] (benchopt's quadratic, with A_i, B_i, C_i as rank-1 factors)."""
    u, q, lin_y = rows[:, :d_in], rows[:, d_in:2 * d_in], rows[:, 2 * d_in:3 * d_in]
    w, p = rows[:, 3 * d_in:3 * d_in + d_out], rows[:, 3 * d_in + d_out:3 * d_in + 2 * d_out]
    lin_x = rows[:, 3 * d_in + 2 * d_out:]
    uz, wx, px, qz = u @ z, w @ x, p @ x, q @ z
    return jnp.mean(0.5 * uz * uz + 0.5 * wx * wx + px * qz + lin_y @ z + lin_x @ x)


@dataclass
class JaxSolver:
    """One of benchopt's JAX solvers on packed factor tables (numpy, float32); `step()` runs `iterations_per_call`
    iterations (one jitted scan) and blocks until they are done."""

    name: str
    inner_rows: np.ndarray
    outer_rows: np.ndarray
    d_in: int
    d_out: int
    step_size: float = 0.1
    outer_ratio: float = 1.0
    exponent: float = 0.0
    period_frac: float = 0.5
    batch_size: int = 64
    iterations_per_call: int = EVAL_FREQ
    random_state: int = 1

    def __post_init__(self) -> None:
        if self.name not in ("soba", "saba", "srba"):
            raise ValueError(f"name must be one of 'soba', 'saba', 'srba', got {self.name!r}")
        jax = import_jax()
        jnp = jax.numpy
        self.jax = jax
        self.inner = jnp.asarray(self.inner_rows, dtype=jnp.float32)
        self.outer = jnp.asarray(self.outer_rows, dtype=jnp.float32)
        n_in, n_out = self.inner.shape[0], self.outer.shape[0]
        self.n_batches = ((n_in + self.batch_size - 1) // self.batch_size, (n_out + self.batch_size - 1)
                          // self.batch_size)
        self.period = max(1, int((n_in + n_out) * self.period_frac / self.batch_size))
        zeros_z = jnp.zeros(self.d_in, dtype=jnp.float32)
        self.carry: dict[str, Any] = {
            "z": zeros_z, "x": jnp.full(self.d_out, -2.0, dtype=jnp.float32), "v": zeros_z, "t": jnp.array(0),
            "sampler_in": self._sampler_state(self.n_batches[0], self.random_state),
            "sampler_out": self._sampler_state(self.n_batches[1], self.random_state),
        }
        if self.name == "saba":  # rows 0..n-1 per batch, row -2 running mean, row -1 current direction
            self.carry["memory"] = {
                key: jnp.zeros((self.n_batches[level] + 2, dim), dtype=jnp.float32) for key, level, dim in (
                    ("inner_grad", 0, self.d_in), ("hvp", 0, self.d_in), ("cross_v", 0, self.d_out),
                    ("grad_in_outer", 1, self.d_in), ("grad_out_outer", 1, self.d_out))}
        if self.name == "srba":
            self.carry.update(z_old=zeros_z, x_old=self.carry["x"], v_old=zeros_z, d_z=zeros_z, d_v=zeros_z,
                              d_x=jnp.zeros(self.d_out, dtype=jnp.float32))
        self._run = jax.jit(partial(self._scan, length=self.iterations_per_call))

    def _sampler_state(self, n_batches: int, seed: int) -> dict[str, Any]:
        jnp = self.jax.numpy
        return {"order": jnp.arange(n_batches), "i": jnp.array(0), "key": self.jax.random.PRNGKey(seed)}

    def _sample(self, state: dict[str, Any], n_batches: int) -> tuple[Any, Any, dict[str, Any]]:
        """(start row, batch id, next state): contiguous batches in a permuted order, reshuffled per epoch."""
        jax = self.jax
        idx = state["order"][state["i"]]
        i = state["i"] + 1

        def reshuffle(order: Any, key: Any) -> tuple[Any, Any, Any]:
            key, sub = jax.random.split(key)
            return jax.numpy.array(0), jax.random.permutation(sub, order), key

        i, order, key = jax.lax.cond(i == n_batches, reshuffle, lambda o, k: (i, o, k), state["order"],
                                     state["key"])
        return idx * self.batch_size, idx, {"order": order, "i": i, "key": key}

    def _losses(self) -> tuple[Any, Any]:
        jax, jnp = self.jax, self.jax.numpy
        loss = partial(_factor_loss, jnp, self.d_in, self.d_out)
        b = self.batch_size

        def inner(z: Any, x: Any, start: Any) -> Any:
            return loss(z, x, jax.lax.dynamic_slice_in_dim(self.inner, start, b))

        def outer(z: Any, x: Any, start: Any) -> Any:
            return loss(z, x, jax.lax.dynamic_slice_in_dim(self.outer, start, b))

        return inner, outer

    def _oracles(self, z: Any, x: Any, v: Any, f_inner: Any, f_outer: Any) -> tuple[Any, ...]:
        """(grad_z g, hvp, cross_v, grad_z f, grad_x f): one vjp of grad_z g, one grad of f."""
        jax = self.jax
        grad_z, pullback = jax.vjp(lambda z_, x_: jax.grad(f_inner)(z_, x_), z, x)
        hvp, cross_v = pullback(v)
        g_in, g_out = jax.grad(f_outer, argnums=(0, 1))(z, x)
        return grad_z, hvp, cross_v, g_in, g_out

    def _one_iter(self, carry: dict[str, Any], _: Any) -> tuple[dict[str, Any], None]:
        carry = dict(carry)
        t = carry["t"]
        inner_lr = self.step_size / (t + 1.0) ** self.exponent
        outer_lr = self.step_size / self.outer_ratio / (t + 1.0) ** self.exponent
        f_inner, f_outer = self._losses()
        if self.name == "srba":
            return self._srba_iter(carry, inner_lr, outer_lr, f_inner, f_outer), None
        start_in, id_in, carry["sampler_in"] = self._sample(carry["sampler_in"], self.n_batches[0])
        start_out, id_out, carry["sampler_out"] = self._sample(carry["sampler_out"], self.n_batches[1])
        gz, hvp, cross_v, g_in, g_out = self._oracles(
            carry["z"], carry["x"], carry["v"], lambda z, x: f_inner(z, x, start_in),
            lambda z, x: f_outer(z, x, start_out))
        if self.name == "saba":
            weights = (self.batch_size / self.inner.shape[0], self.batch_size / self.outer.shape[0])
            updates = {"inner_grad": (gz, id_in, weights[0]), "hvp": (hvp, id_in, weights[0]),
                       "cross_v": (cross_v, id_in, weights[0]), "grad_in_outer": (g_in, id_out, weights[1]),
                       "grad_out_outer": (g_out, id_out, weights[1])}
            memory = {key: _saga(carry["memory"][key], *up) for key, up in updates.items()}
            carry["memory"] = memory
            gz, hvp, cross_v, g_in, g_out = (memory[k][-1] for k in updates)
        carry["z"] = carry["z"] - inner_lr * gz
        carry["v"] = carry["v"] - inner_lr * (hvp + g_in)
        carry["x"] = carry["x"] - outer_lr * (cross_v + g_out)
        carry["t"] = t + 1
        return carry, None

    def _srba_iter(self, carry: dict[str, Any], inner_lr: Any, outer_lr: Any, f_inner: Any, f_outer: Any
                   ) -> dict[str, Any]:
        jax, jnp = self.jax, self.jax.numpy
        loss = partial(_factor_loss, jnp, self.d_in, self.d_out)

        def full_batch(c: dict[str, Any]) -> tuple[Any, ...]:
            gz, hvp, cross_v, g_in, g_out = self._oracles(
                c["z"], c["x"], c["v"], lambda z, x: loss(z, x, self.inner), lambda z, x: loss(z, x, self.outer))
            return gz, hvp + g_in, cross_v + g_out, c["sampler_in"], c["sampler_out"]

        def recursive(c: dict[str, Any]) -> tuple[Any, ...]:
            start_in, _, s_in = self._sample(c["sampler_in"], self.n_batches[0])
            start_out, _, s_out = self._sample(c["sampler_out"], self.n_batches[1])
            fi, fo = (lambda z, x: f_inner(z, x, start_in)), (lambda z, x: f_outer(z, x, start_out))
            new = self._oracles(c["z"], c["x"], c["v"], fi, fo)
            old = self._oracles(c["z_old"], c["x_old"], c["v_old"], fi, fo)
            diff = [a - b for a, b in zip(new, old, strict=True)]
            return (c["d_z"] + diff[0], c["d_v"] + diff[1] + diff[3], c["d_x"] + diff[2] + diff[4], s_in, s_out)

        (carry["d_z"], carry["d_v"], carry["d_x"], carry["sampler_in"], carry["sampler_out"]) = jax.lax.cond(
            carry["t"] % self.period == 0, full_batch, recursive, carry)
        carry["z_old"], carry["x_old"], carry["v_old"] = carry["z"], carry["x"], carry["v"]
        carry["z"] = carry["z"] - inner_lr * carry["d_z"]
        carry["v"] = carry["v"] - inner_lr * carry["d_v"]
        carry["x"] = carry["x"] - outer_lr * carry["d_x"]
        carry["t"] = carry["t"] + 1
        return carry

    def _scan(self, carry: dict[str, Any], length: int) -> dict[str, Any]:
        return self.jax.lax.scan(self._one_iter, carry, xs=None, length=length)[0]

    def step(self) -> None:
        """`iterations_per_call` iterations (one jitted scan; compiled at the first call)."""
        self.carry = self._run(self.carry)
        self.jax.block_until_ready(self.carry)

    @property
    def x(self) -> np.ndarray:
        return np.asarray(self.carry["x"])

    @property
    def z(self) -> np.ndarray:
        return np.asarray(self.carry["z"])

    @property
    def iteration(self) -> int:
        return int(self.carry["t"])


def _saga(memory: Any, grad: Any, idx: Any, weight: float) -> Any:
    """benchopt's `variance_reduction` (saba_jax): direction = grad - memory[idx] + mean, then mean += weight *
    (grad - memory[idx]), memory[idx] = grad; the direction goes to row -1, the mean is row -2."""
    diff = grad - memory[idx]
    return memory.at[-1].set(diff + memory[-2]).at[-2].add(weight * diff).at[idx].set(grad)
