"""Hand-written, closed-form BSVRB_v2 on the T1 logistic task: the speed floor for the generic engine.

Exactly the iteration of `mbbo.algorithms.bsvrb.BSVRBv2` (same random streams, same estimators, same lazy
all-block updates), but every oracle is an explicit formula instead of `torch.func` (no autograd), batched
over the sampled blocks and both points with `bmm`. Given the same seed it follows the library's trajectory
to rounding (checked by `tests/test_handwritten_bsvrb_v2.py`), which is what makes its time a valid floor.

The T1 block i with temperature s, ridge lam, training rows a_j (bias included), labels y_j = +-1 and sample
weights sigma(p_j): with the signed rows q_j = y_j a_j, the margin m_j = q_j^T w and c_j = sigma(-m_j / s),

    grad_w g              = (1/b) sum_j -sigma(p_j) c_j / s              q_j  + lam w
    (grad_ww g) v         = (1/b) sum_j  sigma(p_j) c_j (1 - c_j) / s^2 (q_j^T v) q_j + lam v   (y_j^2 = 1)
    [(grad_pw g) v]_j     = (1/b)        sigma'(p_j) (-c_j / s) (q_j^T v)           (row j of p only)
    grad_w f              = (1/b) sum_{j in val} -c_j / s  q_j

with c_j replaced by 1 where -m_j / s > 20 (torch's softplus is linear there, so the library's autograd
oracles see slope 1 and curvature 0). The upper tracker z and x stay dense (d_x = n_train); the hypergradient is added to z as sparse rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mbbo.blocks import BlockSampler, MovingBlocks
from mbbo.problem import MultiBlockProblem
from mbbo.tasks.hyperparam import HyperparamTask
from mbbo.trackers import MSVR

#: The library's random streams (mbbo.algorithms.base.STREAMS), seeded with seed * 1_000_003 + position.
STREAMS = ("blocks", "lower", "upper", "extra")

#: `torch.nn.functional.softplus` is linear above this input (its default threshold), so the library's
#: autograd sees slope 1 and curvature 0 there; the closed forms reproduce that exactly.
SOFTPLUS_THRESHOLD = 20.0


def _softplus_slope(t: Tensor) -> Tensor:
    """d softplus(t) / dt as torch computes it: sigma(t), or exactly 1 above the threshold (then the
    curvature c (1 - c) is exactly 0 as well)."""
    return torch.where(t > SOFTPLUS_THRESHOLD, torch.ones_like(t), torch.sigmoid(t))


class HandwrittenBSVRBv2:
    """BSVRB_v2 for the T1 hyper-parameter task with closed-form oracles.

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
        self.lr, self.beta = float(lr), float(beta)
        self.msvr = MSVR(alpha, float(gamma))
        # signed rows q_j = y_j a_j: margins, gradients and Hessian products all use q_j only
        self.Q_train = (task.y_train[:, None] * task.X_train).contiguous()
        self.Q_val = (task.y_val[:, None] * task.X_val).contiguous()
        temps = task.temperatures
        self.inv_temp = 1.0 / temps
        self.num_blocks = temps.shape[0]
        self.block_sampler = BlockSampler(self.num_blocks, block_batch)
        device = pb.x0.device
        self.generators = {s: torch.Generator(device=device) for s in STREAMS}
        for i, s in enumerate(STREAMS):
            self.generators[s].manual_seed(int(seed) * 1_000_003 + i)
        self.iteration = 0
        self.x = pb.x0.clone()
        self.x_prev = self.x.clone()
        self.z = torch.zeros_like(self.x)

        # estimators of all blocks from one mini-batch each at (x_0, y_0), v_0 = 0
        blocks = torch.arange(self.num_blocks, device=device)
        y0 = pb.y0.clone()
        v0 = torch.zeros_like(y0)
        idx, idx_val = self._sample(blocks, init_batch_size)
        gy, hv, _ = self._lower(blocks, idx, y0.unsqueeze(-1), v0.unsqueeze(-1), self.x.unsqueeze(0))
        gy_f = self._upper(blocks, idx_val, y0.unsqueeze(-1))
        self.v = MovingBlocks(v0, hv[..., 0] - gy_f[..., 0], linsys_lr, radius=v_radius)
        self.y = MovingBlocks(y0, gy[..., 0], lower_lr)
        self.fresh = True

    # --- sampling (same streams and order as the library) -------------------------------------------
    def _sample(self, blocks: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Row indices (B, b) of the lower (training) and upper (validation) mini-batches."""
        b = batch_size or self.batch_size
        shape = (blocks.shape[0], b)
        idx = torch.randint(self.Q_train.shape[0], shape, generator=self.generators["lower"])
        idx_val = torch.randint(self.Q_val.shape[0], shape, generator=self.generators["upper"])
        return idx.to(self.x.device), idx_val.to(self.x.device)

    # --- closed-form oracles, batched over blocks (B) and points (P) ---------------------------------
    def _lower(self, blocks: Tensor, idx: Tensor, w: Tensor, v: Tensor, xs: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
        """grad_w g, (grad_ww g) v as (B, d, P) and the cross product (grad_pw g) v as (B, b, P) at rows idx.

        w, v: (B, d, P) (point k in column k); xs: (P, n_train) values of p.
        """
        num_points = w.shape[-1]
        Q = self.Q_train[idx]  # (B, b, d)
        prod = torch.bmm(Q, torch.cat([w, v], dim=-1))  # (B, b, 2P): margins and q^T v
        margins, qv = prod[..., :num_points], prod[..., num_points:]
        inv_s = self.inv_temp[blocks].view(-1, 1, 1)
        c = _softplus_slope(margins * -inv_s)
        sp = torch.sigmoid(xs[:, idx].permute(1, 2, 0))  # (B, b, P)
        scale = inv_s / idx.shape[1]
        dl = c * scale  # -(d l / d m) / b
        g_coef = -sp * dl
        h_coef = sp * (c * (1.0 - c)) * (scale * inv_s) * qv
        out = torch.bmm(Q.transpose(1, 2), torch.cat([g_coef, h_coef], dim=-1))  # (B, d, 2P)
        gy = out[..., :num_points] + self.lam * w
        hv = out[..., num_points:] + self.lam * v
        cross = (sp * (sp - 1.0)) * dl * qv
        return gy, hv, cross

    def _upper(self, blocks: Tensor, idx_val: Tensor, w: Tensor) -> Tensor:
        """grad_w f as (B, d, P) on the validation rows idx_val; w: (B, d, P)."""
        Q = self.Q_val[idx_val]
        inv_s = self.inv_temp[blocks].view(-1, 1, 1)
        c = _softplus_slope(torch.bmm(Q, w) * -inv_s)
        return torch.bmm(Q.transpose(1, 2), c * (-inv_s / idx_val.shape[1]))

    # --- the iteration ------------------------------------------------------------------------------
    def step(self) -> None:
        """One BSVRB_v2 iteration (see `mbbo.algorithms.bsvrb`)."""
        t = self.iteration
        blocks = self.block_sampler.sample(self.generators["blocks"], self.x.device)
        idx, idx_val = self._sample(blocks)
        y_cur, y_prev = self.y.read(blocks, t)
        v_cur, v_prev = self.v.read(blocks, t)
        if self.fresh:
            w, v, xs = y_cur.unsqueeze(-1), v_cur.unsqueeze(-1), self.x.unsqueeze(0)
        else:
            w = torch.stack([y_cur, y_prev], dim=-1)
            v = torch.stack([v_cur, v_prev], dim=-1)
            xs = torch.stack([self.x, self.x_prev])
        gy, hv, cross = self._lower(blocks, idx, w, v, xs)
        gy_f = self._upper(blocks, idx_val, w)
        res = hv - gy_f
        s_new = self.msvr.update(self.y.direction(blocks, t), gy[..., 0], gy[..., -1])
        u_new = self.msvr.update(self.v.direction(blocks, t), res[..., 0], res[..., -1])
        self.v.write(blocks, v_cur, u_new, t)
        # hypergradient G = -(1/B) sum_i (grad_pw g_i) v_i at both points; STORM on z with sparse rows:
        # z <- G_0 + (1 - beta)(z - G_1) = (1 - beta) z + (G_0 - (1 - beta) G_1)
        scale = -1.0 / blocks.shape[0]
        if self.fresh:
            self.z = self.z.new_zeros(self.z.shape).index_add_(0, idx.reshape(-1), cross[..., 0].reshape(-1),
                                                               alpha=scale)
        else:
            q = 1.0 - self.beta
            rows = (cross[..., 0] - q * cross[..., 1]).reshape(-1)
            self.z = (self.z * q).index_add_(0, idx.reshape(-1), rows, alpha=scale)
        self.fresh = False
        self.y.write(blocks, y_cur, s_new, t)
        self.x_prev = self.x
        self.x = self.x - self.lr * self.z
        self.iteration += 1

    # --- views ---------------------------------------------------------------------------------------
    def lower_variables(self) -> Tensor:
        """Current w_i of all blocks, (m, d)."""
        return self.y.current_all(self.iteration)

    def linear_system_variables(self) -> Tensor:
        """Current v_i of all blocks, (m, d)."""
        return self.v.current_all(self.iteration)

    def state(self) -> dict[str, Any]:
        """x, z, lower and linear-system variables (for comparisons)."""
        return {"x": self.x.clone(), "z": self.z.clone(), "y": self.lower_variables(),
                "v": self.linear_system_variables()}
