"""benchmarks/jax_reference.py (benchopt's JAX solvers and instance; runs only where jax is installed): the first
two iterations of SOBA, SABA and SRBA against a torch computation of the same updates on the same mini-batches."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.func import grad, vjp

from mbbo.tasks.zoo_tasks import BenchoptQuadraticSettings, pack_level, packed_quadratic_loss
from module_loading import load_module

pytest.importorskip("jax")

MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "jax_reference.py"
SETTINGS = BenchoptQuadraticSettings(n_inner=96, n_outer=64, d_in=5, d_out=3, batch_size=16)


@pytest.fixture(scope="module")
def jr() -> ModuleType:
    return load_module("jax_reference", MODULE)


def _oracles(z: torch.Tensor, x: torch.Tensor, v: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
    """(grad_z g, hvp, cross_v, grad_z f, grad_x f) in benchopt's form, float64."""
    def grad_z(z_: torch.Tensor, x_: torch.Tensor) -> torch.Tensor:
        return grad(lambda a: packed_quadratic_loss(x_, a, inner))(z_)

    gz, pullback = vjp(grad_z, z, x)
    hvp, cross_v = pullback(v)
    g_in, g_out = grad(lambda a, b: packed_quadratic_loss(b, a, outer), argnums=(0, 1))(z, x)
    return gz, hvp, cross_v, g_in, g_out


def test_benchopt_instance_is_reproducible_and_not_torchs(jr: ModuleType) -> None:
    first, second = jr.benchopt_instance(SETTINGS), jr.benchopt_instance(SETTINGS)
    assert first.config["generator"] == "jax"
    assert first.inner.u.shape == (96, 5) and first.outer.p.shape == (64, 3) and first.inner.q.shape == (96, 5)
    assert torch.equal(pack_level(first.inner), pack_level(second.inner))
    # E[A] = S^2 has its spectrum in [mu, L]: the sample mean is positive definite here
    assert float(torch.linalg.eigvalsh(first.inner_means.hess_yy).min()) > 0


@pytest.mark.parametrize("name", ["soba", "saba", "srba"])
def test_two_iterations_equal_the_update_rules(jr: ModuleType, name: str) -> None:
    instance = jr.benchopt_instance(SETTINGS)
    inner, outer = pack_level(instance.inner), pack_level(instance.outer)
    solver = jr.JaxSolver(name, inner.float().numpy(), outer.float().numpy(), 5, 3, step_size=0.1, outer_ratio=2.0,
                          batch_size=16, iterations_per_call=1)
    b, s, s_out = 16, 0.1, 0.05
    z, x, v = torch.zeros(5, dtype=torch.float64), torch.full((3,), -2.0, dtype=torch.float64), torch.zeros(5)
    v = v.double()
    inner, outer = inner.float().double(), outer.float().double()
    # the samplers start in order: batch 0 then batch 1 on both levels
    batches = [(inner[:b], outer[:b]), (inner[b:2 * b], outer[b:2 * b])]
    weights = (b / 96, b / 64)
    mean = [torch.zeros_like(t) for t in (z, z, x, z, x)]
    memory: list[dict[int, torch.Tensor]] = [{}, {}, {}, {}, {}]
    state: dict[str, torch.Tensor] = {}
    for t, (rows_in, rows_out) in enumerate(batches):
        if name == "srba":
            if t == 0:  # full batch at t % period == 0
                gz, hvp, cross_v, g_in, g_out = _oracles(z, x, v, inner, outer)
                d = [gz, hvp + g_in, cross_v + g_out]
            else:  # SARAH differences on batch 0 (the first sampled batch)
                new = _oracles(z, x, v, inner[:b], outer[:b])
                old = _oracles(state["z"], state["x"], state["v"], inner[:b], outer[:b])
                diff = [a - c for a, c in zip(new, old, strict=True)]
                d = [d[0] + diff[0], d[1] + diff[1] + diff[3], d[2] + diff[2] + diff[4]]
            state = {"z": z, "x": x, "v": v}
        else:
            values = list(_oracles(z, x, v, rows_in, rows_out))
            if name == "saba":  # SAGA over the fixed batches, memory of batch t starts at 0
                for k, value in enumerate(values):
                    w = weights[0] if k < 3 else weights[1]
                    diff = value - memory[k].get(t, torch.zeros_like(value))
                    values[k] = diff + mean[k]
                    mean[k] = mean[k] + w * diff
                    memory[k][t] = value
            gz, hvp, cross_v, g_in, g_out = values
            d = [gz, hvp + g_in, cross_v + g_out]
        z, v, x = z - s * d[0], v - s * d[1], x - s_out * d[2]
        solver.step()
        assert solver.iteration == t + 1
        assert torch.allclose(torch.tensor(solver.z, dtype=torch.float64), z, rtol=1e-4, atol=1e-5)
        assert torch.allclose(torch.tensor(solver.x, dtype=torch.float64), x, rtol=1e-4, atol=1e-5)


def test_unknown_solver_is_refused(jr: ModuleType) -> None:
    with pytest.raises(ValueError, match="name must be one of 'soba', 'saba', 'srba', got 'sgd'"):
        jr.JaxSolver("sgd", pack_level(jr.benchopt_instance(SETTINGS).inner).float().numpy(),
                     pack_level(jr.benchopt_instance(SETTINGS).outer).float().numpy(), 5, 3)
