"""Learning to rank for top-K NDCG: data sampling, NeuMF, all-ranking NDCG evaluation and warm-up.

The data side (loaders, split, CSR storage) lives in :mod:`mbbo.data.movielens`; the CSR and split types are
re-exported here.
"""

from mbbo.data.movielens import RankingSplit, UserItemCSR, gains
from mbbo.ranking.metrics import evaluate_ndcg, evaluate_split, ideal_dcg, ndcg_at_ks
from mbbo.ranking.neumf import NeuMF
from mbbo.ranking.sampler import ListBatch, ListwiseSampler
from mbbo.ranking.warmup import ListwiseCELoss, WarmupResult, warmup

__all__ = [
    "ListBatch",
    "ListwiseCELoss",
    "ListwiseSampler",
    "NeuMF",
    "RankingSplit",
    "UserItemCSR",
    "WarmupResult",
    "evaluate_ndcg",
    "evaluate_split",
    "gains",
    "ideal_dcg",
    "ndcg_at_ks",
    "warmup",
]
