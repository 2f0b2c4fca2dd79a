"""SAGA tables, SARAH/SPIDER estimators and finite-sum rows, checked against their definitions on toy sums.

`benchopt_problem` (the benchopt quadratic as an m = 1 finite-sum `MultiBlockProblem`) is shared with the zoo
tests of SOBA/SABA/SRBA/MRBO/VRBO/SUSTAIN.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mbbo.problem import FullBatch, MultiBlockProblem, NoiseSampler, RowSampler
from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic, inner_loss, make_benchopt_quadratic, outer_loss
from mbbo.variance_reduction import (
    SARAH,
    EpochCycler,
    FiniteSumRows,
    SAGATable,
    benchopt_period,
    distinct_rows,
    weighted_sum,
)

DT = torch.float64


def benchopt_problem(n_inner: int = 128, n_outer: int = 64, d_in: int = 20, d_out: int = 5, batch_size: int = 16,
                     seed: int = 1, mu: float = 0.5, full_batch: bool = False
                     ) -> tuple[BenchoptQuadratic, MultiBlockProblem]:
    """The benchopt `simulated` quadratic (float64) with RowSampler (or FullBatch) samplers over its rows.

    Defaults (n_inner 128, n_outer 64, d_in 20, d_out 5, mu 0.5, seed 1): the inner Hessian's spectrum is in
    [0.24, 1.40], the value function's in [0.23, 1.63], ||grad h(x0)||^2 = 22.46.
    """
    q = make_benchopt_quadratic(n_inner, n_outer, d_in, d_out, mu=mu, random_state=seed)
    if full_batch:
        lower, upper = FullBatch(q.inner_batch()), FullBatch(q.outer_batch())
    else:
        lower, upper = RowSampler(q.inner_batch(), batch_size), RowSampler(q.outer_batch(), batch_size)
    pb = MultiBlockProblem(lambda x, y, b, k: outer_loss(x, y, b), lambda x, y, b, k: inner_loss(x, y, b),
                           q.x0(), q.y0().unsqueeze(0), lower, upper, name="benchopt_quadratic")
    return q, pb


# --- a toy finite sum: q_i(w) = A_i w + c_i, Q(w) = sum_i weights_i q_i(w) --------------------------------


class ToySum:
    def __init__(self, n: int = 6, d: int = 3, seed: int = 0, same_matrix: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(n, d, d, generator=g, dtype=DT)
        if same_matrix:
            self.A = self.A[:1].expand(n, d, d).clone()
        self.c = torch.randn(n, d, generator=g, dtype=DT)
        self.n, self.d = n, d

    def q(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kij,j->ki", self.A[idx], w) + self.c[idx]

    def full(self, w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.einsum("k,ki->i", weights, self.q(w, torch.arange(self.n)))


def _filled_table(toy: ToySum, weights: torch.Tensor, seed: int = 1) -> SAGATable:
    """A table whose slots hold values from several different, stale points."""
    table = SAGATable(weights, (toy.d,))
    g = torch.Generator().manual_seed(seed)
    for i in range(toy.n):
        w_old = torch.randn(toy.d, generator=g, dtype=DT)
        table.store(torch.tensor([i]), toy.q(w_old, torch.tensor([i])))
    return table


def _copy(table: SAGATable) -> SAGATable:
    new = SAGATable(table.weights, table.shape)
    new.load_state_dict(table.state_dict())
    return new


def test_saga_one_slot_per_draw_is_unbiased_with_unequal_weights() -> None:
    """Slots of unequal weights (fixed mini-batches of sizes 3, 3, 3, 1 of 10 rows), one drawn uniformly:
    the expectation of the direction over the K draws is the full sum, whatever stale values the memory holds."""
    toy = ToySum(n=4)
    weights = torch.tensor([0.3, 0.3, 0.3, 0.1], dtype=DT)
    base = _filled_table(toy, weights)
    w = torch.randn(toy.d, generator=torch.Generator().manual_seed(5), dtype=DT)
    directions = []
    for k in range(toy.n):
        table = _copy(base)
        directions.append(table.update(torch.tensor([k]), toy.q(w, torch.tensor([k])), inclusion=1.0 / toy.n))
    mean = torch.stack(directions).mean(0)
    torch.testing.assert_close(mean, toy.full(w, weights), rtol=1e-12, atol=1e-12)
    # a single draw is not the full sum (the memory is stale): the test can fail
    assert not torch.allclose(directions[0], toy.full(w, weights), atol=1e-3)


def test_saga_per_sample_minibatch_is_unbiased() -> None:
    """b = 2 distinct samples out of n = 6 (all 15 pairs equally likely), inclusion b/n = 1/3."""
    toy = ToySum(n=6)
    weights = torch.full((6,), 1 / 6, dtype=DT)
    base = _filled_table(toy, weights)
    w = torch.randn(toy.d, generator=torch.Generator().manual_seed(7), dtype=DT)
    directions = []
    for pair in itertools.combinations(range(6), 2):
        idx = torch.tensor(pair)
        directions.append(_copy(base).update(idx, toy.q(w, idx), inclusion=2 / 6))
    torch.testing.assert_close(torch.stack(directions).mean(0), toy.full(w, weights), rtol=1e-12, atol=1e-12)


def test_saga_with_fresh_memory_is_the_full_sum_and_keeps_its_average() -> None:
    toy = ToySum(n=5)
    table = SAGATable.uniform(5, (toy.d,), dtype=DT)
    w = torch.randn(toy.d, generator=torch.Generator().manual_seed(3), dtype=DT)
    table.store(torch.arange(5), toy.q(w, torch.arange(5)))  # every slot fresh at w
    for idx in (torch.tensor([2]), torch.tensor([0, 4])):
        d = _copy(table).update(idx, toy.q(w, idx), inclusion=idx.numel() / 5)
        torch.testing.assert_close(d, toy.full(w, table.weights), rtol=1e-12, atol=1e-12)
    # the incremental average stays equal to the weighted table along a run of updates
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        idx = distinct_rows(5, 2, g)
        table.update(idx, toy.q(torch.randn(toy.d, generator=g, dtype=DT), idx), inclusion=0.4)
    torch.testing.assert_close(table.average, table.recompute_average(), rtol=1e-12, atol=1e-12)


def test_saga_matches_benchopt_rule_for_equal_batches() -> None:
    """Equal weights 1/K and inclusion 1/K: d = new - mem[k] + avg, avg += (new - mem[k]) / K (benchopt)."""
    toy = ToySum(n=4)
    table = _filled_table(toy, torch.full((4,), 0.25, dtype=DT))
    mem, avg = table.table.clone(), table.average.clone()
    new = toy.q(torch.ones(toy.d, dtype=DT), torch.tensor([1]))
    d = table.update(torch.tensor([1]), new, inclusion=0.25)
    torch.testing.assert_close(d, new[0] - mem[1] + avg)
    torch.testing.assert_close(table.average, avg + 0.25 * (new[0] - mem[1]))
    torch.testing.assert_close(table.table[1], new[0])


def test_saga_rejects_bad_input() -> None:
    table = SAGATable.uniform(4, (3,))
    with pytest.raises(ValueError, match="distinct"):
        table.update(torch.tensor([1, 1]), torch.zeros(2, 3, dtype=DT), inclusion=0.5)
    with pytest.raises(ValueError, match="shape"):
        table.update(torch.tensor([1]), torch.zeros(1, 4, dtype=DT), inclusion=0.5)
    with pytest.raises(ValueError, match="inclusion"):
        table.update(torch.tensor([1]), torch.zeros(1, 3, dtype=DT), inclusion=0.0)
    with pytest.raises(ValueError, match="num_slots"):
        SAGATable.uniform(0, (3,))


def test_sarah_follows_its_recursion_and_refreshing_every_step_is_the_full_gradient() -> None:
    toy = ToySum(n=5)
    weights = torch.full((5,), 0.2, dtype=DT)
    g = torch.Generator().manual_seed(11)
    ws = [torch.randn(toy.d, generator=g, dtype=DT) for _ in range(12)]
    for period in (1, 4):
        sarah = SARAH(period)
        d = None
        anchor, corrections = None, []
        for t, w in enumerate(ws):
            if sarah.refresh_due(t):
                d = toy.full(w, weights)
                anchor, corrections = d.clone(), []
            else:
                i = torch.randint(5, (1,), generator=g)
                new, old = toy.q(w, i)[0], toy.q(ws[t - 1], i)[0]
                d = sarah.update(d, new, old)
                corrections.append(new - old)
            # definition: d_t = Q(w_refresh) + sum of the one-sample differences since the refresh
            torch.testing.assert_close(d, anchor + sum(corrections, torch.zeros_like(anchor)))
            if period == 1:
                torch.testing.assert_close(d, toy.full(w, weights), rtol=1e-12, atol=1e-12)
        if period == 4:  # stochastic corrections: not the full gradient in general
            assert not torch.allclose(d, toy.full(ws[-1], weights), atol=1e-3)


def test_sarah_is_exact_when_the_samples_differ_by_constants() -> None:
    """q_i(w) = A w + c_i: q_i(w) - q_i(w') does not depend on i, so SARAH tracks Q(w_t) exactly."""
    toy = ToySum(n=5, same_matrix=True)
    weights = torch.full((5,), 0.2, dtype=DT)
    sarah, g = SARAH(100), torch.Generator().manual_seed(2)
    w_prev = torch.randn(toy.d, generator=g, dtype=DT)
    d = toy.full(w_prev, weights)
    for _ in range(10):
        w = torch.randn(toy.d, generator=g, dtype=DT)
        i = torch.randint(5, (1,), generator=g)
        d = sarah.update(d, toy.q(w, i)[0], toy.q(w_prev, i)[0])
        torch.testing.assert_close(d, toy.full(w, weights), rtol=1e-12, atol=1e-12)
        w_prev = w
    with pytest.raises(ValueError, match="period"):
        SARAH(0)


def test_benchopt_period() -> None:
    assert benchopt_period(32768, 1024, 0.5, 64) == 264
    assert benchopt_period(100, 100, 0.01, 64) == 1


# --- rows of a finite-sum problem -------------------------------------------------------------------------


def test_rows_full_pass_per_sample_and_partition_agree_with_the_losses() -> None:
    q, pb = benchopt_problem(n_inner=50, n_outer=30, d_in=6, d_out=3, batch_size=8)
    rows = FiniteSumRows(pb.lower_sampler)
    assert rows.n_rows == 50
    parts = rows.partition(16)
    assert [p.numel() for p in parts] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(parts), torch.arange(50))
    x = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=DT)
    y = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=DT)
    grad = torch.func.grad(lambda y_, b: inner_loss(x, y_, b))
    full = rows.full_pass(lambda b: grad(y, {k: v[0] for k, v in b.items()}), chunk_size=16)
    torch.testing.assert_close(full, q.inner_means.grad_y(x, y), rtol=1e-12, atol=1e-12)
    idx = torch.tensor([3, 7, 40])
    batch = rows.gather(idx)
    assert batch["u"].shape == (1, 3, 6) and torch.equal(batch["index"], idx.unsqueeze(0))
    per = rows.per_sample(idx)
    assert per["u"].shape == (3, 1, 6) and torch.equal(per["index"], idx.unsqueeze(1))
    per_grads = torch.stack([grad(y, {k: v[j] for k, v in per.items()}) for j in range(3)])
    torch.testing.assert_close(per_grads.mean(0), grad(y, {k: v[0] for k, v in batch.items()}))


def test_rows_accept_full_batch_and_per_block_data_and_reject_noise() -> None:
    data = {"a": torch.arange(10.0, dtype=DT).unsqueeze(1)}
    assert FiniteSumRows(FullBatch(data)).n_rows == 10
    per_block = RowSampler({"a": torch.arange(10.0, dtype=DT).reshape(1, 10, 1)}, 2, per_block=True)
    assert torch.equal(FiniteSumRows(per_block).gather(torch.tensor([4]))["a"], torch.tensor([[[4.0]]], dtype=DT))
    noise = NoiseSampler({"e": (3,)}, batch_size=2)
    assert "finite-sum" in FiniteSumRows.unsupported(noise)
    with pytest.raises(ValueError, match="NoiseSampler"):
        FiniteSumRows(noise)


def test_weighted_sum_of_tuples() -> None:
    out = weighted_sum([(0.25, (torch.ones(2), None)), (0.75, (3 * torch.ones(2), None))])
    assert out[1] is None
    torch.testing.assert_close(out[0], 2.5 * torch.ones(2))


def test_epoch_cycler_visits_every_batch_once_per_epoch_and_resumes() -> None:
    g = torch.Generator().manual_seed(0)
    cycler = EpochCycler(5)
    draws = [cycler.next(g) for _ in range(15)]
    for e in range(3):
        assert sorted(draws[5 * e: 5 * e + 5]) == list(range(5))
    assert draws[:5] != draws[5:10] or draws[5:10] != draws[10:15]  # reshuffled
    saved, gen_state = cycler.state_dict(), g.get_state()
    ahead = [cycler.next(g) for _ in range(7)]
    other = EpochCycler(5)
    other.load_state_dict(saved)
    g.set_state(gen_state)
    assert [other.next(g) for _ in range(7)] == ahead


def test_distinct_rows() -> None:
    rows = distinct_rows(10, 4, torch.Generator().manual_seed(0))
    assert rows.numel() == 4 and rows.unique().numel() == 4
    with pytest.raises(ValueError, match="exceeds"):
        distinct_rows(3, 4, torch.Generator())
