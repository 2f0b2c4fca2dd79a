"""mbbo against a line-by-line transcription of the authors' T1 loops (BSVRB_ICML2023, HO/main.py, `BSVRB()` for
v1 and v2 and `RSVRB()`), on a small a8a slice (m = 6, B = 2, b = 4), float64, 20 iterations.

The transcription keeps the authors' loop structure: block batch `task_bat` (v1/v2 in its order, RSVRB by
ascending block id), row slices `tr_bat_all[t*b:(t+1)*b]` / `val_bat_all[...]` for block number t, estimates at
(p_1, w_1[, v_1]) and (p_0, w_0[, v_0]), v1's eager all-block step with the stale s_i, v2's delayed step with
`delay_count`, `proj_mat`, the STORM step on p, and RSVRB's randomised STORM with the decay of unsampled blocks.
It takes the block and row index sequences and the initial values from outside: here those that mbbo's own
reshuffling samplers drew (checked to have the reshuffling structure) and mbbo's U[0, 1) initial estimators.

Where the authors' code computes something other than what it means, the transcription writes what it means
(the library does not reproduce these): `hess_yy_g` has the sign of its data term flipped
(`-exp(-z)/(1+exp(-z))^2`; the Hessian of log(1+exp(-z)) is +exp(-z)/(1+exp(-z))^2), and v2's products
`np.transpose(np.matmul(M, v[task]))[0]` take element 0 of the 1-D product M v (a scalar broadcast to every
entry) where v1 uses a column vector. The authors' separate random previous point (p_0 != p_1, w_0 != w_1, ...)
is replaced by the start point. The transcription evaluates the derivatives in closed form, mbbo by autograd.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from mbbo.algorithms.bsvrb import BSVRBv1, BSVRBv2
from mbbo.algorithms.rsvrb import RSVRB
from mbbo.projections import eig_compose
from mbbo.tasks.hyperparam import HyperparamSettings, HyperparamTask

M, B, b, ITERATIONS = 6, 2, 4, 20
N_TRAIN, N_VAL = 36, 20  # periods: 36 // 8 = 4 and 20 // 8 = 2 iterations; blocks: 6 // 2 = 3
TOL = 1e-12


@pytest.fixture(scope="module")
def task(shared_data: Path) -> HyperparamTask:
    full = HyperparamTask.load(HyperparamSettings(dataset="a8a", data_dir=str(shared_data / "libsvm"), num_blocks=M,
                                                  batch_size=b, row_sampling="reshuffle"))
    return replace(full, X_train=full.X_train[:N_TRAIN], y_train=full.y_train[:N_TRAIN],
                   X_val=full.X_val[:N_VAL], y_val=full.y_val[:N_VAL])


def recorded(algorithm: Any) -> dict[str, list[Tensor]]:
    """Wraps the algorithm's samplers so that every index they return is recorded."""
    log: dict[str, list[Tensor]] = {"blocks": [], "second": [], "lower": [], "upper": []}

    def wrap(obj: Any, key: str, rows: bool) -> None:
        draw = obj.sample

        def sample(*args: Any, **kwargs: Any) -> Any:
            out = draw(*args, **kwargs)
            log[key].append((out["index"] if rows else out).clone())
            return out
        obj.sample = sample

    wrap(algorithm.block_sampler, "blocks", False)
    if hasattr(algorithm, "second_sampler"):
        wrap(algorithm.second_sampler, "second", False)
    wrap(algorithm.lower_sampler, "lower", True)
    wrap(algorithm.upper_sampler, "upper", True)
    return log


def check_reshuffling(log: dict[str, list[Tensor]]) -> None:
    """Blocks: each window of m // B iterations is a permutation of the m blocks. Rows: each data epoch of
    n // (B b) iterations takes distinct rows, B b per iteration."""
    for key in ("blocks", "second"):
        for k in range(0, len(log[key]) - M // B + 1, M // B):
            assert sorted(torch.cat(log[key][k: k + M // B]).tolist()) == list(range(M))
    for key, n in (("lower", N_TRAIN), ("upper", N_VAL)):
        period = n // (B * b)
        for k in range(0, len(log[key]), period):
            rows = torch.cat([r.reshape(-1) for r in log[key][k: k + period]])
            assert rows.unique().numel() == rows.numel()


# --- the authors' per-block oracles (closed form, meaning as intended; see the module docstring) ---------------
class Oracles:
    def __init__(self, task: HyperparamTask) -> None:
        self.Xtr, self.ytr, self.Xval, self.yval = task.X_train, task.y_train, task.X_val, task.y_val
        self.sig, self.lam = task.temperatures, task.settings.lam

    def _z(self, w: Tensor, X: Tensor, y: Tensor, i: int) -> tuple[Tensor, Tensor]:
        ys = y / self.sig[i]
        return ys * (X @ w), ys

    def grad_y_g(self, p: Tensor, w: Tensor, i: int, rows: Tensor) -> Tensor:
        X = self.Xtr[rows]
        z, ys = self._z(w[i], X, self.ytr[rows], i)
        term1 = 1 - 1 / (1 + torch.exp(-z))
        return (-(torch.sigmoid(p[rows]) * term1 * ys)[:, None] * X).sum(0) / len(rows) + self.lam * w[i]

    def grad_y_f(self, w: Tensor, i: int, rows: Tensor) -> Tensor:
        X = self.Xval[rows]
        z, ys = self._z(w[i], X, self.yval[rows], i)
        term1 = 1 - 1 / (1 + torch.exp(-z))
        return (-(term1 * ys)[:, None] * X).sum(0) / len(rows)

    def hess_yy_g(self, p: Tensor, w: Tensor, i: int, rows: Tensor) -> Tensor:
        X = self.Xtr[rows]
        z, ys = self._z(w[i], X, self.ytr[rows], i)
        e = torch.exp(-z)
        c = torch.sigmoid(p[rows]) * ys**2 * (e / (1 + e) ** 2)  # the authors' code: -e/(1+e)^2
        eye = torch.eye(X.shape[1], dtype=X.dtype)
        return (c[:, None, None] * X[:, :, None] * X[:, None, :]).sum(0) / len(rows) + self.lam * eye

    def hess_xy_g(self, p: Tensor, w: Tensor, i: int, rows: Tensor) -> Tensor:
        X = self.Xtr[rows]
        z, ys = self._z(w[i], X, self.ytr[rows], i)
        term1 = 1 - 1 / (1 + torch.exp(-z))
        s = torch.sigmoid(p[rows])
        out = torch.zeros(p.shape[0], X.shape[1], dtype=X.dtype)
        out[rows] = -(s * (1 - s) * term1 * ys)[:, None] * X  # hess_xy_g[j] = j_row
        return out / len(rows)

    def grad_v_gamma(self, p: Tensor, w: Tensor, v: Tensor, i: int, tr: Tensor, val: Tensor) -> Tensor:
        return self.hess_yy_g(p, w, i, tr) @ v[i] - self.grad_y_f(w, i, val)


def proj_mat(H: Tensor, bound: float) -> Tensor:
    norm_H = torch.linalg.matrix_norm(H)
    return (bound / norm_H) * H if norm_H < bound else H


def authors_bsvrb(o: Oracles, method: str, init: dict[str, Tensor], tasks: list[Tensor], tr: list[Tensor],
                  val: list[Tensor], hp: dict[str, float]) -> list[dict[str, Tensor]]:
    """`BSVRB()`, one dict of iterates per iteration."""
    alpha, gamma, beta, tau, tau_v, eta = (hp[k] for k in ("alpha", "gamma", "beta", "tau", "tau_v", "eta"))
    p_1, w_1, v_1, s_1, u_1, H_1, z_1 = (init[k].clone() for k in ("p", "w", "v", "s", "u", "H", "z"))
    p_0, w_0, v_0, H_0 = p_1.clone(), w_1.clone(), v_1.clone(), H_1.clone()
    delay_count = torch.zeros(M)
    out = []
    for it in range(ITERATIONS):
        task_bat, tr_bat_all, val_bat_all = tasks[it].tolist(), tr[it], val[it]
        H_new, w_new, v_new = H_1.clone(), w_1.clone(), v_1.clone()
        G_0, G_1 = torch.zeros_like(p_0), torch.zeros_like(p_0)
        for t in range(B):
            task = task_bat[t]
            tr_bat, val_bat = tr_bat_all[t * b: (t + 1) * b], val_bat_all[t * b: (t + 1) * b]
            grad_gy_new = o.grad_y_g(p_1, w_1, task, tr_bat)
            grad_gy_old = o.grad_y_g(p_0, w_0, task, tr_bat)
            s_1[task] = (1 - alpha) * s_1[task] + (alpha + gamma) * grad_gy_new - gamma * grad_gy_old
            if method == "BSVRBv2":
                new = o.grad_v_gamma(p_1, w_1, v_1, task, tr_bat, val_bat)
                old = o.grad_v_gamma(p_0, w_0, v_0, task, tr_bat, val_bat)
                u_1[task] = (1 - alpha) * u_1[task] + (alpha + gamma) * new - gamma * old
            if method == "BSVRBv1":
                new, old = o.hess_yy_g(p_1, w_1, task, tr_bat), o.hess_yy_g(p_0, w_0, task, tr_bat)
                H_new[task] = proj_mat((1 - alpha) * H_new[task] + (alpha + gamma) * new - gamma * old, hp["H_bound"])
            J_new, J_old = o.hess_xy_g(p_1, w_1, task, tr_bat), o.hess_xy_g(p_0, w_0, task, tr_bat)
            if method == "BSVRBv1":
                G_0 += -(J_old @ torch.linalg.inv(H_0[task]) @ o.grad_y_f(w_0, task, val_bat)[:, None])[:, 0]
                G_1 += -(J_new @ torch.linalg.inv(H_1[task]) @ o.grad_y_f(w_1, task, val_bat)[:, None])[:, 0]
            else:
                G_0 += -(J_old @ v_0[task][:, None])[:, 0]  # the authors' code: element [0] of J v
                G_1 += -(J_new @ v_1[task][:, None])[:, 0]
        for task in range(M):
            if method == "BSVRBv1":
                w_new[task] = w_new[task] - tau * s_1[task]
            elif task in task_bat:
                dc = delay_count[task] + 1
                w_new[task] = w_new[task] - tau * dc * s_1[task]
                temp_v_new = v_new[task] - tau_v * dc * u_1[task]
                norm = torch.linalg.vector_norm(temp_v_new)
                v_new[task] = temp_v_new / norm * hp["v_bound"] if norm > hp["v_bound"] else temp_v_new
                delay_count[task] = 0
            else:
                delay_count[task] += 1
        p_0 = p_1.clone()
        z_1 = (1 - beta) * (z_1 - G_0 / B) + G_1 / B
        p_1 = p_1 - eta * z_1
        H_0, H_1 = H_1.clone(), H_new.clone()
        w_0, w_1 = w_1.clone(), w_new.clone()
        if method == "BSVRBv2":
            v_0, v_1 = v_1.clone(), v_new.clone()
        out.append({"p": p_1.clone(), "w": w_1.clone(), "v": v_1.clone()})
    return out


def authors_rsvrb(o: Oracles, init: dict[str, Tensor], tasks: list[Tensor], tasks2: list[Tensor], tr: list[Tensor],
                  val: list[Tensor], hp: dict[str, float]) -> list[dict[str, Tensor]]:
    """`RSVRB()`, one dict of iterates per iteration."""
    beta, tau, eta, r = hp["beta"], hp["tau"], hp["eta"], M / B
    p_1, w_1, v_1, V_1, H_1, s_1, d_1 = (init[k].clone() for k in ("p", "w", "v", "V", "H", "s", "d"))
    p_0, w_0 = p_1.clone(), w_1.clone()
    out = []
    for it in range(ITERATIONS):
        task_bat, task_bat2 = tasks[it].tolist(), tasks2[it].tolist()
        H_new, w_new, v_new, V_new = H_1.clone(), w_1.clone(), v_1.clone(), V_1.clone()
        G_0, G_1 = torch.zeros_like(p_0), torch.zeros_like(p_0)
        task_count = 0
        for task in range(M):
            if task in task_bat:
                tr_bat = tr[it][task_count * b: (task_count + 1) * b]
                val_bat = val[it][task_count * b: (task_count + 1) * b]
                task_count += 1
                s_1[task] = ((1 - beta) * (s_1[task] - o.grad_y_g(p_0, w_0, task, tr_bat) * r)
                             + o.grad_y_g(p_1, w_1, task, tr_bat) * r)
                v_new[task] = ((1 - beta) * (v_new[task] - o.grad_y_f(w_0, task, val_bat) * r)
                               + o.grad_y_f(w_1, task, val_bat) * r)
                V_new[task] = ((1 - beta) * (V_new[task] - o.hess_xy_g(p_0, w_0, task, tr_bat) * r)
                               + o.hess_xy_g(p_1, w_1, task, tr_bat) * r)
                H_new[task] = proj_mat((1 - beta) * (H_new[task] - o.hess_yy_g(p_0, w_0, task, tr_bat) * r)
                                       + o.hess_yy_g(p_1, w_1, task, tr_bat) * r, hp["H_bound"])
            else:
                s_1[task] = (1 - beta) * s_1[task]
                v_new[task] = (1 - beta) * v_new[task]
                V_new[task] = (1 - beta) * V_new[task]
                H_new[task] = (1 - beta) * H_new[task]
            if task in task_bat2:
                G_0 += -(V_1[task] @ torch.linalg.inv(H_1[task]) @ v_1[task][:, None])[:, 0]
                G_1 += -(V_new[task] @ torch.linalg.inv(H_new[task]) @ v_new[task][:, None])[:, 0]
            w_new[task] = w_new[task] - tau * s_1[task]
        p_0 = p_1.clone()
        d_1 = (1 - beta) * (d_1 - G_0 / B) + G_1 / B
        p_1 = p_1 - eta * d_1
        H_1, v_1, V_1 = H_new.clone(), v_new.clone(), V_new.clone()
        w_0, w_1 = w_1.clone(), w_new.clone()
        out.append({"p": p_1.clone(), "w": w_1.clone()})
    return out


# --- the tests -------------------------------------------------------------------------------------------------
AUTHORS = {"block_batch": B, "block_sampling": "reshuffle", "estimator_init": "uniform", "alpha": 0.9, "gamma": 1.0,
           "beta": 0.9, "lr": 1e-3}


def run_mbbo(algorithm: Any) -> tuple[list[dict[str, Tensor]], dict[str, list[Tensor]]]:
    log = recorded(algorithm)
    states = []
    for _ in range(ITERATIONS):
        algorithm.step()
        state = {"p": algorithm.x.clone(), "w": algorithm.lower_variables().clone()}
        if isinstance(algorithm, BSVRBv2):
            state["v"] = algorithm.linear_system_variables().clone()
        states.append(state)
    check_reshuffling(log)
    return states, log


def assert_same(ours: list[dict[str, Tensor]], theirs: list[dict[str, Tensor]]) -> None:
    for it, (a, c) in enumerate(zip(ours, theirs, strict=True)):
        for key in a:
            scale = max(1.0, float(c[key].abs().max()))
            err = float((a[key] - c[key]).abs().max())
            assert err <= TOL * scale, f"iteration {it}: {key} differs by {err:.3e} (scale {scale:.3g})"


def flat(batches: list[Tensor]) -> list[Tensor]:
    """(B, b) row indices per iteration -> the authors' `tr_bat_all` / `val_bat_all` (B b,)."""
    return [r.reshape(-1) for r in batches]


@pytest.mark.parametrize("method", ["BSVRBv1", "BSVRBv2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bsvrb_equals_authors_loop(task: HyperparamTask, method: str, seed: int) -> None:
    """v1: the authors' guard and Hessian timing; v2: the delayed lower step."""
    zeros = torch.zeros(M, task.dim, dtype=torch.float64)
    hp = {"alpha": 0.9, "gamma": 1.0, "beta": 0.9, "eta": 1e-3, "H_bound": 10.0, "v_bound": 10.0}
    if method == "BSVRBv1":
        algo: BSVRBv1 | BSVRBv2 = BSVRBv1(task.problem(), seed=seed, lower_lr=0.5, hessian_guard="frobenius_rescale",
                                          hessian_bound=10.0, hessian_timing="previous", **AUTHORS)
        init = {"v": zeros, "u": zeros, "H": algo.hessians.clone()}
        hp |= {"tau": 0.5, "tau_v": 0.5}
    else:
        algo = BSVRBv2(task.problem(), seed=seed, lower_lr=1.0, linsys_lr=1.0, v_radius=10.0, lower_update="delayed",
                       **AUTHORS)
        init = {"v": algo.linear_system_variables().clone(), "u": algo.v.directions.clone(),
                "H": torch.zeros(M, task.dim, task.dim, dtype=torch.float64)}
        hp |= {"tau": 1.0, "tau_v": 1.0}
    init |= {"p": algo.x.clone(), "w": algo.lower_variables().clone(), "s": algo.y.directions.clone(),
             "z": algo.z.clone()}
    ours, log = run_mbbo(algo)
    theirs = authors_bsvrb(Oracles(task), method, init, log["blocks"], flat(log["lower"]), flat(log["upper"]), hp)
    assert_same(ours, theirs)
    if isinstance(algo, BSVRBv1):  # the guard was active: the updated Hessian estimates sit at Frobenius norm 10
        norms = torch.linalg.matrix_norm(algo.hessians[log["blocks"][-1]])
        assert torch.allclose(norms, torch.full_like(norms, 10.0))


def test_rsvrb_equals_authors_loop(task: HyperparamTask) -> None:
    """Both Hessian guards idle (H_bound = 0 for the authors, floor 1e-12 for mbbo); the initial H_i are made
    well-conditioned (eigenvalues in [1, 2)) and V_i start at zero in both (see `mbbo.algorithms.rsvrb`)."""
    common = {k: v for k, v in AUTHORS.items() if k not in ("alpha", "gamma")}
    algo = RSVRB(task.problem(), seed=0, lower_lr=0.5, hessian_floor=1e-12, **common)
    gen = torch.Generator().manual_seed(5)
    algo.eigvals = 1.0 + torch.rand(M, task.dim, generator=gen, dtype=torch.float64)
    H0 = eig_compose(algo.eigvals, algo.eigvecs)
    init = {"p": algo.x.clone(), "w": algo.lower_variables().clone(), "v": algo.grad_f.clone(),
            "V": torch.zeros(M, N_TRAIN, task.dim, dtype=torch.float64), "H": H0,
            "s": algo.y.directions.clone() / (1 - 0.9), "d": algo.d.clone()}
    ours, log = run_mbbo(algo)
    theirs = authors_rsvrb(Oracles(task), init, log["blocks"], log["second"], flat(log["lower"]), flat(log["upper"]),
                           {"beta": 0.9, "tau": 0.5, "eta": 1e-3, "H_bound": 0.0})
    assert_same(ours, theirs)
