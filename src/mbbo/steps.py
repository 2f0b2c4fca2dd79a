"""Step rules, schedules and projections, in the spirit of optax.

A step rule is a frozen dataclass of validated hyper-parameters with two pure methods:

- ``init(params) -> state``: the rule's state (a small dataclass of tensors and a step ``count``);
- ``update(grads, state, params=None) -> (updates, state)``: the *updates* to add to the parameters,
  ``params <- params + updates`` (see :func:`apply_updates`); updates point downhill (they include the minus
  sign).

``params`` / ``grads`` / ``updates`` are a tensor or a sequence of tensors (returned with the same structure,
as a list for sequences). Nothing is modified in place and every tensor follows the dtype and device of its
input. Learning rates are floats or schedules ``lr(k) -> float`` of the 0-based step count k.

Names and formulas follow torch.optim where a counterpart exists (``lr``, ``betas``, ``eps``,
``weight_decay``). Norm-based rules state their scope: ``"global"`` (one norm over the whole list of tensors)
or ``"per_tensor"``.

Projections act row-wise over the last dimension (``project_ball``, ``project_simplex``) or element-wise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from mbbo.projections import project_ball  # one ball projection for the library, re-exported here
from mbbo.validation import check_real as _check_real

__all__ = [
    "SGD",
    "Adam",
    "AdamState",
    "AdamW",
    "Clipped",
    "Constant",
    "CountState",
    "InversePower",
    "NesterovAveraged",
    "NesterovState",
    "Normalized",
    "Params",
    "Schedule",
    "StageDecay",
    "apply_updates",
    "as_schedule",
    "global_norm",
    "project_ball",
    "project_box",
    "project_nonnegative",
    "project_nonpositive",
    "project_simplex",
    "revisit_scaled_step",
    "scheduled",
]

Params = Tensor | Sequence[Tensor]
Schedule = Callable[[int], float]
LR = float | Schedule
NormScope = Literal["global", "per_tensor"]


# ----------------------------------------------------------------------------------------------------------
# lower step sizes of multi-block methods

LOWER_LR_SCALINGS = (None, "none", "theory")
REVISIT_REFERENCE = 10.0  # m / B of the authors' runs (m = 100, B = 10), where their tau was tuned


def revisit_scaled_step(value: float | None, default: float, scaling: str | None, num_blocks: int,
                        block_batch: int, reference: float = REVISIT_REFERENCE) -> float:
    """A multi-block method's lower step size (tau, or tau_v of BSVRB_v2) for m blocks sampled B at a time.

    Why it must scale [template: reasoned from the structure of the seed paper's analysis, whose formulas are
    not available here]. BSVRB and RSVRB move every block at every iteration along its last estimate,
    y_i <- y_i - tau s_i, and re-estimate a block once every r = m / B iterations on average. The lazy form
    takes those r steps at once when the block is read again; the authors' delayed form takes them as one
    step of tau (1 + delay) along the fresh estimate (expected delay + 1 = r). Either way a block moves by
    about r tau s_i per visit: a gradient step of size r tau on g_i, stable only while r tau = O(1 / L_g).
    The proofs (Lemmas B.7 and B.12-B.13, with the MSVR error recursion of Jiang et al. 2022, Lemma 1) say the
    same: the MSVR error contracts at rate B alpha / m per iteration and is driven by (m / B) L^2 times the
    movement of all m blocks, so the all-block step is the paper's scaled step tau_t proportional to B / m
    times a constant set by mu and L_g. The MSVR weight of the theory, gamma = (m - B) / (B (1 - alpha)) +
    (1 - alpha) (`gamma="theory"`), grows as m / B, so that its correction gamma (q(y_t) - q(y_{t-1})),
    which is O(gamma tau), stays O(1) exactly when tau is proportional to B / m. tau_v (the quadratic of v_i
    has Hessian grad_yy g_i) scales the same way.

    The rule, with the authors' tau as the constant at their r_ref = 10:

        "theory":  tau_used = tau * min(1, r_ref / r),   r = m / B
        "none":    tau_used = tau

    so m = 100, B = 10 keeps the authors' values, m / B < 10 never raises tau, and the per-visit step
    r tau_used never exceeds r_ref tau. `value` None means `default` (the authors' tau) with `scaling` None
    meaning "theory"; an explicit `value` with `scaling` None is returned unchanged (a user who sets tau gets
    exactly their tau). Methods that move a block only when they sample it (the moving-average baseline)
    pass block_batch = num_blocks (r = 1): nothing accumulates between visits.
    """
    if scaling not in LOWER_LR_SCALINGS:
        raise ValueError(f"lower_lr_scaling must be one of {LOWER_LR_SCALINGS}, got {scaling!r}")
    base = default if value is None else value
    mode = scaling if scaling is not None else ("theory" if value is None else "none")
    if mode == "none":
        return float(base)
    return float(base) * min(1.0, reference * block_batch / num_blocks)


# ----------------------------------------------------------------------------------------------------------
# validation and tree helpers


def _check_lr(name: str, lr: object) -> None:
    if callable(lr):
        return
    _check_real(name, lr, 0.0, None)


def _check_scope(scope: object) -> None:
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope must be one of 'global', 'per_tensor', got {scope!r}")


def _as_list(params: Params) -> list[Tensor]:
    if isinstance(params, Tensor):
        return [params]
    return list(params)


def _like(template: Params, values: list[Tensor]) -> Tensor | list[Tensor]:
    return values[0] if isinstance(template, Tensor) else values


def global_norm(tensors: Params) -> Tensor:
    """Euclidean norm of all entries of a tensor or a sequence of tensors (a 0-d tensor)."""
    ts = _as_list(tensors)
    if not ts:
        raise ValueError("global_norm of an empty sequence")
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    norms = torch.stack([torch.linalg.vector_norm(t.to(dtype)) for t in ts])
    return torch.linalg.vector_norm(norms)


def apply_updates(params: Params, updates: Params) -> Tensor | list[Tensor]:
    """params + updates, with the structure of ``params`` (no in-place change)."""
    ps, us = _as_list(params), _as_list(updates)
    if len(ps) != len(us):
        raise ValueError(f"params has {len(ps)} tensors but updates has {len(us)}")
    return _like(params, [p + u for p, u in zip(ps, us, strict=True)])


# ----------------------------------------------------------------------------------------------------------
# schedules


@dataclass(frozen=True)
class Constant:
    """lr_k = value."""

    value: float

    def __post_init__(self) -> None:
        _check_real("value", self.value, 0.0, None)

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class InversePower:
    """lr_k = c / (k + k0)^a (k = 0, 1, ...).

    benchopt's scheduler is c / (k + 1)^a (k0 = 1); F2SA uses a in {4/7, 5/7}, TTSA {0.4, 0.6}, SOBA 1/2;
    LV-HBA's penalty c_k = c0 (k + 1)^p is ``InversePower(c0, a=-p)``.
    """

    c: float
    a: float = 0.5
    k0: float = 1.0

    def __post_init__(self) -> None:
        _check_real("c", self.c, 0.0, None)
        _check_real("a", self.a)
        _check_real("k0", self.k0, 0.0, None, low_open=True)

    def __call__(self, step: int) -> float:
        return float(self.c / (step + self.k0) ** self.a)


@dataclass(frozen=True)
class StageDecay:
    """Stage-wise decay: lr_k = c * factor^(number of boundaries <= k), boundaries = floor(f * total_steps).

    BSVRB's ``--stag_decay``: factor 0.1 at 50% of the run (the default); NDCG runs: factor 0.25 at 60 of 120
    epochs.
    """

    c: float
    total_steps: int
    fractions: tuple[float, ...] = (0.5,)
    factor: float = 0.1
    boundaries: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        _check_real("c", self.c, 0.0, None)
        if (
            not isinstance(self.total_steps, int)
            or isinstance(self.total_steps, bool)
            or self.total_steps < 1
        ):
            raise ValueError(f"total_steps must be an integer in [1, inf), got {self.total_steps!r}")
        fr = tuple(self.fractions)
        for f in fr:
            _check_real("fractions", f, 0.0, 1.0)
        if list(fr) != sorted(fr):
            raise ValueError(f"fractions must be non-decreasing, got {fr!r}")
        _check_real("factor", self.factor, 0.0, None)
        object.__setattr__(self, "fractions", fr)
        object.__setattr__(self, "boundaries", tuple(math.floor(f * self.total_steps) for f in fr))

    def __call__(self, step: int) -> float:
        n = sum(1 for bnd in self.boundaries if step >= bnd)
        return float(self.c * self.factor**n)


def scheduled(c: float, a: float, step: int) -> float:
    """benchopt's step size c / (step + 1)^a (`InversePower`), the one schedule wrapper of the zoo; a = 0 is
    the constant c."""
    return InversePower(c, a)(step) if a else float(c)


def as_schedule(lr: LR) -> Schedule:
    """A schedule from a float (constant) or a callable (returned unchanged)."""
    if callable(lr):
        return lr
    return Constant(float(lr))


def _lr_at(lr: LR, step: int) -> float:
    return float(lr(step)) if callable(lr) else float(lr)


# ----------------------------------------------------------------------------------------------------------
# step rules


@dataclass(frozen=True)
class CountState:
    """State of the stateless rules: the number of updates done so far."""

    count: int = 0


@dataclass(frozen=True)
class SGD:
    """Plain (stochastic) gradient step: u_k = -lr_k * g_k."""

    lr: LR = 0.1

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)

    def init(self, params: Params) -> CountState:
        return CountState(0)

    def update(
        self, grads: Params, state: CountState, params: Params | None = None
    ) -> tuple[Params, CountState]:
        lr = _lr_at(self.lr, state.count)
        return _like(grads, [-lr * g for g in _as_list(grads)]), CountState(state.count + 1)


def _norm_scale(gs: list[Tensor], scope: str, eps: float) -> list[Tensor]:
    """g / max(||g||, eps) with the given scope; zero where the norm is zero."""

    def scaled(g: Tensor, norm: Tensor) -> Tensor:
        denom = torch.clamp(norm, min=eps) if eps > 0 else norm
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, g / safe, torch.zeros_like(g))

    if scope == "global":
        norm = global_norm(gs)
        return [scaled(g, norm.to(g.dtype)) for g in gs]
    return [scaled(g, torch.linalg.vector_norm(g)) for g in gs]


@dataclass(frozen=True)
class Normalized:
    """Normalised step: u_k = -lr_k * g_k / max(||g_k||, eps) (u_k = 0 when g_k = 0).

    ``scope="global"``: one norm over all tensors (BO-REP, ICLR 2024; SLIP, ICML 2024; AccBO data cleaning).
    ``scope="per_tensor"``: each tensor normalised by its own norm (AccBO's AUC code, layer-wise).
    """

    lr: LR = 0.01
    scope: NormScope = "global"
    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)
        _check_scope(self.scope)
        _check_real("eps", self.eps, 0.0, None)

    def init(self, params: Params) -> CountState:
        return CountState(0)

    def update(
        self, grads: Params, state: CountState, params: Params | None = None
    ) -> tuple[Params, CountState]:
        lr = _lr_at(self.lr, state.count)
        gs = _norm_scale(_as_list(grads), self.scope, self.eps)
        return _like(grads, [-lr * g for g in gs]), CountState(state.count + 1)


@dataclass(frozen=True)
class Clipped:
    """Clipped step (SLIP's ``grad_clip`` option, Gong, Hao & Liu ICML 2024)::

        u_k = -min(lr_k, gamma / ||m_k||) * m_k


    Equivalently a plain step of size lr whose length is capped at gamma. ``scope`` as in :class:`Normalized`
    (per-tensor is BLISS's per-tensor clip with lr = 1, gamma = 1 applied to a direction).
    """

    lr: LR = 0.01
    gamma: float = 1.0
    scope: NormScope = "global"

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)
        _check_real("gamma", self.gamma, 0.0, None, low_open=True)
        _check_scope(self.scope)

    def init(self, params: Params) -> CountState:
        return CountState(0)

    def update(
        self, grads: Params, state: CountState, params: Params | None = None
    ) -> tuple[Params, CountState]:
        lr = _lr_at(self.lr, state.count)
        gs = _as_list(grads)
        if self.scope == "global":
            norms = [global_norm(gs)] * len(gs)
        else:
            norms = [torch.linalg.vector_norm(g) for g in gs]
        out = []
        for g, n in zip(gs, norms, strict=True):
            n = n.to(g.dtype)
            step = torch.where(
                n * lr > self.gamma, self.gamma / torch.where(n > 0, n, torch.ones_like(n)), lr
            )
            out.append(-step * g)
        return _like(grads, out), CountState(state.count + 1)


@dataclass(frozen=True)
class AdamState:
    count: int
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba, ICLR 2015), exactly as ``torch.optim.Adam`` (no amsgrad). With t = k + 1::

        g     <- g + weight_decay * p            (coupled L2, if not decoupled_weight_decay)
        m     <- beta1 m + (1 - beta1) g;    s <- beta2 s + (1 - beta2) g^2
        u     = -lr_k / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)
        u     <- u - lr_k * weight_decay * p     (decoupled, AdamW: Loshchilov & Hutter, ICLR 2019)

    ``params`` must be passed to ``update`` when weight_decay > 0. AdamBO (Gong, Hao & Liu 2025) uses the
    coupled form with weight_decay 0.01; BLISS uses AdamW.
    """

    lr: LR = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        _check_real("betas[0]", self.betas[0], 0.0, 1.0, high_open=True)
        _check_real("betas[1]", self.betas[1], 0.0, 1.0, high_open=True)
        _check_real("eps", self.eps, 0.0, None)
        _check_real("weight_decay", self.weight_decay, 0.0, None)

    def init(self, params: Params) -> AdamState:
        ps = _as_list(params)
        return AdamState(0, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps])

    def update(
        self, grads: Params, state: AdamState, params: Params | None = None
    ) -> tuple[Params, AdamState]:
        gs = _as_list(grads)
        if len(gs) != len(state.exp_avg):
            raise ValueError(f"grads has {len(gs)} tensors but the state was built for {len(state.exp_avg)}")
        lr = _lr_at(self.lr, state.count)
        t = state.count + 1
        beta1, beta2 = self.betas
        ps: list[Tensor] | None = None
        if self.weight_decay:
            if params is None:
                raise ValueError("Adam.update needs params when weight_decay > 0")
            ps = _as_list(params)
        bc1 = 1.0 - beta1**t
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        updates, ms, ss = [], [], []
        for i, g in enumerate(gs):
            if ps is not None and not self.decoupled_weight_decay:
                g = g + self.weight_decay * ps[i]
            m = state.exp_avg[i].lerp(g, 1.0 - beta1)
            s = state.exp_avg_sq[i] * beta2 + (1.0 - beta2) * g * g
            u = -(lr / bc1) * m / (s.sqrt() / bc2_sqrt + self.eps)
            if ps is not None and self.decoupled_weight_decay:
                u = u - lr * self.weight_decay * ps[i]
            updates.append(u)
            ms.append(m)
            ss.append(s)
        return _like(grads, updates), AdamState(t, ms, ss)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay and the defaults of ``torch.optim.AdamW``."""

    weight_decay: float = 1e-2
    decoupled_weight_decay: bool = True


@dataclass(frozen=True)
class NesterovState:
    count: int
    prev: Tensor
    average: Tensor


@dataclass(frozen=True)
class NesterovAveraged:
    """Nesterov's accelerated (stochastic) gradient with iterate averaging, AccBO's lower-level rule
    (Gong, Hao & Liu, NeurIPS 2024, algorithms.md 4.3). The gradient is taken at the extrapolated point::

        y~_t        = y_t + momentum * (y_t - y_{t-1})                  (extrapolate)
        y_{t+1}     = y~_t - lr_t * grad_y G(x_t, y~_t)                 (update, given that gradient)
        yhat_{t+1}  = (1 - averaging) * yhat_t + averaging * y_{t+1}    (average, used for the hypergradient)

    Initialisation y_{-1} = y_0 and yhat_0 = y_0. Usage: ``y_tilde = rule.extrapolate(y, s)``; compute the
    gradient at ``y_tilde``; ``y, s = rule.update(grad, s, y)``; read ``s.average``. Works on one tensor
    (stack the lower variables of several blocks along a leading dimension). AccBO defaults: lr 0.1, momentum
    0.1, averaging 0.5.
    """

    lr: LR = 0.1
    momentum: float = 0.1
    averaging: float = 0.5

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)
        _check_real("momentum", self.momentum, 0.0, 1.0)
        _check_real("averaging", self.averaging, 0.0, 1.0, low_open=True)

    def init(self, y: Tensor) -> NesterovState:
        return NesterovState(0, y.clone(), y.clone())

    def extrapolate(self, y: Tensor, state: NesterovState) -> Tensor:
        return y + self.momentum * (y - state.prev)

    def update(self, grad: Tensor, state: NesterovState, y: Tensor) -> tuple[Tensor, NesterovState]:
        """Return the new iterate y_{t+1} (not an increment) and the new state (with y_t and the average)."""
        lr = _lr_at(self.lr, state.count)
        y_new = self.extrapolate(y, state) - lr * grad
        average = state.average.lerp(y_new, self.averaging)
        return y_new, replace(state, count=state.count + 1, prev=y, average=average)


# ----------------------------------------------------------------------------------------------------------
# projections


def project_box(
    v: Tensor, lower: float | Tensor | None = None, upper: float | Tensor | None = None
) -> Tensor:
    """Element-wise clamp to [lower, upper] (either bound may be None; tensors broadcast)."""
    if (
        lower is not None
        and upper is not None
        and bool(torch.any(torch.as_tensor(lower) > torch.as_tensor(upper)))
    ):
        raise ValueError(f"lower must be <= upper, got lower={lower!r}, upper={upper!r}")
    return torch.clamp(v, min=lower, max=upper)


def project_nonpositive(v: Tensor) -> Tensor:
    """Projection onto {v <= 0} (SFLCB's slack variables): min(v, 0)."""
    return torch.clamp(v, max=0.0)


def project_nonnegative(v: Tensor) -> Tensor:
    """Projection onto {v >= 0} (Lagrange multipliers, LV-HBA): max(v, 0)."""
    return torch.clamp(v, min=0.0)


def project_simplex(v: Tensor, total: float = 1.0) -> Tensor:
    """Euclidean projection onto {w >= 0, sum w = total}, row-wise over the last dimension.

    Sort-based algorithm of Held, Wolfe & Crowder (1974) / Duchi et al. (ICML 2008): with u sorted
    decreasingly, rho = max{j : u_j - (sum_{i<=j} u_i - total)/j > 0}, theta = (sum_{i<=rho} u_i - total)/rho,
    w = max(v - theta, 0).
    """
    _check_real("total", total, 0.0, None, low_open=True)
    if v.ndim == 0 or v.shape[-1] == 0:
        raise ValueError(f"project_simplex needs a non-empty last dimension, got shape {tuple(v.shape)}")
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - total
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = cond.sum(dim=-1, keepdim=True).clamp_min(1)  # the condition holds on a prefix; j = 1 always holds
    theta = torch.gather(css, -1, rho - 1) / rho.to(v.dtype)
    return torch.clamp(v - theta, min=0.0)
