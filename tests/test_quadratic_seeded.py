"""The large-m quadratic: seeded per-block coefficients equal a dense instance; memory O(1) per block."""

from __future__ import annotations

import pytest
import torch

from mbbo.algorithms.registry import make_algorithm
from mbbo.tasks.quadratic import MultiBlockQuadratic
from mbbo.tasks.quadratic_seeded import SeededBlockData, SeededQuadratic, hashed_normal, hashed_uniform
from mbbo.tasks.registry import get_task


@pytest.fixture(scope="module")
def seeded() -> SeededQuadratic:
    return SeededQuadratic(6, 3, 4, seed=5, mu=0.5, L=2.0)


def _dense(q: SeededQuadratic) -> MultiBlockQuadratic:
    return MultiBlockQuadratic(**q.dense_coefficients(torch.arange(q.num_blocks)))


def test_hashed_streams_depend_only_on_seed_block_and_entry() -> None:
    u = hashed_uniform(1, 2, torch.arange(5), 7, torch.float64)
    assert torch.equal(hashed_uniform(1, 2, torch.tensor([3, 1]), 7, torch.float64), u[[3, 1]])
    assert not torch.equal(hashed_uniform(2, 2, torch.arange(5), 7, torch.float64), u)
    assert bool(((u > 0) & (u < 1)).all())
    z = hashed_normal(0, 1, torch.arange(20_000), 10, torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01


def test_block_metrics_equal_the_dense_closed_forms(seeded: SeededQuadratic) -> None:
    dense = _dense(seeded)
    eig = torch.linalg.eigvalsh(dense.A)
    assert float(eig.min()) >= 0.5 - 1e-12 and float(eig.max()) <= 2.0 + 1e-12
    x = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    blocks = torch.tensor([4, 0, 2])
    grad, value, y = seeded.block_metrics(x, blocks)
    d_grad, d_value, d_y = dense.block_metrics(x, blocks)
    torch.testing.assert_close(grad, d_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value, d_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, d_y, rtol=1e-12, atol=1e-12)
    assert float(dense.block_objectives(x).mean()) == pytest.approx(float(dense.objective(x)))


def test_seeded_problem_follows_the_dense_trajectory(seeded: SeededQuadratic) -> None:
    runs = []
    for q in (seeded, _dense(seeded)):
        alg = make_algorithm("bsvrb_v2", q.problem(noise=0.1, batch_size=2), block_batch=2, seed=3, lr=0.05)
        for _ in range(20):
            alg.step()
        runs.append((alg.x, alg.lower_variables()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-10, atol=1e-12)


def test_large_m_seeded_task_stores_no_coefficients() -> None:
    spec = get_task("quadratic")
    settings = spec.make_settings({"num_blocks": 50_000, "dim_x": 4, "dim_y": 3, "form": "seeded",
                                   "eval_blocks": 200})
    problem, evaluator = spec.build(settings, block_batch=10)
    assert all(isinstance(v, SeededBlockData) for v in problem.block_data.values())
    assert problem.block_data["C"].shape == (50_000, 4, 3)
    alg = make_algorithm("bsvrb_v2", problem, seed=0, lr=0.05)
    for _ in range(5):
        alg.step()
    metrics = evaluator.evaluate(alg)
    blocks = evaluator.task.blocks
    assert blocks is not None and blocks.shape == (200,)
    _, value, y_star = problem.block_data["C"].quadratic.block_metrics(alg.x, blocks)
    assert metrics["objective"] == pytest.approx(float(value.mean()), rel=1e-12)
    errors = torch.linalg.vector_norm(alg.lower_variables()[blocks] - y_star, dim=-1)
    assert metrics["lower_error"] == pytest.approx(float(errors.mean()), rel=1e-12)
    assert metrics["lower_error_sem"] == pytest.approx(float(errors.std()) / 200**0.5 * (1 - 200 / 50_000)**0.5)
    with pytest.raises(ValueError, match="form must be 'dense' or 'seeded', got 'sparse'"):
        spec.make_settings({"form": "sparse"}).validate()
