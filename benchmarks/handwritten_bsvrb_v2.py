"""Hand-written, closed-form BSVRB_v2 on the T1 logistic task: the speed floor for the generic engine.

Exactly the iteration of `mbbo.algorithms.bsvrb.BSVRBv2` (same random streams, same estimators, same lazy
all-block updates), but every oracle is an explicit formula instead of `torch.func` (no autograd), batched
over the sampled blocks and both points with two `bmm` calls per iteration. Given the same seed it follows the
library's trajectory to rounding (checked by `tests/test_handwritten_bsvrb_v2.py`), which is what makes its
time a valid floor.

Closed forms. Block i has temperature s, ridge lam; training rows a_j (bias included), labels y_j = +-1,
sample weights sigma(p_j). With the signed rows q_j = y_j a_j, the margin m_j = q_j^T w and c_j the slope of
softplus at -m_j / s (sigma(-m_j / s), or exactly 1 where -m_j / s > 20: torch's softplus is linear there, so
the library's autograd oracles see slope 1 and curvature 0; reproduced here):

    grad_w g           = (1/b) sum_j -sigma(p_j) c_j / s q_j + lam w
    (grad_ww g) v      = (1/b) sum_j sigma(p_j) c_j (1 - c_j) / s^2 (q_j^T v) q_j + lam v       (y_j^2 = 1)
    [(grad_pw g) v]_j  = (1/b) sigma'(p_j) (-c_j / s) (q_j^T v)                  (only the b rows of p)
    grad_w f           = (1/b) sum_{j in val} -c_j / s q_j

Layout. The training and validation mini-batches are gathered into one buffer (no copy of the data set),
so two `bmm` calls per iteration serve both levels at both points. The lower variables and the linear-system
variables are one (m, 2d) table [w_i | v_i] with directions [s_i | u_i], updated lazily like
`mbbo.blocks.MovingBlocks` (both parts of a block are written at the same iterations); projected replays of
v_i (the ball ||v|| <= C) run on the 2-D coordinates of v in span{v_start, u} instead of on d-vectors. x and
the upper tracker z are dense (d_x = n_train); the hypergradient enters z as sparse rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mbbo.blocks import BlockSampler
from mbbo.problem import MultiBlockProblem
from mbbo.tasks.hyperparam import HyperparamTask
from mbbo.trackers import MSVR, STORM

#: The library's random streams (mbbo.algorithms.base.STREAMS), seeded with seed * 1_000_003 + position.
STREAMS = ("blocks", "lower", "upper", "extra")

#: `torch.nn.functional.softplus` is linear above this input (its default threshold).
SOFTPLUS_THRESHOLD = 20.0


def softplus_slope(t: Tensor) -> Tensor:
    """d softplus(t) / dt as torch's autograd computes it: sigma(t), or exactly 1 above the threshold (where
    the curvature c (1 - c) is then exactly 0 too)."""
    return torch.where(t > SOFTPLUS_THRESHOLD, torch.ones_like(t), torch.sigmoid(t))


def replay_projected(start: Tensor, step_direction: Tensor, steps: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """k-fold projected steps w <- Proj_{||w|| <= radius}(w - step_direction) for each row, k = steps[row].

    Returns (w after k steps, w after k - 1 steps; the start when k = 0). Every iterate lies in
    span{start, step_direction}, so the recursion runs on two coefficients per row from the rows' Gram
    entries (scalars), not on d-vectors.
    """
    gram = torch.stack([(start * start).sum(-1), (start * step_direction).sum(-1),
                        (step_direction * step_direction).sum(-1)], dim=-1).tolist()
    coeffs: list[list[float]] = []
    for (n_ss, n_sd, n_dd), k in zip(gram, steps.tolist(), strict=True):
        a, b = 1.0, 0.0
        a_prev, b_prev = a, b
        for _ in range(k):
            a_prev, b_prev = a, b
            b -= 1.0
            norm = math.sqrt(max(a * a * n_ss + 2.0 * a * b * n_sd + b * b * n_dd, 0.0))
            if norm > radius:
                a, b = a * (radius / norm), b * (radius / norm)
        coeffs.append([a, b, a_prev, b_prev])
    c = torch.tensor(coeffs, dtype=start.dtype, device=start.device)
    cur = c[:, 0:1] * start + c[:, 1:2] * step_direction
    prev = c[:, 2:3] * start + c[:, 3:4] * step_direction
    return cur, prev


class HandwrittenBSVRBv2:
    """BSVRB_v2 for the T1 hyper-parameter task with closed-form oracles (see the module docstring).

    Hyper-parameters and defaults are those of `mbbo.algorithms.bsvrb.BSVRBv2Config` (the authors' run
    script): B = 10, eta = 1e-3, tau = tau_v = 1, alpha = 0.9, gamma = 1, beta = 0.9, ||v|| <= 10.
    """

    name = "handwritten_bsvrb_v2"

    def __init__(self, task: HyperparamTask, problem: MultiBlockProblem | None = None, *, seed: int = 0,
                 block_batch: int = 10, lr: float = 1e-3, lower_lr: float = 1.0, linsys_lr: float = 1.0,
                 alpha: float = 0.9, gamma: float = 1.0, beta: float = 0.9, v_radius: float = 10.0,
                 init_batch_size: int | None = None) -> None:
        """`problem` (default `task.problem()`) supplies only the initial point (x_0, y_0)."""
        pb = problem if problem is not None else task.problem()
        self.lam = float(task.settings.lam)
        self.batch_size = int(task.settings.batch_size)
        self.lr = float(lr)
        self.msvr = MSVR(alpha, float(gamma))
        self.storm = STORM(beta)
        self.radius = float(v_radius)
        # the task's tensors, not copies (so that the memory comparison with the library is fair)
        self.X_train, self.y_train = task.X_train, task.y_train
        self.X_val, self.y_val = task.X_val, task.y_val
        self.inv_temp = 1.0 / task.temperatures
        self.num_blocks = task.temperatures.shape[0]
        self.dim = pb.dim_y
        self.block_sampler = BlockSampler(self.num_blocks, block_batch)
        device = pb.x0.device
        self.generators = {s: torch.Generator(device=device) for s in STREAMS}
        for i, s in enumerate(STREAMS):
            self.generators[s].manual_seed(int(seed) * 1_000_003 + i)
        self.iteration = 0
        self.x = pb.x0.clone()
        self.x_prev = self.x.clone()
        self.z = torch.zeros_like(self.x)

        # lazy table [w_i | v_i] with directions [s_i | u_i], step sizes per column and stamps
        d = self.dim
        like = {"dtype": pb.y0.dtype, "device": device}
        self.steps = torch.cat([torch.full((d,), float(lower_lr), **like), torch.full((d,), float(linsys_lr), **like)])
        self.values = torch.cat([pb.y0, torch.zeros_like(pb.y0)], dim=1)
        self.stamps = torch.zeros(self.num_blocks, dtype=torch.long, device=device)
        # estimators of all blocks from one mini-batch each at (x_0, y_0, v_0 = 0)
        blocks = torch.arange(self.num_blocks, device=device)
        idx, idx_val = self._sample(blocks, init_batch_size)
        new, _ = self._oracles(blocks, idx, idx_val, self.values.unsqueeze(1), self.x[idx].unsqueeze(0))
        self.directions = new[:, 0].contiguous()
        self.fresh = True

    # --- sampling (same streams and order as the library) -------------------------------------------
    def _sample(self, blocks: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Row indices (B, b) of the lower (training) and upper (validation) mini-batches."""
        b = batch_size or self.batch_size
        shape = (blocks.shape[0], b)
        idx = torch.randint(self.X_train.shape[0], shape, generator=self.generators["lower"])
        idx_val = torch.randint(self.X_val.shape[0], shape, generator=self.generators["upper"])
        return idx.to(self.x.device), idx_val.to(self.x.device)

    # --- closed-form oracles, batched over blocks (B) and points (P) ---------------------------------
    def _oracles(self, blocks: Tensor, idx: Tensor, idx_val: Tensor, wv: Tensor, p_rows: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """At P points [w | v] (wv: (B, P, 2d)) and p at the training rows idx (p_rows: (P, B, b)):

        [grad_w g | (grad_ww g) v - grad_w f] as (B, P, 2d), and (grad_pw g) v at the rows idx as (B, b, P).

        The training and validation rows are gathered into one (2B, b, d) buffer (batch entry B + i holds
        block i's validation rows), so two `bmm` calls serve both levels at both points.
        """
        B, P, b, d = wv.shape[0], wv.shape[1], idx.shape[1], self.dim
        X = torch.empty(2 * B * b, d, dtype=self.X_train.dtype, device=self.X_train.device)
        torch.index_select(self.X_train, 0, idx.reshape(-1), out=X[: B * b])
        torch.index_select(self.X_val, 0, idx_val.reshape(-1), out=X[B * b:])
        X = X.view(2 * B, b, d)
        labels = torch.cat([self.y_train[idx], self.y_val[idx_val]]).unsqueeze(-1)  # (2B, b, 1)
        W = wv.view(B, 2 * P, d).repeat(2, 1, 1)  # columns (point, [w, v]) for both halves
        prod = torch.bmm(X, W.transpose(1, 2)).view(2 * B, b, P, 2) * labels.unsqueeze(-1)
        margins, qv = prod[..., 0], prod[:B, :, :, 1]  # y_j a_j^T w: (2B, b, P); y_j a_j^T v: (B, b, P)
        inv_s = self.inv_temp[blocks].view(-1, 1, 1).repeat(2, 1, 1)
        c = softplus_slope(margins * -inv_s)
        cs = c * (inv_s / b)  # -(d l / d m) / b
        sp = torch.sigmoid(p_rows).permute(1, 2, 0)  # sigma(p_j): (B, b, P)
        g_coef = -sp * cs[:B]
        h_coef = g_coef * (c[:B] - 1.0) * inv_s[:B] * qv
        # coefficients of the rows a_j (signed by y_j): gradient of g, then the residual H v - grad f
        coef = torch.cat([torch.stack([g_coef, h_coef], dim=-1),
                          torch.stack([torch.zeros_like(g_coef), cs[B:]], dim=-1)]) * labels.unsqueeze(-1)
        out = torch.bmm(coef.view(2 * B, b, 2 * P).transpose(1, 2), X)  # (2B, 2P, d)
        out = (out[:B] + out[B:]).view(B, P, 2 * d)
        cross = g_coef * (1.0 - sp) * qv
        return out + self.lam * wv, cross

    # --- lazy all-block updates ------------------------------------------------------------------------
    def _read(self, blocks: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """[w_i | v_i] at iteration t and t - 1 (before this iteration's move), (B, 2d) each."""
        start = self.values[blocks]
        step_dir = self.directions[blocks] * self.steps
        k = t - self.stamps[blocks]
        kf = k.to(start.dtype).unsqueeze(1)
        cur = start - kf * step_dir
        prev = start - (kf - 1.0).clamp_min(0.0) * step_dir
        d = self.dim
        outside = torch.linalg.vector_norm(cur[:, d:], dim=1) > self.radius
        if bool(outside.any()):
            r = outside.nonzero().squeeze(1)
            c, p = replay_projected(start[r, d:], step_dir[r, d:], k[r], self.radius)
            cur[r, d:] = c
            prev[r, d:] = p
        return cur, prev

    # --- the iteration ------------------------------------------------------------------------------
    def step(self) -> None:
        """One BSVRB_v2 iteration (see `mbbo.algorithms.bsvrb`)."""
        t = self.iteration
        blocks = self.block_sampler.sample(self.generators["blocks"], self.x.device)
        idx, idx_val = self._sample(blocks)
        cur, prev = self._read(blocks, t)
        if self.fresh:
            wv, p_rows = cur.unsqueeze(1), self.x[idx].unsqueeze(0)
        else:
            wv, p_rows = torch.stack([cur, prev], dim=1), torch.stack([self.x[idx], self.x_prev[idx]])
        new, cross = self._oracles(blocks, idx, idx_val, wv, p_rows)
        # MSVR on [s_i | u_i] with the same samples at both points
        self.directions[blocks] = self.msvr.update(self.directions[blocks], new[:, 0], new[:, -1])
        self.values[blocks] = cur
        self.stamps[blocks] = t
        # G = -(1/B) sum_i (grad_pw g_i) v_i (sparse rows); STORM: z <- G_0 + (1 - beta)(z - G_1)
        train_rows = idx.reshape(-1)
        scale = -1.0 / blocks.shape[0]
        if self.fresh:
            self.z = torch.zeros_like(self.z).index_add_(0, train_rows, cross[..., 0].reshape(-1), alpha=scale)
        else:
            q = 1.0 - self.storm.beta
            sparse = (cross[..., 0] - q * cross[..., 1]).reshape(-1)
            self.z = (self.z * q).index_add_(0, train_rows, sparse, alpha=scale)
        self.fresh = False
        self.x_prev = self.x
        self.x = torch.add(self.x, self.z, alpha=-self.lr)
        self.iteration += 1

    # --- views ---------------------------------------------------------------------------------------
    def _current_all(self) -> Tensor:
        return self._read(torch.arange(self.num_blocks, device=self.values.device), self.iteration)[0]

    def lower_variables(self) -> Tensor:
        """Current w_i of all blocks, (m, d)."""
        return self._current_all()[:, : self.dim]

    def linear_system_variables(self) -> Tensor:
        """Current v_i of all blocks, (m, d)."""
        return self._current_all()[:, self.dim:]

    def state(self) -> dict[str, Any]:
        """x, z, lower and linear-system variables (for comparisons)."""
        both = self._current_all()
        return {"x": self.x.clone(), "z": self.z.clone(), "y": both[:, : self.dim].clone(),
                "v": both[:, self.dim:].clone()}
