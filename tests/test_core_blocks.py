"""Building blocks: trackers against their definitions, projections, lazy per-block tables, restarts."""

from __future__ import annotations

import itertools

import pytest
import torch

from mbbo.algorithms.bsvrb import BSVRBv2
from mbbo.algorithms.restart import Restarted
from mbbo.blocks import (
    BlockSampler,
    DecayingSparseRows,
    DelayedBlocks,
    MovingBlocks,
    ball_path,
    distinct_uniform,
    replay_ball_paths,
)
from mbbo.projections import (
    eig_compose,
    eig_solve,
    eigenvalue_floor,
    floored_eigh,
    project_ball,
    solve_spd,
)
from mbbo.tasks.quadratic import MultiBlockQuadratic
from mbbo.trackers import EMA, MSVR, STORM, RandomizedSTORM


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_trackers_follow_their_definitions_on_a_toy_sequence() -> None:
    u, new, old = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])
    assert torch.allclose(EMA(0.25).update(u, new), 0.75 * u + 0.25 * new)
    assert torch.allclose(STORM(0.25).update(u, new, old), new + 0.75 * (u - old))
    assert torch.allclose(MSVR(0.9, 1.0).update(u, new, old), 0.1 * u + 0.9 * new + 1.0 * (new - old))
    rs = RandomizedSTORM(0.5, num_blocks=10, block_batch=2)
    assert torch.allclose(rs.update(u, new, old), 0.5 * (u - 5 * old) + 5 * new)
    assert torch.allclose(rs.decay(torch.tensor([0.0, 3.0])), torch.tensor([1.0, 0.125]))
    # STORM on a deterministic sequence tracks it exactly once initialised exactly
    seq = [torch.tensor([float(k), float(k * k)]) for k in range(6)]
    d = seq[0]
    for prev, cur in itertools.pairwise(seq):
        d = STORM(0.3).update(d, cur, prev)
    assert torch.allclose(d, seq[-1])
    # MSVR with gamma = 1 - alpha is STORM with beta = alpha
    assert torch.allclose(MSVR(0.4, 0.6).update(u, new, old), STORM(0.4).update(u, new, old))


def test_msvr_theory_gamma_and_validation() -> None:
    assert MSVR.theory(0.5, 20, 5).gamma == pytest.approx(15 / 2.5 + 0.5)
    assert MSVR.theory(0.5, 5, 5).gamma == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \(0.0, 1.0\]"):
        MSVR(0.0, 1.0)
    with pytest.raises(ValueError, match=r"gamma must be a finite number in \[0.0, inf\)"):
        MSVR(0.5, -1.0)
    with pytest.raises(ValueError, match=r"beta must be a finite number in \(0.0, 1.0\]"):
        STORM(1.5)
    with pytest.raises(ValueError, match="undefined"):
        MSVR.theory(1.0, 10, 2)


def test_projections() -> None:
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    p = project_ball(v, 1.0)
    assert torch.allclose(p, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=gen)
    h = a + a.transpose(-1, -2)
    floored = eigenvalue_floor(h, 0.5)
    assert torch.linalg.eigvalsh(floored).min() >= 0.5 - 1e-12
    # matrices already above the floor are unchanged
    spd = a @ a.transpose(-1, -2) + 2 * torch.eye(4)
    assert torch.allclose(eigenvalue_floor(spd, 0.5), spd, atol=1e-12)
    lam, vecs = floored_eigh(h, 0.5)
    assert torch.allclose(eig_compose(lam, vecs), floored, atol=1e-12)
    rhs = torch.randn(3, 4, generator=gen)
    assert torch.allclose(eig_solve(lam, vecs, rhs), torch.linalg.solve(floored, rhs), atol=1e-10)
    assert torch.allclose(solve_spd(spd, rhs), torch.linalg.solve(spd, rhs), atol=1e-12)
    assert torch.allclose(solve_spd(h, rhs), torch.linalg.solve(h, rhs), atol=1e-8)  # indefinite: LU fallback


def test_block_sampler() -> None:
    s = BlockSampler(10, 3)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([s.sample(gen, torch.device("cpu")) for _ in range(2000)])
    assert all(len(set(row.tolist())) == 3 for row in draws[:50])
    freq = torch.bincount(draws.reshape(-1), minlength=10) / draws.numel()
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.01)
    assert torch.equal(BlockSampler(4, 4).sample(gen, torch.device("cpu")), torch.arange(4))
    with pytest.raises(ValueError, match=r"block_batch must be an integer in \[1, m\] = \[1, 4\], got 5"):
        BlockSampler(4, 5)


@pytest.mark.parametrize("mode", ["uniform", "reshuffle"])
@pytest.mark.parametrize(("m", "b", "strata"), [(12, 4, 2), (12, 6, 3), (24, 8, 4), (8, 8, 2), (12, 8, 4)])
def test_stratified_block_sampler_draws_b_over_s_blocks_of_each_class(mode: str, m: int, b: int, strata: int
                                                                       ) -> None:
    """block_strata S: every iteration holds B distinct blocks, B / S of each class i mod S, one of each class
    in turn; every block is sampled with frequency B / m; under reshuffle each window of m // B iterations
    samples every block exactly once (and the state restores the stream)."""
    s = BlockSampler(m, b, mode, strata=strata)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([s.sample(gen, torch.device("cpu")) for _ in range(3000)])
    assert all(len(set(row.tolist())) == b for row in draws)
    assert torch.equal(draws % strata, torch.arange(b).remainder(strata).expand_as(draws))  # the classes in turn
    freq = torch.bincount(draws.reshape(-1), minlength=m) / draws.shape[0]
    assert torch.allclose(freq, torch.full((m,), b / m), atol=0.03)
    if mode == "reshuffle":
        period = m // b
        for w in range(3):
            window = draws[w * period: (w + 1) * period].reshape(-1)
            assert len(set(window.tolist())) == period * b  # no block twice in a window
            if period * b == m:
                assert sorted(window.tolist()) == list(range(m))
        twin = BlockSampler(m, b, mode, strata=strata)
        twin.load_state_dict(s.state_dict())
        state = gen.get_state()
        ahead = [s.sample(gen, torch.device("cpu")) for _ in range(5)]
        gen.set_state(state)
        assert all(torch.equal(a, twin.sample(gen, torch.device("cpu"))) for a in ahead)


@pytest.mark.parametrize(("n", "k"), [(10, 10), (10, 7), (10, 3), (1000, 20), (1, 1)])
@pytest.mark.parametrize("rows", [1, 3])
def test_distinct_uniform_draws_k_distinct_integers_below_n(n: int, k: int, rows: int) -> None:
    """`rows` rows of k distinct values of [0, n) (all of them in order when k = n), each value about equally often
    in every row and position."""
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([distinct_uniform(n, k, gen, rows=rows) for _ in range(2000)])
    assert draws.shape == (2000, rows, k) and draws.dtype == torch.long
    assert int(draws.min()) >= 0 and int(draws.max()) < n
    assert all(len(set(row.tolist())) == k for row in draws.reshape(-1, k)[:600])
    if k == n:
        assert bool((draws == torch.arange(n)).all())
        return
    for r in range(rows):
        freq = torch.bincount(draws[:, r, -1], minlength=n).double() / draws.shape[0]
        assert torch.allclose(freq, torch.full((n,), 1 / n, dtype=torch.float64), atol=0.035)


def test_distinct_uniform_one_row_is_sequential_rejection() -> None:
    """One row draws what sequential rejection over one list draws from the same stream (keep the first
    occurrences in order, append new draws for the missing ones): the uniform block sampler's stream as it was."""
    from mbbo.blocks import first_occurrences

    for n, k in ((10, 5), (7, 3), (100, 30), (12, 9)):
        ours, theirs = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        for _ in range(200):
            if 2 * k > n:
                expected = torch.randperm(n, generator=theirs)[:k]
            else:
                expected = torch.randint(n, (k,), generator=theirs)
                while (expected := expected[first_occurrences(expected)]).shape[0] < k:
                    expected = torch.cat([expected, torch.randint(n, (k - expected.shape[0],), generator=theirs)])
            assert torch.equal(distinct_uniform(n, k, ours)[0], expected)


def test_stratified_block_sampler_one_class_is_the_plain_sampler() -> None:
    """S = 1 draws what the sampler without strata draws, from the same random stream."""
    for mode in ("uniform", "reshuffle"):
        a, b = BlockSampler(20, 6, mode), BlockSampler(20, 6, mode, strata=1)
        ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        for _ in range(10):
            assert torch.equal(a.sample(ga, torch.device("cpu")), b.sample(gb, torch.device("cpu")))


def test_stratified_block_sampler_refuses_strata_that_do_not_divide_m_and_b() -> None:
    with pytest.raises(ValueError, match=r"block_strata = 3 must divide the number of blocks m = 10 and "
                                         r"block_batch B = 6"):
        BlockSampler(10, 6, strata=3)
    with pytest.raises(ValueError, match=r"block_strata = 4 must divide .* block_batch B = 6"):
        BlockSampler(12, 6, strata=4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="block_strata must be a positive integer"):
            BlockSampler(12, 6, strata=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("decay", "radius"), [(1.0, None), (0.7, None), (1.0, 0.8)])
def test_moving_blocks_lazy_equals_eager(decay: float, radius: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    m, d, step = 7, 3, 0.2
    values = project_ball(torch.randn(m, d, generator=gen), 0.8) if radius else torch.randn(m, d, generator=gen)
    dirs = torch.randn(m, d, generator=gen)
    lazy = MovingBlocks(values, dirs, step, radius=radius, decay=decay, lazy=True)
    eager = MovingBlocks(values, dirs, step, radius=radius, decay=decay, lazy=False)
    for t in range(40):
        blocks = torch.randperm(m, generator=gen)[:2]
        for table in (lazy, eager):
            cur, prev = table.read(blocks, t)
            if t > 0:
                assert torch.allclose(cur, eager.read(blocks, t)[0], atol=1e-12)
                assert torch.allclose(prev, eager.read(blocks, t)[1], atol=1e-12)
        assert torch.allclose(lazy.direction(blocks, t), eager.direction(blocks, t), atol=1e-12)
        new_dirs = torch.randn(2, d, generator=gen)
        cur, _ = lazy.read(blocks, t)
        lazy.write(blocks, cur, new_dirs, t)
        eager.write(blocks, eager.read(blocks, t)[0], new_dirs, t)
        eager.end_iteration(blocks, t)
        lazy.end_iteration(blocks, t)
    assert torch.allclose(lazy.current_all(40), eager.current_all(40), atol=1e-12)
    restored = MovingBlocks(values, dirs, step, radius=radius, decay=decay)
    restored.load_state_dict(lazy.state_dict())
    assert torch.equal(restored.current_all(40), lazy.current_all(40))


def test_decaying_sparse_rows_equal_dense_decay() -> None:
    gen = torch.Generator().manual_seed(2)
    m, n, b, d, q = 4, 12, 3, 2, 0.5
    buf = DecayingSparseRows(m, b, d, q, tolerance=0.0, capacity=1)
    dense = torch.zeros(m, n, d)
    for t in range(30):
        blocks = torch.randperm(m, generator=gen)[:2]
        rows = torch.randint(n, (2, b), generator=gen)
        contrib = torch.randn(2, b, d, generator=gen)
        dense = dense * q
        for i in range(2):
            dense[blocks[i]].index_add_(0, rows[i], contrib[i])
        buf.add(blocks, rows, contrib, t)
    assert buf.capacity > 1  # it grew instead of dropping live contributions
    for block in range(m):
        assert torch.allclose(buf.dense(block, n, 29), dense[block], atol=1e-12)
    w = torch.randn(m, d, generator=gen)
    index, values = buf.matvec(torch.arange(m), w, 29)
    out = torch.zeros(m, n).scatter_add_(1, index, values)
    assert torch.allclose(out, torch.einsum("mnd,md->mn", dense, w), atol=1e-12)
    # a tolerance frees slots whose weight fell below it: memory stays bounded
    small = DecayingSparseRows(m, b, d, q, tolerance=1e-3, capacity=1)
    for t in range(200):
        small.add(torch.tensor([0]), torch.zeros(1, b, dtype=torch.long), torch.ones(1, b, d), t)
    assert small.capacity <= 16


def test_restart_wrapper_decays_steps_and_grows_stages() -> None:
    quad = MultiBlockQuadratic.random(6, 3, 2, seed=0, interpolating=True)
    inner = BSVRBv2(quad.problem(), block_batch=2, lr=0.1, lower_lr=0.05, linsys_lr=0.05)
    wrapped = Restarted(inner, stage_length=3, decay=2.0, growth=2.0)
    for _ in range(3):
        wrapped.step()
    assert wrapped.stage == 1 and inner.config.lr == pytest.approx(0.05) and inner.config.alpha == pytest.approx(0.45)
    assert wrapped.current_length == 6
    for _ in range(6):
        wrapped.step()
    assert wrapped.stage == 2 and inner.config.lower_lr == pytest.approx(0.0125)
    uniform = Restarted(BSVRBv2(quad.problem(), block_batch=2), stage_length=4, output="uniform")
    for _ in range(4):
        uniform.step()
    assert uniform.stage == 1
    with pytest.raises(ValueError, match="not hyper-parameters"):
        Restarted(inner, decayed=("nonexistent",))
    with pytest.raises(ValueError, match="output must be"):
        Restarted(inner, output="best")


def test_row_sampler_returns_the_indexed_rows() -> None:
    from mbbo.problem import FullBatch, RowSampler

    gen = torch.Generator().manual_seed(0)
    data = {"X": torch.randn(50, 3, 2, generator=gen), "y": torch.arange(50)}
    blocks = torch.tensor([0, 4])
    batch = RowSampler(data, 7).sample(blocks, torch.Generator().manual_seed(3))
    assert batch["X"].shape == (2, 7, 3, 2) and torch.equal(batch["X"], data["X"][batch["index"]])
    assert torch.equal(batch["y"], batch["index"])
    per_block = {"X": torch.randn(5, 20, 2, generator=gen)}
    pb = RowSampler(per_block, 4, per_block=True).sample(blocks, torch.Generator().manual_seed(3))
    assert torch.equal(pb["X"], per_block["X"][blocks[:, None], pb["index"]])
    full = FullBatch(data).sample(blocks, gen)
    assert torch.equal(full["X"][1], data["X"]) and torch.equal(full["index"][0], torch.arange(50))
    # `sample` is `gather` of `draw` (also with replacement, and keeping a subset of the blocks): the same rows
    # from the same generator state, and the same state after
    for order in ("reshuffle", "replacement"):
        one, two = RowSampler(data, 7, order=order), RowSampler(data, 7, order=order)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        keep = torch.tensor([1])  # the positions of the kept blocks
        for _ in range(9):  # crosses reshuffle epochs (50 rows, 14 a call)
            got, index = one.sample(blocks, g1, keep=keep), two.draw(blocks, g2)
            assert index.shape == (2, 7) and torch.equal(got["index"], index[keep])
            assert torch.equal(got["X"], two.gather(blocks, index, keep)["X"])
        assert torch.equal(g1.get_state(), g2.get_state())
        initial = one.sample_initial(blocks, g1)
        assert torch.equal(initial["index"], two.draw_initial(blocks, g2))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RowSampler(data, 0)
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        RowSampler({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)


def test_quadratic_noise_is_a_mini_batch_mean() -> None:
    """The quadratic task draws the mean of b per-sample noises directly: std = noise / sqrt(b)."""
    quad = MultiBlockQuadratic.random(2, 3, 4, seed=0)
    pb = quad.problem(noise=0.5, hessian_noise=0.2, batch_size=16)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([pb.lower_sampler.sample(torch.tensor([0, 1]), gen)["noise_g"] for _ in range(4000)])
    assert draws.std().item() == pytest.approx(0.5 / 4, rel=0.05)
    hess = torch.cat([pb.lower_sampler.sample(torch.tensor([0]), gen, batch_size=4)["hessian_noise"]
                      for _ in range(4000)])
    assert hess.std().item() == pytest.approx(0.2 / 2, rel=0.05)


@pytest.mark.parametrize("k", [1, 3, 40, 700])
def test_ball_path_equals_projected_steps(k: int) -> None:
    """Closed-form segment + scalar sphere recursion == k literal projected steps (rows inside, on the sphere)."""
    gen = torch.Generator().manual_seed(k)
    radius, step = 1.5, 0.03
    starts = torch.cat([project_ball(torch.randn(3, 4, generator=gen, dtype=torch.float64), radius),
                        torch.nn.functional.normalize(torch.randn(2, 4, generator=gen, dtype=torch.float64)) * radius])
    for w0, d in zip(starts, torch.randn(5, 4, generator=gen, dtype=torch.float64), strict=True):
        w, path = w0.clone(), [w0.clone()]
        for _ in range(k):
            w = project_ball(w - step * d, radius)
            path.append(w)
        cur, prev = ball_path(w0, d, step, radius, k)
        torch.testing.assert_close(cur, path[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(prev, path[k - 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("decay", "radius", "lazy"), [(1.0, None, True), (1.0, 0.8, True), (0.7, 0.8, True),
                                                        (1.0, 0.8, False)])
def test_read_at_a_tensor_iteration_and_the_replay_operator(decay: float, radius: float | None, lazy: bool) -> None:
    """`read` with t a 0-d tensor (a compiled update's read) equals `read` with the int t, bit for bit, for both
    tables; the paths that leave the ball are replayed by `replay_ball_paths` exactly as `ball_path` does."""
    gen = torch.Generator().manual_seed(3)
    m, d, step = 9, 3, 0.4
    values = project_ball(torch.randn(m, d, generator=gen, dtype=torch.float64), 0.8)
    table = MovingBlocks(values, torch.randn(m, d, generator=gen, dtype=torch.float64), step, radius=radius,
                         decay=decay, lazy=lazy)
    delayed = DelayedBlocks(values, torch.randn(m, d, generator=gen, dtype=torch.float64), step, radius=radius)
    replayed = 0
    for t in range(30):
        blocks = torch.randperm(m, generator=gen)[:3]
        for tab in (table, delayed):
            cur, prev = tab.read(blocks, t)
            for got, want in zip(tab.read(blocks, torch.tensor(t)), (cur, prev), strict=True):
                assert torch.equal(got, want)
            tab.write(blocks, cur, torch.randn(3, d, generator=gen, dtype=torch.float64), t)
            tab.end_iteration(blocks, t)
        if lazy and radius is not None and decay == 1.0:
            start, direction, k, cur, prev = table._closed_form(blocks, t + 1)
            got_cur, got_prev = replay_ball_paths(start, direction, k, cur, prev, step, radius)
            for i in range(3):
                want = ball_path(start[i], direction[i], step, radius, int(k[i]))
                if float(cur[i].norm()) > radius:
                    replayed += 1
                    assert torch.equal(got_cur[i], want[0]) and torch.equal(got_prev[i], want[1])
                else:  # inside: the closed form itself
                    assert torch.equal(got_cur[i], cur[i]) and torch.equal(got_prev[i], prev[i])
    assert (replayed > 0) == (lazy and radius is not None and decay == 1.0)


@pytest.mark.parametrize("lazy", [True, False, None])  # None: DelayedBlocks
def test_a_compiled_read_and_write_allocates_no_table_sized_buffer(lazy: bool | None) -> None:
    """A compiled update that reads and writes B rows of a table writes them in place: the generated code
    allocates no buffer of the table's m rows (an O(m) copy per iteration; `DelayedBlocks.write` once made
    Inductor copy its `before` table)."""
    from torch._inductor.utils import run_and_get_code

    m, d = 997, 5
    gen = torch.Generator().manual_seed(0)
    values, directions = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
    table = (DelayedBlocks(values, directions, 0.1) if lazy is None
             else MovingBlocks(values, directions, 0.1, radius=2.0, lazy=lazy))

    def update(blocks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cur, prev = table.read(blocks, t)
        fresh = 0.5 * table.direction(blocks, t) + cur - prev
        table.write(blocks, cur, fresh, t)
        return cur

    blocks, t = torch.tensor([4, 500, 996]), torch.tensor(3)
    compiled = torch.compile(update, dynamic=False)
    _, codes = run_and_get_code(compiled, blocks, t)
    allocations = [line for code in codes for line in code.splitlines() if "empty_strided" in line]
    assert allocations and not any(f"(({m}, " in line for line in allocations)
