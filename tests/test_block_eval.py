"""Bounded-memory per-block evaluation: chunks equal the one-shot formula, seeded subsets with standard errors."""

from __future__ import annotations

import math

import pytest
import torch

from mbbo.algorithms.registry import make_algorithm
from mbbo.blocks import BlockSampler
from mbbo.tasks import block_eval
from mbbo.tasks.block_eval import block_chunks, evaluation_blocks, lower_rows, mean_and_sem, rows_per_chunk
from mbbo.tasks.hyperparam import HyperparamSettings, HyperparamTask, robust_logistic


def _task(num_blocks: int, eval_blocks: int | str | None = None) -> HyperparamTask:
    gen = torch.Generator().manual_seed(0)

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.cat([torch.ones(n, 1), torch.randn(n, 3, generator=gen)], dim=1).double()
        return X, torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()

    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = rows(40), rows(30), rows(20)
    temps = (1.0 + 10.0 * torch.rand(num_blocks, generator=gen)).double()
    settings = HyperparamSettings(num_blocks=num_blocks, batch_size=4, eval_blocks=eval_blocks)
    return HyperparamTask(X_tr, y_tr, X_val, y_val, X_te, y_te, temps, settings)


def test_block_losses_in_row_chunks_equal_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(7)
    W = torch.randn(7, 4, dtype=torch.float64)
    expected = robust_logistic(task.y_val[:, None] * (task.X_val @ W.T), task.temperatures).mean(0)
    monkeypatch.setattr(block_eval, "EVAL_BUDGET_BYTES", 7 * 8 * 4 * 3)  # 3 rows per chunk
    assert rows_per_chunk(7, 8) == 3
    torch.testing.assert_close(task.block_losses(W, task.X_val, task.y_val), expected, rtol=1e-14, atol=0)


def test_evaluate_all_blocks_in_block_chunks_equals_whole_table() -> None:
    task = _task(9)
    alg = make_algorithm("bsvrb_v2", task.problem(), block_batch=3, seed=0)
    for _ in range(4):
        alg.step()
    task.EVAL_CHUNK_BLOCKS = 4  # three chunks of blocks
    out = task.evaluate(alg)
    W = alg.lower_variables()
    val = task.block_losses(W, task.X_val, task.y_val)
    assert out["val_loss"] == pytest.approx(float(val.mean()), rel=1e-13)
    assert out["best_block"] == int(val.argmin())
    assert out["val_loss_sem"] == 0.0 and out["test_loss_sem"] == 0.0


def test_eval_blocks_subset_reports_standard_error() -> None:
    task = _task(50, eval_blocks=10)
    alg = make_algorithm("bsvrb_v2", task.problem(), block_batch=5, seed=0)
    subset = task.evaluated_blocks()
    assert subset is not None and subset.shape == (10,) and len(set(subset.tolist())) == 10
    out = task.evaluate(alg)
    val = task.block_losses(alg.lower_variables()[subset], task.X_val, task.y_val, task.temperatures[subset])
    assert out["val_loss"] == pytest.approx(float(val.mean()), rel=1e-13)
    expected_sem = float(val.std()) / math.sqrt(10) * math.sqrt(1 - 10 / 50)
    assert out["val_loss_sem"] == pytest.approx(expected_sem, rel=1e-12)
    assert int(subset[int(val.argmin())]) == out["best_block"]


def test_evaluation_blocks_seeded_and_auto() -> None:
    a = evaluation_blocks(100, 10, seed=3)
    assert a is not None and torch.equal(a, evaluation_blocks(100, 10, seed=3))
    assert not torch.equal(a, evaluation_blocks(100, 10, seed=4))
    assert evaluation_blocks(100, None, seed=0) is None
    assert evaluation_blocks(100, 500, seed=0) is None
    assert evaluation_blocks(block_eval.AUTO_EVAL_BLOCKS, "auto", seed=0) is None
    auto = evaluation_blocks(5 * block_eval.AUTO_EVAL_BLOCKS, "auto", seed=0)
    assert auto is not None and auto.shape == (block_eval.AUTO_EVAL_BLOCKS,)
    with pytest.raises(ValueError, match=r"eval_blocks must be None .* got 0"):
        evaluation_blocks(10, 0, seed=0)


def test_mean_and_sem_and_chunks() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, sem = mean_and_sem(values, 4)
    assert (mean, sem) == (3.0, 0.0)
    _, sem = mean_and_sem(values, 8)
    assert sem == pytest.approx(float(values.std()) / 2 * math.sqrt(0.5))
    assert math.isnan(mean_and_sem(values[:1], 8)[1])
    assert [c.tolist() for c in block_chunks(None, 5, 2)] == [[0, 1], [2, 3], [4]]
    assert [c.tolist() for c in block_chunks(torch.tensor([7, 9, 11]), 20, 2)] == [[7, 9], [11]]


def test_lower_rows_falls_back_to_the_whole_table() -> None:
    class Whole:
        def lower_variables(self) -> torch.Tensor:
            return torch.arange(6.0).reshape(3, 2)

    assert lower_rows(Whole(), torch.tensor([2])).tolist() == [[4.0, 5.0]]


def test_ndcg_eval_users_subset_reports_standard_error(shared_data) -> None:
    from mbbo.ranking.metrics import evaluate_ndcg
    from mbbo.tasks.ndcg import NDCGSettings, NDCGTask, load_split

    settings = NDCGSettings(data_path=str(shared_data / "movielens" / "ml-100k" / "u.data"), eval_users=100,
                            eval_test=False, ks=(10,))
    split = load_split(settings)
    weights = torch.linspace(0.0, 1.0, split.n_items)

    def scorer(users: torch.Tensor) -> torch.Tensor:
        return weights.expand(len(users), -1)

    out = NDCGTask(split, settings).evaluate(scorer)
    users = evaluation_blocks(split.dev.n_users, 100, settings.seed)
    direct = evaluate_ndcg(scorer, split.dev, (split.train,), (10,), users=users, with_std=True)
    assert out["dev_ndcg@10"] == pytest.approx(direct["ndcg@10"], rel=1e-12)
    n = direct["users"]
    assert out["dev_ndcg@10_sem"] == pytest.approx(direct["ndcg@10_std"] / math.sqrt(n) * math.sqrt(1 - n / 943))
    every = NDCGTask(split, NDCGSettings(data_path=settings.data_path, eval_test=False, ks=(10,))).evaluate(scorer)
    assert "dev_ndcg@10_sem" not in every
    per_user = [evaluate_ndcg(scorer, split.dev, (split.train,), (10,), users=u.view(1))["ndcg@10"] for u in users]
    assert direct["ndcg@10_std"] == pytest.approx(float(torch.tensor(per_user).std()), rel=1e-9)


def test_evaluated_blocks_are_not_those_a_reshuffling_sampler_visits_first() -> None:
    """The subset's stream differs from the algorithms' block stream: with the same seed, the first K blocks of
    a reshuffled permutation are not the evaluated ones (they were, before the subset had a stream of its own)."""
    m, k, seed = 10_000, 100, 0
    subset = evaluation_blocks(m, k, seed=seed)
    assert subset is not None
    sampler = BlockSampler(m, 10, mode="reshuffle")
    blocks_stream = torch.Generator().manual_seed(seed * 1_000_003 + 0)  # BilevelAlgorithm's "blocks" stream
    first = torch.cat([sampler.sample(blocks_stream, torch.device("cpu")) for _ in range(k // 10)])
    overlap = len(set(first.tolist()) & set(subset.tolist()))
    assert overlap < k // 2, overlap  # about k^2 / m = 1 expected for independent draws
