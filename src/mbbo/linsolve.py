"""Linear solvers for the system of implicit differentiation, H v = b.

In bilevel optimisation H = grad_yy g (the lower-level Hessian) and b = grad_y f, so that the hypergradient is
grad_x f - (grad_xy g) v (the sign convention of the whole library). H is usually available only through a
Hessian-vector product (HVP) callable ``hvp(v) -> H v``; this module offers the standard ways of solving the
system from such products, and a dense solve for the cases where H is formed explicitly (low-dimensional lower
levels).

Batching. Every solver works row-wise on tensors of shape ``(..., d)``: the leading dimensions index
independent systems (for example the sampled blocks of a multi-block problem), every reduction (norms, inner
products) runs over the last dimension only, and ``hvp`` must act row-wise too. A batched call of ``hvp``
counts as one call in the returned ``n_hvp`` (the oracle layer counts per-block evaluations itself).

Stochastic HVPs. Neumann series and SGD on the quadratic accept, instead of one ``hvp``, a source of fresh
HVPs (one per term or step, each on an independent mini-batch): a sequence of callables, or an
:class:`HVPFactory` wrapping ``make(j) -> hvp`` that is called lazily, so a randomly truncated series draws
only the batches it uses.

Every solver is a frozen dataclass whose hyper-parameters are validated when it is built, and whose ``solve``
method has the common signature ``solve(hvp, b, *, v0=None, generator=None) -> LinearSolveResult``; solvers
without warm start or randomness ignore the arguments they do not use (see ``supports_warm_start``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from mbbo import projections
from mbbo.validation import check_int as _check_int
from mbbo.validation import check_real as _check_real

__all__ = [
    "HVP",
    "ConjugateGradient",
    "FixedPoint",
    "HVPFactory",
    "HVPSource",
    "LinearSolveResult",
    "LinearSolver",
    "Neumann",
    "SGDQuadratic",
    "eigen_floor",
    "explicit_solve",
]

HVP = Callable[[Tensor], Tensor]
"""A (batched) Hessian-vector product: ``hvp(v)`` returns ``H v`` for a tensor ``v`` of shape ``(..., d)``."""


class HVPFactory:
    """A lazy source of fresh HVP callables: ``get(j)`` returns the HVP to use for term / step ``j``
    (0-based).

    Use it when every term of a Neumann series or every SGD step should see an independent mini-batch, e.g.
    ``HVPFactory(lambda j: oracle.hvp_on(sampler.next_batch()))``. It has no ``__call__`` on purpose, so it
    can never be mistaken for an HVP itself.
    """

    def __init__(self, make: Callable[[int], HVP]) -> None:
        if not callable(make):
            raise TypeError(f"make must be callable, got {type(make).__name__}")
        self._make = make

    def get(self, j: int) -> HVP:
        return self._make(j)


HVPSource = HVP | Sequence[HVP] | HVPFactory
"""One HVP (the same matrix for every term), a sequence of HVPs (term j uses entry j), or an HVPFactory."""


class LinearSolveResult(NamedTuple):
    """Solution ``v`` (same shape as ``b``) and the number of calls made to the HVP source."""

    v: Tensor
    n_hvp: int


class LinearSolver(Protocol):
    """Common interface of the HVP-based solvers of this module."""

    supports_warm_start: ClassVar[bool]

    def solve(
        self,
        hvp: HVPSource,
        b: Tensor,
        *,
        v0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LinearSolveResult: ...


# ----------------------------------------------------------------------------------------------------------
# validation and small helpers


def _hvp_at(source: HVPSource, j: int) -> HVP:
    """The HVP for term / step ``j`` of a source (see :data:`HVPSource`)."""
    if isinstance(source, HVPFactory):
        return source.get(j)
    if isinstance(source, Sequence):
        if j >= len(source):
            raise ValueError(
                f"the sequence of HVPs has {len(source)} entries, but term {j} (0-based) was needed"
            )
        return source[j]
    if callable(source):
        return source
    raise TypeError(
        f"hvp must be a callable, a sequence of callables or an HVPFactory, got {type(source).__name__}"
    )


def _single_hvp(source: HVPSource, solver: str) -> HVP:
    if isinstance(source, HVPFactory | Sequence) or not callable(source):
        raise TypeError(
            f"{solver} needs one fixed HVP callable (the matrix must not change between iterations)"
        )
    return source


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Inner products over the last dimension, keeping it (shape (..., 1)) for broadcasting."""
    return (a * b).sum(dim=-1, keepdim=True)


def _row_norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=-1, keepdim=True)


def _check_v0(v0: Tensor | None, b: Tensor) -> None:
    if v0 is not None and v0.shape != b.shape:
        raise ValueError(f"v0 must have the shape of b, {tuple(b.shape)}, got {tuple(v0.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Neumann series


@dataclass(frozen=True)
class Neumann:
    """Neumann-series approximation of H^{-1} b.

    Deterministic truncation (stocBiO, Ji, Yang & Liang, ICML 2021, eq. for v_Q; benchopt ``shia``)::

        v = eta * sum_{q=0}^{Q} prod_{j=1}^{q} (I - eta H_j) b          (Q HVP calls)

    computed by the recursion p_0 = b, p_q = (I - eta H_q) p_{q-1}, v = eta * (p_0 + ... + p_Q). With
    independent mini-batches H_j this is the paper's estimator (the order of the factors does not change its
    distribution). The reference code's variant (sum without the eta factor and without the q = 0 term, one
    batch for all terms) is deliberately not reproduced.

    Random truncation (Ghadimi & Wang 2018 BSA, benchopt ``hia``; AccBO, Gong, Hao & Liu, NeurIPS 2024)::

        v = Q * eta * prod_{j=1}^{q} (I - eta H_j) b,    q ~ Uniform{0, ..., Q-1}   (q HVP calls)

    an unbiased estimator of the truncated series eta * sum_{q=0}^{Q-1} (I - eta H)^q b (Q terms, one fewer
    than the deterministic series with the same Q). ``scale_by_q=False`` drops the factor Q, as in AccBO's
    code. ``independent_rows=True`` draws one q per row of a batched right-hand side (e.g. per block); the
    products are then run up to the largest q and rows stop early by masking, so the HVP count is max(q).

    Both converge to H^{-1} b as Q grows when 0 < eta < 2 / lambda_max(H) (eta <= 1/L is the usual choice).

    Parameters
    ----------
    n_terms: Q, the number of HVPs of the deterministic series, the range of q for the random one.
    eta: the Neumann step size.
    random_truncation: use the randomly truncated estimator (needs a ``generator`` for reproducibility).
    scale_by_q: multiply the random-truncation estimate by Q (unbiased form); ignored otherwise.
    independent_rows: one truncation level per row of ``b`` instead of one for all rows.
    """

    n_terms: int = 10
    eta: float = 0.1
    random_truncation: bool = False
    scale_by_q: bool = True
    independent_rows: bool = False

    supports_warm_start: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_int("n_terms", self.n_terms, 1 if self.random_truncation else 0)
        _check_real("eta", self.eta, 0.0, None, low_open=True)

    def solve(
        self,
        hvp: HVPSource,
        b: Tensor,
        *,
        v0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LinearSolveResult:
        """Approximate H^{-1} b. ``v0`` is ignored (a Neumann series has no warm start)."""
        if self.random_truncation:
            return self._solve_random(hvp, b, generator)
        p = b
        acc = b
        for j in range(self.n_terms):
            p = p - self.eta * _hvp_at(hvp, j)(p)
            acc = acc + p
        return LinearSolveResult(self.eta * acc, self.n_terms)

    def draw_truncation(
        self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        """Truncation levels q ~ Uniform{0, ..., Q-1} of the given shape (on the generator's device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.n_terms, tuple(shape), generator=generator, device=device)

    def _solve_random(
        self, hvp: HVPSource, b: Tensor, generator: torch.Generator | None
    ) -> LinearSolveResult:
        scale = self.eta * (self.n_terms if self.scale_by_q else 1)
        if not self.independent_rows:
            q = int(self.draw_truncation((), generator))
            p = b
            for j in range(q):
                p = p - self.eta * _hvp_at(hvp, j)(p)
            return LinearSolveResult(scale * p, q)
        qs = self.draw_truncation(b.shape[:-1], generator).to(b.device)
        n_calls = int(qs.max()) if qs.numel() > 0 else 0
        p = b
        for j in range(n_calls):
            active = (qs > j).unsqueeze(-1)
            p = torch.where(active, p - self.eta * _hvp_at(hvp, j)(p), p)
        return LinearSolveResult(scale * p, n_calls)

    def truncated_series(self, hvp: HVP, b: Tensor, n_terms: int | None = None) -> Tensor:
        """eta * sum_{q<K} (I - eta H)^q b, K = ``n_terms`` (default Q): the mean of the random estimator."""
        k = self.n_terms if n_terms is None else n_terms
        _check_int("n_terms", k, 1)
        p = b
        acc = b
        for _ in range(k - 1):
            p = p - self.eta * hvp(p)
            acc = acc + p
        return self.eta * acc


# ----------------------------------------------------------------------------------------------------------
# SGD on the quadratic


@dataclass(frozen=True)
class SGDQuadratic:
    """(Stochastic) gradient descent on the quadratic q(v) = 1/2 v^T (H + ridge I) v - b^T v.

    Update, k = 0..n_steps-1, started from ``v0`` (warm start) or zero::

        d_k     = lr * (H_k v_k + ridge * v_k - b)
        d_k     = d_k * min(1, clip / ||d_k||)        (only if clip is set; BLISS clips each step to norm 1)
        v_{k+1} = Proj_{||v|| <= radius}(v_k - d_k)   (only if radius is set; BO-REP / BSVRB_v2 ball)

    One step from the previous v is the v-update of SOBA (Dagreou et al., NeurIPS 2022), MA-SOBA, SLIP, BO-REP
    and BSVRB_v2; n_steps warm-started steps are AID-BiO's Q-loop (Ji, Liu, Liang & Ying, NeurIPS 2022) and
    AmIGO (Arbel & Mairal, ICLR 2022); ridge and clip give BLISS's z-loop. With a fixed H it converges to
    (H + ridge I)^{-1} b for 0 < lr < 2 / lambda_max(H + ridge I). Norms are row-wise over the last dimension.
    """

    n_steps: int = 1
    lr: float = 0.1
    radius: float | None = None
    ridge: float = 0.0
    clip: float | None = None

    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_int("n_steps", self.n_steps, 0)
        _check_real("lr", self.lr, 0.0, None, low_open=True)
        if self.radius is not None:
            _check_real("radius", self.radius, 0.0, None, low_open=True)
        _check_real("ridge", self.ridge, 0.0, None)
        if self.clip is not None:
            _check_real("clip", self.clip, 0.0, None, low_open=True)

    def solve(
        self,
        hvp: HVPSource,
        b: Tensor,
        *,
        v0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LinearSolveResult:
        """Run ``n_steps`` steps from ``v0`` (zeros if None); ``generator`` is unused."""
        _check_v0(v0, b)
        v = torch.zeros_like(b) if v0 is None else v0
        for k in range(self.n_steps):
            grad = _hvp_at(hvp, k)(v) - b
            if self.ridge:
                grad = grad + self.ridge * v
            step = self.lr * grad
            if self.clip is not None:
                step = step * _shrink_factor(step, self.clip)
            v = v - step
            if self.radius is not None:
                v = v * _shrink_factor(v, self.radius)
        return LinearSolveResult(v, self.n_steps)


def _shrink_factor(v: Tensor, radius: float) -> Tensor:
    """min(1, radius / ||v||) row-wise (1 where v = 0), shape (..., 1)."""
    norm = _row_norm(v)
    return torch.where(
        norm > radius, radius / norm.clamp_min(torch.finfo(v.dtype).tiny), torch.ones_like(norm)
    )


# ----------------------------------------------------------------------------------------------------------
# conjugate gradient


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient (Hestenes & Stiefel 1952) for symmetric positive definite H; AID-CG of HyperTorch
    (Grazzi et al., ICML 2020) and of the loops paper (Ji, Liu, Liang & Ying, NeurIPS 2022).

    From v_0 (zero or warm start), r_0 = b - H v_0, p_0 = r_0; for k = 0..max_iter-1::

        alpha_k = r_k^T r_k / p_k^T H p_k
        v_{k+1} = v_k + alpha_k p_k,     r_{k+1} = r_k - alpha_k H p_k
        beta_k  = r_{k+1}^T r_{k+1} / r_k^T r_k,     p_{k+1} = r_{k+1} + beta_k p_k

    Row-wise on (..., d). A row stops moving once ||r|| <= max(rtol * ||b||, atol) or if p^T H p <= 0
    (breakdown, H not positive definite along p); the loop ends when every row has stopped. Already-solved
    systems (b = 0, or an exact warm start) return at once without any division by zero. ``n_hvp`` counts the
    calls actually made (one extra call for the initial residual of a warm start).
    """

    max_iter: int = 10
    rtol: float = 1e-10
    atol: float = 0.0

    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_int("max_iter", self.max_iter, 0)
        _check_real("rtol", self.rtol, 0.0, None)
        _check_real("atol", self.atol, 0.0, None)

    def solve(
        self,
        hvp: HVPSource,
        b: Tensor,
        *,
        v0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LinearSolveResult:
        """Run at most ``max_iter`` CG iterations; ``generator`` is unused."""
        matvec = _single_hvp(hvp, "ConjugateGradient")
        _check_v0(v0, b)
        n_calls = 0
        if v0 is None:
            v = torch.zeros_like(b)
            r = b
        else:
            v = v0
            r = b - matvec(v0)
            n_calls += 1
        threshold = torch.clamp(self.rtol * _row_norm(b), min=self.atol)
        p = r
        rs = _row_dot(r, r)
        active = _row_norm(r) > threshold
        for _ in range(self.max_iter):
            if not bool(active.any()):
                break
            hp = matvec(p)
            n_calls += 1
            php = _row_dot(p, hp)
            active = active & (php > 0)
            alpha = torch.where(
                active, rs / torch.where(active, php, torch.ones_like(php)), torch.zeros_like(php)
            )
            v = v + alpha * p
            r = r - alpha * hp
            rs_new = _row_dot(r, r)
            active = active & (_row_norm(r) > threshold)
            beta = torch.where(
                active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.zeros_like(rs)
            )
            p = r + beta * p
            rs = rs_new
        return LinearSolveResult(v, n_calls)


# ----------------------------------------------------------------------------------------------------------
# fixed point iteration


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point iteration (AID-FP; Grazzi et al., ICML 2020, HyperTorch ``fixed_point``; Ji et al. 2022).

    With the lower-level map Phi(y) = y - lr * grad_y g, the system reads v = (dPhi/dy)^T v + lr * b, i.e.::

        v_{k+1} = (I - lr H) v_k + lr * b  =  v_k - lr (H v_k - b)

    started from v0 (zero by default), stopped after ``max_iter`` iterations or once every row moves by at
    most ``tol`` (||v_{k+1} - v_k|| <= tol). HyperTorch iterates w_{k+1} = (I - lr H) w_k + b and multiplies
    the cross term by lr; its w equals our v / lr. Deterministic counterpart of :class:`SGDQuadratic` (same
    update, one fixed H, a stopping test instead of a ball and ridge). Converges for
    0 < lr < 2 / lambda_max(H).
    """

    max_iter: int = 10
    lr: float = 0.1
    tol: float = 0.0

    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_int("max_iter", self.max_iter, 0)
        _check_real("lr", self.lr, 0.0, None, low_open=True)
        _check_real("tol", self.tol, 0.0, None)

    def solve(
        self,
        hvp: HVPSource,
        b: Tensor,
        *,
        v0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LinearSolveResult:
        """Iterate at most ``max_iter`` times; ``generator`` is unused."""
        matvec = _single_hvp(hvp, "FixedPoint")
        _check_v0(v0, b)
        v = torch.zeros_like(b) if v0 is None else v0
        n_calls = 0
        for _ in range(self.max_iter):
            step = self.lr * (matvec(v) - b)
            n_calls += 1
            v = v - step
            if bool((_row_norm(step) <= self.tol).all()):
                break
        return LinearSolveResult(v, n_calls)


# ----------------------------------------------------------------------------------------------------------
# explicit matrices


def eigen_floor(H: Tensor, floor: float) -> Tensor:
    """Projection of a (batched) square matrix onto {H symmetric, H >= floor I} in Frobenius norm.

    H <- U max(Lambda, floor) U^T of the symmetrised matrix (H + H^T)/2. This is the PSD safeguard the theory
    of BSVRB_v1 / RSVRB needs for tracked Hessian estimates (instead of the reference code's Frobenius
    rescaling).
    """
    _check_real("floor", floor, None, None)
    if H.ndim < 2 or H.shape[-1] != H.shape[-2]:
        raise ValueError(f"H must have shape (..., d, d), got {tuple(H.shape)}")
    return projections.eigenvalue_floor(H, floor)


def explicit_solve(H: Tensor, b: Tensor, floor: float | None = None, *, cholesky: bool = False) -> Tensor:
    """Solve H v = b with an explicit (batched) matrix H of shape (..., d, d) and b of shape (..., d).

    - ``floor=None, cholesky=False``: LU solve, ``torch.linalg.solve`` (any invertible H).
    - ``floor=None, cholesky=True``: Cholesky solve of H (must be symmetric positive definite; only its lower
      triangle is read); raises ``ValueError`` if the factorisation fails.
    - ``floor=mu > 0``: H is symmetrised and its eigenvalues floored at mu (see :func:`eigen_floor`); the
      solve then reuses the eigendecomposition, v = U diag(1 / max(Lambda, mu)) U^T b.

    No explicit inverse is ever formed.
    """
    if H.ndim < 2 or H.shape[-1] != H.shape[-2]:
        raise ValueError(f"H must have shape (..., d, d), got {tuple(H.shape)}")
    if b.shape[-1:] != H.shape[-1:]:
        raise ValueError(f"b must have shape (..., {H.shape[-1]}), got {tuple(b.shape)}")
    if floor is not None:
        _check_real("floor", floor, 0.0, None, low_open=True)
        return projections.eig_solve(*projections.floored_eigh(H, floor), b)
    if cholesky:
        factor, info = torch.linalg.cholesky_ex(H)
        if bool((info != 0).any()):
            raise ValueError("explicit_solve(cholesky=True): H is not positive definite; use floor=mu > 0")
        return projections.cholesky_solve(factor, b)
    return torch.linalg.solve(H, b.unsqueeze(-1)).squeeze(-1)
