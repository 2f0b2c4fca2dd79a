"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017), as configured in the NDCG experiments.

The backbone of SONG/K-SONG (Qiu et al., ICML 2022) and BSVRB (Hu et al., ICML 2023) through ReChorus /
LibAUC (``shared/specs/ndcg.md`` section 2):

    h(u, i) = w^T [ p_u ⊙ q_i ;  MLP([p'_u ; q'_i]) ],   MLP(z) = dropout(ReLU(W z + b)),

with separate 64-d GMF embeddings ``p, q`` and MLP embeddings ``p', q'``, one MLP layer 128 -> 64, dropout
0.2 inside the MLP only (as LibAUC, ReChorus, the NDCG-Optimization code and ``ndcg.md``), a bias-free linear
head ``w`` of size 128, and every weight (embeddings, ``W``, ``b``, ``w``) drawn from N(0, 0.01^2) (ReChorus
``init_weights``: std 0.01).

``output_dropout > 0`` adds a dropout on the concatenated vector before the head. It is *not* in the reference
models; earlier mbbo versions had it on by default (0.2) and wrongly attributed it to them. On ML-100K it cost
2.2x the training time per epoch for about 0.003 NDCG@10. It stays available as a named option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["NeuMF"]


class NeuMF(nn.Module):
    """NeuMF scorer with ``score(users, items)`` and a fast ``score_all_items(users)``.

    Args:
        n_users, n_items: table sizes.
        emb_size: embedding size of both branches (64).
        layers: MLP hidden sizes (``(64,)``: one layer 128 -> 64).
        dropout: dropout after each MLP layer (0.2).
        output_dropout: dropout on the concatenated vector before the head (0: the reference architecture;
            see the module docstring).
        init_std: standard deviation of the normal initialisation (0.01).
        generator: random stream for the initialisation (default: the global one).
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        emb_size: int = 64,
        layers: Sequence[int] = (64,),
        dropout: float = 0.2,
        output_dropout: float = 0.0,
        init_std: float = 0.01,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_users < 1 or n_items < 1 or emb_size < 1 or any(s < 1 for s in layers):
            raise ValueError(
                f"sizes must be positive: n_users={n_users}, n_items={n_items}, "
                f"emb_size={emb_size}, layers={tuple(layers)}"
            )
        if not 0.0 <= dropout < 1.0 or not 0.0 <= output_dropout < 1.0:
            raise ValueError(f"dropout={dropout} and output_dropout={output_dropout} must be in [0, 1)")
        self.n_users, self.n_items, self.emb_size = n_users, n_items, emb_size
        self.init_std = init_std
        self.mf_u = nn.Embedding(n_users, emb_size)
        self.mf_i = nn.Embedding(n_items, emb_size)
        self.mlp_u = nn.Embedding(n_users, emb_size)
        self.mlp_i = nn.Embedding(n_items, emb_size)
        if not layers:
            raise ValueError("layers must have at least one hidden size")
        mlp: list[nn.Module] = []
        pre = 2 * emb_size
        for size in layers:
            mlp += [nn.Linear(pre, size), nn.ReLU(), nn.Dropout(dropout)]
            pre = size
        self.mlp = nn.Sequential(*mlp)
        self.out_dropout = nn.Dropout(output_dropout)
        self.prediction = nn.Linear(pre + emb_size, 1, bias=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every weight and bias ~ N(0, init_std^2) (ReChorus/LibAUC ``init_weights``)."""
        for p in self.parameters():
            p.normal_(0.0, self.init_std, generator=generator)

    @torch.no_grad()
    def reset_head(self, generator: torch.Generator | None = None, init: Literal["torch", "normal"] = "torch") -> None:
        """Re-initialise the output layer only (the step between warm-up and the ranking losses).

        ``init="torch"`` is ``nn.Linear.reset_parameters`` as in the reference (``--init_last 1``): uniform on
        ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``; ``init="normal"`` redraws N(0, init_std^2).
        """
        w = self.prediction.weight
        if init == "torch":
            bound = 1.0 / w.shape[1] ** 0.5
            w.uniform_(-bound, bound, generator=generator)
        elif init == "normal":
            w.normal_(0.0, self.init_std, generator=generator)
        else:
            raise ValueError(f"init={init!r} must be 'torch' or 'normal'")

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores ``h(users, items)``; ``users`` broadcasts against ``items`` after right-padding its shape
        (e.g. users ``(B,)`` with items ``(B, L)`` gives ``(B, L)``)."""
        users = users.reshape(users.shape + (1,) * (items.ndim - users.ndim))
        # W [p'_u; q'_i] + b = W_u p'_u + (W_i q'_i + b): user terms once per user, then broadcast
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]
        e = self.emb_size
        pre = self.mlp_u(users) @ first.weight[:, :e].T + (self.mlp_i(items) @ first.weight[:, e:].T + first.bias)
        mlp = self.mlp[1:](pre)
        mf = self.mf_u(users) * self.mf_i(items)
        if self.training and self.out_dropout.p > 0:
            return self.prediction(self.out_dropout(torch.cat([mf, mlp], dim=-1))).squeeze(-1)
        w = self.prediction.weight.squeeze(0)
        return mf @ w[:e] + mlp @ w[e:]

    forward = score

    def score_all_items(self, users: Tensor, max_elements: int = 1 << 24) -> Tensor:
        """Scores of every item for each user, ``(len(users), n_items)``, without building the pair batch.

        The first MLP layer is split as ``W [p'_u; q'_i] + b = W_u p'_u + (W_i q'_i + b)``, so both halves are
        computed once per user / item and combined by broadcasting; the GMF part is ``(p_u ⊙ w_mf) q_i^T``.
        Items are processed in blocks so that the ``(U, block, hidden)`` tensor stays below ``max_elements``.
        Equal to ``score(users, arange(n_items))`` (in eval mode; in training mode the dropout masks differ).
        """
        w = self.prediction.weight.squeeze(0)
        w_mf, w_mlp = w[: self.emb_size], w[self.emb_size :]
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]
        rest = self.mlp[1:]
        pu = self.mlp_u(users) @ first.weight[:, : self.emb_size].T  # (U, H)
        qi = self.mlp_i.weight @ first.weight[:, self.emb_size :].T + first.bias  # (N, H)
        gmf_u = self.mf_u(users)  # (U, E)
        u_count, hidden = pu.shape[0], pu.shape[1]
        block = max(1, max_elements // max(1, u_count * hidden))
        outs = []
        for lo in range(0, self.n_items, block):
            h = rest(pu[:, None, :] + qi[None, lo : lo + block, :])  # (U, b, H_last)
            qi_mf = self.mf_i.weight[lo : lo + block]
            if self.training and self.out_dropout.p > 0:  # dropout acts per (user, item) pair
                mf = gmf_u[:, None, :] * qi_mf[None, :, :]
                outs.append(self.out_dropout(torch.cat([mf, h], dim=-1)) @ w)
            else:
                outs.append((gmf_u * w_mf) @ qi_mf.T + h @ w_mlp)
        return torch.cat(outs, dim=1)
