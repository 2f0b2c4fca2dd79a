"""The README's library example runs as written (extracted from README.md, so the two cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_the_library_example() -> None:
    blocks = _python_blocks()
    assert blocks and "MultiBlockProblem" in blocks[0]


def test_readme_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(_python_blocks()[0], str(README), "exec"), namespace)
    alg = namespace["alg"]
    x = alg.x  # type: ignore[attr-defined]
    assert torch.isfinite(x).all() and not torch.equal(x, torch.zeros_like(x))  # x moved, and stayed finite
    assert alg.lower_variables().shape == (20, 30)  # type: ignore[attr-defined]
    assert namespace["problem"].upper_depends_on_x is False  # type: ignore[attr-defined]
    assert "tensor(" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bsvrb_v1", "bsvrb_v2", "rsvrb"])
def test_an_upper_loss_without_x_works_for_the_multi_block_methods(name: str) -> None:
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.problem import MultiBlockProblem, RowSampler

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    label = torch.randn(30, generator=gen, dtype=torch.float64).sign()

    def lower(x, y, batch, block):  # type: ignore[no-untyped-def]
        return torch.nn.functional.softplus(-batch["label"] * (batch["X"] @ y)).mean() + 0.5 * (x.exp() * y * y).sum()

    def upper(x, y, batch, block):  # type: ignore[no-untyped-def]
        return torch.nn.functional.softplus(-batch["label"] * (batch["X"] @ y)).mean()

    problem = MultiBlockProblem(upper, lower, torch.zeros(3, dtype=torch.float64),
                                torch.zeros(4, 3, dtype=torch.float64), RowSampler({"X": X, "label": label}, 8),
                                RowSampler({"X": X, "label": label}, 8))
    assert problem.upper_depends_on_x is False
    alg = make_algorithm(name, problem, seed=0, block_batch=2, lr=1e-2)
    for _ in range(3):
        alg.step()
    assert torch.isfinite(alg.x).all()
