"""The federated layer (mbbo.federated), FedNest variants, FedMBO, DSBO and the digits tasks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbbo.federated import METHODS, make_method
from mbbo.federated.comm import CommCounter, SimulatedBackend, owner_slices
from mbbo.federated.data import ClientData, FederatedProblem, split_iid, split_label_shards
from mbbo.federated.dsbo import DSBO
from mbbo.federated.fedmbo import FedMBO
from mbbo.federated.fednest import FedNest
from mbbo.federated.launch import free_port, strip_nproc
from mbbo.federated.local import Aggregator, LocalSolver
from mbbo.federated.mixing import MixingMatrix, random_regular_adjacency, ring_adjacency
from mbbo.federated.oracles import ClientOracles
from mbbo.federated.sampling import ClientSampler, draw_rows, participation_count
from mbbo.tasks.federated import FedHyperrepSettings, FedImbalanceSettings, build_hyperrep, build_imbalance

DX, DY = 3, 4


def quadratic_problem(num_clients: int = 4, rows: int = 3, seed: int = 0, participation: float = 1.0
                      ) -> FederatedProblem:
    """g_i = mean_r 0.5 y'A_r y - y'B_r x, f_i = mean_r 0.5 ||y - c_r||^2 + 0.05 ||x||^2; heterogeneous A_r."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(num_clients):
        q = torch.linalg.qr(torch.randn(rows, DY, DY, generator=g, dtype=torch.float64)).Q
        eig = 0.5 + (i + 1) * torch.rand(rows, DY, generator=g, dtype=torch.float64)
        parts.append({"A": q @ torch.diag_embed(eig) @ q.transpose(1, 2),
                      "B": torch.randn(rows, DY, DX, generator=g, dtype=torch.float64),
                      "c": torch.randn(rows, DY, generator=g, dtype=torch.float64) + i})
    data = ClientData.from_parts(parts)

    def lower(x: torch.Tensor, y: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        per_row = 0.5 * torch.einsum("i,rij,j->r", y, b["A"], y) - torch.einsum("i,rij,j->r", y, b["B"], x)
        return (per_row * b["weight"]).sum()

    def upper(x: torch.Tensor, y: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return (0.5 * ((y - b["c"]) ** 2).sum(-1) * b["weight"]).sum() + 0.05 * torch.dot(x, x)

    return FederatedProblem(upper, lower, torch.randn(DX, generator=g, dtype=torch.float64),
                            torch.randn(DY, generator=g, dtype=torch.float64), data, data,
                            participation=participation, name="quadratic")


@pytest.fixture(scope="module")
def tiny_hyperrep() -> tuple[FederatedProblem, object]:
    return build_hyperrep(FedHyperrepSettings(num_clients=8, participation=0.5, split="noniid", hidden=8))


# --- data, splits, sampling ---------------------------------------------------------------------------------


def test_splits_cover_rows_and_shards_limit_labels() -> None:
    g = torch.Generator().manual_seed(0)
    parts = split_iid(103, 10, g)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    labels = torch.arange(10).repeat_interleave(20)
    shards = split_label_shards(labels, 10, 2, g)
    assert sorted(torch.cat(shards).tolist()) == list(range(200))
    assert all(len(labels[s].unique()) <= 2 for s in shards)


def test_client_with_no_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="client 1 has no lower data"):
        ClientData.from_parts([{"X": torch.ones(2, 3)}, {"X": torch.ones(0, 3)}], "lower data")
    with pytest.raises(ValueError, match="no data"):
        split_label_shards(torch.arange(5), 3, 2, torch.Generator())
    with pytest.raises(ValueError, match="no data"):
        split_iid(3, 4, torch.Generator())
    with pytest.raises(ValueError, match=r"client \d+ has 1 row"):
        build_hyperrep(FedHyperrepSettings(num_clients=1437, participation=0.01))


def test_sampler_draws_n_of_m_fresh_and_rejects_n_above_m() -> None:
    sampler = ClientSampler(10, 3, seed=1)
    draws = [sampler.draw(e) for e in range(20)]
    assert all(len(d) == 3 and len(d.unique()) == 3 and int(d.max()) < 10 for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1
    assert torch.equal(sampler.draw(5), ClientSampler(10, 3, seed=1).draw(5))
    with pytest.raises(ValueError, match=r"n=11 must be in \[1, M\] = \[1, 10\]"):
        ClientSampler(10, 11)
    assert participation_count(100, 0.1) == 10 and participation_count(7, 0.01) == 1
    with pytest.raises(ValueError, match="participation"):
        participation_count(10, 1.5)


def test_draw_rows_weights_and_independence_of_other_clients() -> None:
    parts = [{"X": torch.arange(n, dtype=torch.float64).unsqueeze(1)} for n in (2, 5, 7)]
    data = ClientData.from_parts(parts)
    batch = draw_rows(data, torch.tensor([0, 1, 2]), 3, seed=0, stream=1, event=4)
    assert torch.allclose(batch["weight"].sum(1), torch.ones(3, dtype=torch.float64))
    assert batch["weight"][0].tolist()[-1] == 0.0  # client 0 has only 2 rows
    for k, n in enumerate((2, 5, 7)):
        used = batch["X"][k, batch["weight"][k] > 0, 0]
        assert len(used.unique()) == len(used) and float(used.max()) < n
    alone = draw_rows(data, torch.tensor([2]), 3, seed=0, stream=1, event=4)
    assert torch.equal(alone["X"][0], batch["X"][2])
    full = draw_rows(data, torch.tensor([1]), None, seed=0, stream=1, event=4)
    assert float(full["weight"].sum()) == pytest.approx(1.0) and full["X"].shape[1] == 7


# --- building blocks ----------------------------------------------------------------------------------------


def test_local_solver_sgd_and_svrg_on_a_quadratic() -> None:
    target = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    sgd = LocalSolver(200, 0.1).run(torch.zeros(2, 2, dtype=torch.float64), lambda z, b: z - target, lambda t: {})
    assert torch.allclose(sgd, target, atol=1e-8)
    # SVRG with a correction equal to the gradient at the anchor is plain gradient descent on the same problem
    anchor = torch.zeros(2, dtype=torch.float64)
    svrg = LocalSolver(200, 0.1, variance_reduced=True).run(
        torch.zeros(2, 2, dtype=torch.float64), lambda z, b: z - target, lambda t: {}, anchor=anchor,
        correction=anchor - target)
    assert torch.allclose(svrg, target, atol=1e-8)
    with pytest.raises(ValueError, match="anchor"):
        LocalSolver(1, 0.1, variance_reduced=True).run(anchor, lambda z, b: z, lambda t: {})
    with pytest.raises(ValueError, match="local lr"):
        LocalSolver(1, 0.0)


def test_aggregator_mean_and_size_weighted() -> None:
    values = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    sizes = torch.tensor([1, 3])
    for weighting, expected in (("mean", 2.0), ("size", 2.5)):
        agg = Aggregator(weighting)
        (mean,) = agg.finish(agg.partial_sums([values], sizes), [(1,)])
        assert float(mean) == pytest.approx(expected)
    with pytest.raises(ValueError, match="weighting"):
        Aggregator("median")


def test_comm_counter_and_owner_slices() -> None:
    c = CommCounter()
    c.server_round(participants=10, numel=5, itemsize=8)
    c.gossip_round(messages=16, numel=5, itemsize=8)
    assert (c.rounds, c.gossip_rounds, c.bytes) == (1, 1, 2 * 10 * 5 * 8 + 16 * 5 * 8)
    assert c.metrics()["comm_mbytes"] == pytest.approx(c.bytes / 1e6)
    assert owner_slices(5, 2) == [range(0, 3), range(3, 5)]
    backend = SimulatedBackend(5)
    assert bool(backend.local(torch.tensor([0, 4])).all())


def test_mixing_matrix_doubly_stochastic_gossip_keeps_average_and_rejects_disconnected() -> None:
    for w in (MixingMatrix.ring(8), MixingMatrix.random_regular(10, 3, seed=2), MixingMatrix.ring(2)):
        ones = torch.ones(w.num_agents, dtype=torch.float64)
        assert torch.allclose(w.weights.sum(0), ones) and torch.allclose(w.weights.sum(1), ones)
        assert bool((w.weights >= 0).all()) and w.spectral_gap() > 0
        x = torch.randn(w.num_agents, 5, dtype=torch.float64)
        mixed = SimulatedBackend(w.num_agents).gossip(w.weights, x)
        assert torch.allclose(mixed.mean(0), x.mean(0), atol=1e-14)
    assert ring_adjacency(8).sum() == 16 and MixingMatrix.ring(8).messages == 16
    assert bool((random_regular_adjacency(10, 3, seed=1).sum(1) == 3).all())
    two_rings = torch.block_diag(ring_adjacency(3), ring_adjacency(3))
    with pytest.raises(ValueError, match="disconnected"):
        MixingMatrix(two_rings)
    with pytest.raises(ValueError, match="degree"):
        random_regular_adjacency(5, 3)


def test_client_oracles_match_autograd(tiny_hyperrep: tuple[FederatedProblem, object]) -> None:
    problem = quadratic_problem()
    oracles = ClientOracles(problem)
    clients = torch.tensor([1, 3])
    batch = problem.lower_data.full(clients)
    x, y = problem.x0, problem.y0
    v = torch.randn(2, DY, dtype=torch.float64)
    hv, jv = oracles.hvp_and_cross(x, y, v, batch)
    for k, i in enumerate(clients.tolist()):
        rows = problem.lower_data.rows_of(i)
        a_mean, b_mean = rows["A"].mean(0), rows["B"].mean(0)
        assert torch.allclose(hv[k], a_mean @ v[k], atol=1e-12)
        assert torch.allclose(jv[k], -b_mean.T @ v[k], atol=1e-12)
        assert torch.allclose(oracles.grad_y_g(x, y, batch)[k], a_mean @ y - b_mean @ x, atol=1e-12)
    assert torch.allclose(oracles.hvp(x, y, v, batch), hv)
    assert oracles.counts["hvp_cross"] == 2 and oracles.counts["hvp"] == 2
    gx, gy = oracles.upper_grads(x, y, batch)
    assert gx.shape == (2, DX) and gy.shape == (2, DY)
    empty = oracles.grad_y_g(x, y, problem.lower_data.full(torch.tensor([], dtype=torch.long)))
    assert empty.shape == (0, DY)


# --- estimators and algorithms ------------------------------------------------------------------------------


def exact_hypergradient(problem: FederatedProblem, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mu x + mean(B)^T mean(A)^-1 (y - mean(c)) with client means of row means (equal client weights)."""
    m = problem.num_clients
    rows = [problem.lower_data.rows_of(i) for i in range(m)]
    a = torch.stack([r["A"].mean(0) for r in rows]).mean(0)
    b = torch.stack([r["B"].mean(0) for r in rows]).mean(0)
    c = torch.stack([r["c"].mean(0) for r in rows]).mean(0)
    return 0.1 * x + b.T @ torch.linalg.solve(a, y - c)


def test_federated_neumann_with_all_clients_and_full_batch_is_the_exact_averaged_solve() -> None:
    problem = quadratic_problem()
    rows = [problem.lower_data.rows_of(i) for i in range(problem.num_clients)]
    eig = torch.linalg.eigvalsh(torch.stack([r["A"].mean(0) for r in rows]).mean(0))
    eta = 2.0 / float(eig.min() + eig.max())  # contraction (kappa - 1) / (kappa + 1) per term
    terms = int(torch.log(torch.tensor(1e-14)) / torch.log((eig.max() - eig.min()) / (eig.max() + eig.min()))) + 1
    alg = FedMBO(problem, batch_size=None, neumann_terms=terms, neumann_lr=eta)
    everyone = torch.arange(problem.num_clients)
    p = torch.randn(DY, dtype=torch.float64)
    a = torch.stack([r["A"].mean(0) for r in rows]).mean(0)
    v = alg.neumann().solve(alg.global_hvps(alg.x, alg.y, lambda j: everyone), p).v
    assert torch.allclose(v, torch.linalg.solve(a, p), rtol=0, atol=1e-10)
    h = alg.global_hypergradient(alg.x, alg.y, lambda j: everyone)
    assert torch.allclose(h, exact_hypergradient(problem, alg.x, alg.y), rtol=0, atol=1e-10)
    assert alg.comm.rounds == terms + 2 + terms  # the solve above (terms rounds) and p, N terms, h
    # solving with each client's own Hessian is biased under heterogeneity
    local = FedMBO(problem, batch_size=None, neumann_terms=30, neumann_lr=eta / 4, sync="solution")
    h_local = local.global_hypergradient(local.x, local.y, lambda j: everyone)
    assert float((h_local - h).norm()) > 1e-3 and local.comm.rounds == 1


@pytest.mark.parametrize(("name", "expected"), [
    ("fednest", 2 * 2 + 3 + 3), ("fednest_sgd", 2 + 3 + 3), ("lfednest", 2 + 1), ("lfednest_svrg", 2 * 2 + 1),
])
def test_fednest_rounds_match_the_spec_table(tiny_hyperrep: tuple[FederatedProblem, object], name: str,
                                             expected: int) -> None:
    problem, _ = tiny_hyperrep
    alg = make_method(name, problem, inner_rounds=2, neumann_terms=3, outer_steps=2, local_epochs=1)
    assert alg.rounds_per_iteration() == expected
    alg.step()
    alg.step()
    assert alg.comm.rounds == 2 * expected and alg.comm.gossip_rounds == 0
    assert alg.comm.bytes > 0


def test_sync_modes_rounds_fedmbo_dsbo_and_sync_errors(tiny_hyperrep: tuple[FederatedProblem, object]) -> None:
    problem, _ = tiny_hyperrep
    cases = [(FedNest, {"sync": "solution", "inner_rounds": 1}, 2 + 2), (FedMBO, {"lower_steps": 2}, 2 + 5 + 2),
             (FedMBO, {"lower_steps": 2, "sync": "solution"}, 3)]
    for cls, hyper, expected in cases:
        alg = cls(problem, **hyper, neumann_terms=5)
        alg.step()
        assert alg.comm.rounds == expected == alg.rounds_per_iteration()
    dsbo = DSBO(problem, lower_steps=2, neumann_terms=3)
    dsbo.step()
    assert dsbo.comm.gossip_rounds == 6 == dsbo.rounds_per_iteration() and dsbo.comm.rounds == 0
    assert dsbo.comm.bytes == 2 * 16 * DY_HEAD * 8 + 3 * 16 * DY_HEAD * 8 + 16 * problem.x0.numel() * 8
    with pytest.raises(ValueError, match="sync applies only"):
        make_method("lfednest", problem, sync="solution")
    with pytest.raises(ValueError, match="sync does not apply"):
        DSBO(problem, sync="solution")
    with pytest.raises(ValueError, match="batch_size"):
        FedMBO(problem, batch_size=0)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        FedMBO(problem, tau=3)


DY_HEAD = 10 * (8 + 1)  # the tiny hyper-representation head: 10 classes x (hidden 8 + bias)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_is_bit_identical(tiny_hyperrep: tuple[FederatedProblem, object], name: str) -> None:
    problem, _ = tiny_hyperrep
    hyper = {"local_epochs": 1, "outer_steps": 2} if "fednest" in name else {"lower_steps": 2}
    straight = make_method(name, problem, seed=3, neumann_terms=2, **hyper)
    for _ in range(3):
        straight.step()
    first = make_method(name, problem, seed=3, neumann_terms=2, **hyper)
    first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_method(name, problem, seed=3, neumann_terms=2, **hyper)
    resumed.load_state_dict(torch.load(buffer))
    resumed.step()
    resumed.step()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["oracle_counts"] == b["oracle_counts"] and set(a["state"]) == set(b["state"])
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]) if isinstance(value, torch.Tensor) else value == b["state"][key]


def test_old_checkpoint_format_is_refused(tiny_hyperrep: tuple[FederatedProblem, object]) -> None:
    problem, _ = tiny_hyperrep
    alg = make_method("fedmbo", problem, seed=0, lower_steps=1, neumann_terms=1)
    old = {k: v for k, v in alg.state_dict().items() if k not in ("format", "state")} | {"algorithm": {}}
    with pytest.raises(ValueError, match="state format 1"):
        alg.load_state_dict(old)


@pytest.mark.slow
def test_methods_learn_on_the_quadratic() -> None:
    problem = quadratic_problem()
    start = exact_hypergradient(problem, problem.x0, problem.y0).norm()
    for name in ("fednest", "fedmbo", "dsbo"):
        hyper = {"fednest": {"inner_lr": 0.2, "outer_lr": 0.3, "outer_steps": 2, "local_epochs": 2},
                 "fedmbo": {"lr": 1.0, "lower_lr": 0.3, "lower_steps": 3},
                 "dsbo": {"lr": 0.1, "lower_lr": 0.2, "lower_steps": 3}}[name]
        alg = make_method(name, problem, batch_size=None, neumann_lr=0.2, neumann_terms=8, **hyper)
        for _ in range(20):
            alg.step()
        x, _ = alg.evaluation_point()
        ys = [problem.lower_data.rows_of(i) for i in range(problem.num_clients)]
        a = torch.stack([r["A"].mean(0) for r in ys]).mean(0)
        b = torch.stack([r["B"].mean(0) for r in ys]).mean(0)
        y_star = torch.linalg.solve(a, b @ x)
        # DSBO's template (decentralised steps without gradient tracking) has a fixed point biased by the
        # heterogeneity of the clients; the server methods reach the stationary point
        factor = 0.5 if name == "dsbo" else 0.1
        assert float(exact_hypergradient(problem, x, y_star).norm()) < factor * float(start), name


# --- tasks, CLI and processes -----------------------------------------------------------------------------


def test_tasks_build_and_evaluate(tiny_hyperrep: tuple[FederatedProblem, object]) -> None:
    problem, evaluator = tiny_hyperrep
    assert problem.x0.numel() == 8 * 65 and problem.y0.numel() == DY_HEAD
    assert evaluator.iterations_per_epoch() == 2  # type: ignore[attr-defined]
    alg = DSBO(problem)
    metrics = evaluator.evaluate(alg)  # type: ignore[attr-defined]
    assert {"test_accuracy", "objective", "comm_rounds", "consensus_x"} <= set(metrics)
    imb, imb_eval = build_imbalance(FedImbalanceSettings(num_clients=5, split="noniid"))
    counts = torch.bincount(torch.cat([imb.lower_data.rows_of(i)["label"] for i in range(5)]), minlength=10)
    assert int(counts[0]) // int(counts[9]) >= 50 and imb.x0.numel() == 20
    assert "balanced_accuracy" in imb_eval.evaluate(FedNest(imb))
    with pytest.raises(ValueError, match="split"):
        build_imbalance(FedImbalanceSettings(split="dirichlet"))


def _cli(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "MBBO_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "mbbo", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = {"num_clients": 4, "participation": 0.5, "hidden": 8, "split": "noniid"}
HYPER = {"fednest": {"local_epochs": 1, "outer_steps": 2}, "fedmbo": {"lower_steps": 2}, "dsbo": {"lower_steps": 2}}


def _run_methods(backend_factory: object, steps: int = 2) -> dict[str, dict[str, object]]:
    problem, _ = build_hyperrep(FedHyperrepSettings(**TINY))
    out = {}
    for name, hyper in HYPER.items():
        alg = make_method(name, problem, seed=1, backend=backend_factory(problem.num_clients),  # type: ignore[operator]
                          neumann_terms=2, **hyper)
        for _ in range(steps):
            alg.step()
        out[name] = alg.state_dict()
    return out


def _distributed_worker(rank: int, port: int, path: str) -> None:
    import datetime

    import torch.distributed as dist

    from mbbo.distributed import close_process_group
    from mbbo.federated.comm import DistributedBackend

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    ok = False
    try:
        states = _run_methods(DistributedBackend)
        if rank == 0:
            torch.save(states, path)
        ok = True
    finally:
        close_process_group(synchronise=ok)


@pytest.mark.slow
def test_two_processes_equal_the_simulation(tmp_path: Path) -> None:
    """FedNest, FedMBO (all-reduce rounds) and DSBO (point-to-point gossip) on 2 gloo ranks == simulated."""
    import torch.multiprocessing as mp

    path = tmp_path / "states.pt"
    context = mp.start_processes(_distributed_worker, args=(free_port(), str(path)), nprocs=2, join=False,
                                 start_method="spawn")
    while not context.join(timeout=240):  # the collectives' own timeout is 60 s
        pass
    real = torch.load(path)
    sim = _run_methods(SimulatedBackend)
    for name in HYPER:
        for key, value in sim[name]["state"].items():
            other = real[name]["state"][key]
            if isinstance(value, torch.Tensor):
                assert torch.allclose(value, other, rtol=0, atol=1e-10), (name, key)
            else:
                assert value == other, (name, key)


@pytest.mark.slow
def test_cli_nproc_run_equals_the_simulated_run(tmp_path: Path) -> None:
    from mbbo.cli import main

    common = ["run", "--task", "fed_hyperrep", "--algorithm", "dsbo", "--iterations", "2", "--eval-every", "1",
              "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()], "neumann_terms=2"]
    assert main([*common, "--out", str(tmp_path / "sim")]) == 0
    real = _cli([*common, "--out", str(tmp_path / "real"), "--nproc", "2"], timeout=300)
    assert real.returncode == 0, real.stderr
    for a, b in zip(_records(tmp_path / "sim" / "metrics.jsonl"), _records(tmp_path / "real" / "metrics.jsonl"),
                    strict=True):
        for key in ("test_accuracy", "objective", "consensus_x", "gossip_rounds", "comm_mbytes"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-10, key  # type: ignore[arg-type]
    assert (tmp_path / "real" / "rank1" / "metrics.jsonl").is_file()


def test_cli_simulated_run_and_nproc_errors(tmp_path: Path) -> None:
    from mbbo.cli import main

    out = tmp_path / "run"
    status = main(["run", "--task", "fed_imbalance", "--algorithm", "lfednest_svrg", "--iterations", "2",
                   "--no-progress", "--out", str(out), "--set", "num_clients=4", "outer_steps=1"])
    assert status == 0
    record = _records(out / "metrics.jsonl")[-1]
    assert record["comm_rounds"] == 2 * 3
    assert main(["run", "--task", "quadratic", "--algorithm", "soba", "--nproc", "2", "--iterations", "1"]) == 2
    assert strip_nproc(["run", "--nproc", "2", "--x", "--nproc=3"]) == ["run", "--x"]
    assert 0 < free_port() < 65536


@pytest.mark.slow
def test_a_failing_rank_is_reported_and_stops_the_run(tmp_path: Path) -> None:
    result = _cli(["run", "--task", "fed_hyperrep", "--algorithm", "fedmbo", "--iterations", "1", "--no-progress",
                   "--out", str(tmp_path / "bad"), "--nproc", "2", "--set", "num_clients=1", "participation=1.0"],
                  timeout=300)
    assert result.returncode == 2
    assert "cannot be spread over 2 processes" in result.stderr
    assert "mbbo: error: rank" in result.stderr and "exited with status 2" in result.stderr
