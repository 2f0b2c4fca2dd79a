"""T1/T2: multi-block hyper-parameter optimisation with robust losses (seed paper, section 7.1).

One weight per training sample, sigma(p_j), shared by m logistic models with loss temperatures s_i:

    l_i(w; a, y) = log(1 + exp(-y w^T [1; a] / s_i))
    g_i(p, w_i) = (1/n_train) sum_j sigma(p_j) l_i(w_i; a_j, y_j) + (lam/2) ||w_i||^2
    f_i(w_i)    = (1/n_val) sum_{j in val} l_i(w_i; a_j, y_j)

x = p is sparse: a block's mini-batch touches only its b rows of p. T2 (imbalanced, noisy labels) is the same
problem on a training split with positives removed and labels flipped (`remove_positive_fraction`,
`flip_probability`); validation and test stay clean. See specs/tasks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import softplus

from mbbo.data.binary import add_bias_column, make_imbalanced_noisy, temperatures, train_validation_split
from mbbo.data.libsvm import load_binary_dataset
from mbbo.problem import ROW_SAMPLING, Batch, MultiBlockProblem, RowSampler
from mbbo.tasks.block_eval import (
    block_chunks,
    check_eval_blocks,
    evaluation_blocks,
    gather_block_rows,
    lower_rows,
    mean_and_sem,
    owned_blocks,
    rows_per_chunk,
)
from mbbo.tasks.registry import TaskSpec, register_task
from mbbo.validation import check_choice


@dataclass
class HyperparamSettings:
    """Task settings; defaults are the authors' (m = 100, lam = 1e-5, b = 32, temperatures in [1, 11]).

    `row_sampling`: "reshuffle" (the authors': training and validation rows permuted once per data epoch, each
    iteration takes the next B*b rows, block k of it rows [k b, (k+1) b); `mbbo.problem.RowSampler`) or
    "replacement" (i.i.d. rows).
    """

    dataset: str = "a8a"
    num_blocks: int = 100
    batch_size: int = 32
    lam: float = 1e-5
    temperature_low: float = 1.0
    temperature_high: float = 11.0
    validation_fraction: float = 0.2
    remove_positive_fraction: float = 0.0
    flip_probability: float = 0.0
    init: str = "uniform"
    row_sampling: str = "reshuffle"
    seed: int = 0
    data_dir: str | None = None
    eval_blocks: int | str | None = "auto"

    def validate(self) -> None:
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a positive finite number, got {self.lam!r}")
        check_eval_blocks(self.eval_blocks)
        if self.init not in ("uniform", "zeros"):
            raise ValueError(f"init must be 'uniform' (the authors' U[0, 1)) or 'zeros', got {self.init!r}")
        check_choice("row_sampling", self.row_sampling, ROW_SAMPLING)


def robust_logistic(margins: Tensor, temperature: Tensor) -> Tensor:
    """l(w; a, y) = log(1 + exp(-y w^T a / s)) from the margins y w^T a (numerically stable)."""
    return softplus(-margins / temperature)


@dataclass
class HyperparamTask:
    """Data (with bias column), temperatures and the evaluation of T1/T2 (float tensors on one device)."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    temperatures: Tensor
    settings: HyperparamSettings = field(default_factory=HyperparamSettings)

    @classmethod
    def load(cls, settings: HyperparamSettings | None = None, *, dtype: torch.dtype = torch.float64,
             device: torch.device | str = "cpu", download: bool = True) -> HyperparamTask:
        s = settings or HyperparamSettings()
        s.validate()
        data = load_binary_dataset(s.dataset, data_dir=s.data_dir, download=download)
        X_tr, y_tr, X_val, y_val = train_validation_split(data.X_train, data.y_train, s.validation_fraction,
                                                          seed=s.seed)
        if s.remove_positive_fraction > 0 or s.flip_probability > 0:
            noisy = make_imbalanced_noisy(X_tr, y_tr, remove_positive_fraction=s.remove_positive_fraction,
                                          flip_probability=s.flip_probability, seed=s.seed)
            X_tr, y_tr = noisy.X, noisy.y

        def t(a: np.ndarray) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        temps = temperatures(s.num_blocks, seed=s.seed, low=s.temperature_low, high=s.temperature_high)
        if s.num_blocks == 1:
            temps = np.ones(1)  # T2's m = 1 formulation uses s = 1
        return cls(t(add_bias_column(X_tr)), t(y_tr), t(add_bias_column(X_val)), t(y_val),
                   t(add_bias_column(data.X_test)), t(data.y_test), t(temps), s)

    @property
    def num_blocks(self) -> int:
        return self.temperatures.shape[0]

    @property
    def dim(self) -> int:
        return self.X_train.shape[1]

    def iterations_per_epoch(self, block_batch: int) -> float:
        """n_train / (B b), not rounded: one epoch touches as many (block, row) pairs as there are training
        rows, so epoch = iteration * B * b / n_train."""
        return self.X_train.shape[0] / (block_batch * self.settings.batch_size)

    # --- the bilevel problem ---------------------------------------------------------------------------
    def lower_loss(self, p_rows: Tensor, w: Tensor, batch: Batch, block: Tensor) -> Tensor:
        margins = batch["label"] * (batch["X"] @ w)
        weighted = torch.sigmoid(p_rows) * robust_logistic(margins, batch["temperature"])
        return weighted.mean() + 0.5 * self.settings.lam * (w * w).sum()

    def upper_loss(self, p_rows: Tensor, w: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return robust_logistic(batch["label"] * (batch["X"] @ w), batch["temperature"]).mean()

    def problem(self) -> MultiBlockProblem:
        s = self.settings
        gen = torch.Generator().manual_seed(s.seed)
        n, m, d = self.X_train.shape[0], self.num_blocks, self.dim
        like = {"dtype": self.X_train.dtype}
        if s.init == "uniform":  # the authors draw every variable from U[0, 1)
            p0 = torch.rand(n, generator=gen, **like).to(self.X_train.device)
            w0 = torch.rand(m, d, generator=gen, **like).to(self.X_train.device)
        else:
            p0 = torch.zeros(n, **like, device=self.X_train.device)
            w0 = torch.zeros(m, d, **like, device=self.X_train.device)
        lower = RowSampler({"X": self.X_train, "label": self.y_train}, s.batch_size, order=s.row_sampling)
        upper = RowSampler({"X": self.X_val, "label": self.y_val}, s.batch_size, order=s.row_sampling)
        return MultiBlockProblem(self.upper_loss, self.lower_loss, p0, w0, lower, upper, sparse_x=True,
                                 upper_depends_on_x=False, block_data={"temperature": self.temperatures},
                                 name=f"hyperparam-{s.dataset}")

    # --- evaluation ---------------------------------------------------------------------------------------
    # blocks per evaluation chunk; rows per chunk then follow from the memory budget
    EVAL_CHUNK_BLOCKS = 1024

    def block_losses(self, W: Tensor, X: Tensor, y: Tensor, temperatures: Tensor | None = None) -> Tensor:
        """Mean loss of each block (rows of W, temperatures by default those of all blocks) on (X, y), in chunks of
        rows: the working set stays within `block_eval.EVAL_BUDGET_BYTES`."""
        temps = self.temperatures if temperatures is None else temperatures
        total = W.new_zeros(W.shape[0])
        step = rows_per_chunk(W.shape[0], W.element_size())
        for start in range(0, X.shape[0], step):
            margins = y[start:start + step, None] * (X[start:start + step] @ W.T)
            total += robust_logistic(margins, temps).sum(0)
        return total / X.shape[0]

    def evaluated_blocks(self) -> Tensor | None:
        """The blocks `evaluate` uses: None for all, else the seeded subset of `eval_blocks`."""
        if not hasattr(self, "_evaluated"):
            self._evaluated = evaluation_blocks(self.num_blocks, self.settings.eval_blocks, self.settings.seed,
                                                self.temperatures.device)
        return self._evaluated

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        """val_loss = F(p) at the current lower variables (mean over the evaluated blocks, all validation rows);
        test_loss the same on the test file; test_accuracy of the block with the best validation loss.

        All m blocks are evaluated (chunks of blocks and rows, bounded memory) unless `eval_blocks` selects a
        seeded subset of K (default "auto": all up to 1000 blocks, else 1000); `val_loss_sem` and
        `test_loss_sem` are then the standard errors of the means (0 when every block is evaluated)."""
        subset = self.evaluated_blocks()
        val_parts, test_parts, best = [], [], (math.inf, -1)
        for blocks in block_chunks(subset, self.num_blocks, self.EVAL_CHUNK_BLOCKS, self.temperatures.device):
            mine = owned_blocks(algorithm, blocks)  # block-sharded: this process's blocks, gathered below
            W = lower_rows(algorithm, mine)
            temps = self.temperatures[mine]
            val, test = gather_block_rows(algorithm, blocks, [self.block_losses(W, self.X_val, self.y_val, temps),
                                                              self.block_losses(W, self.X_test, self.y_test, temps)])
            val_parts.append(val)
            test_parts.append(test)
            i = int(val.argmin())
            if float(val[i]) < best[0]:
                best = (float(val[i]), int(blocks[i]))
        block = torch.tensor([best[1]], device=self.temperatures.device)
        mine = owned_blocks(algorithm, block)
        # the best block's owner classifies the test rows (a matrix-vector product, as in 1 process)
        rows = [(self.X_test @ w) * self.y_test > 0 for w in lower_rows(algorithm, mine)]
        mine_correct = torch.stack(rows) if rows else self.y_test.new_zeros((0, self.y_test.shape[0]), dtype=torch.bool)
        (correct,) = gather_block_rows(algorithm, block, [mine_correct])
        accuracy = correct[0].to(self.X_test.dtype).mean()
        val_loss, val_sem = mean_and_sem(torch.cat(val_parts), self.num_blocks)
        test_loss, test_sem = mean_and_sem(torch.cat(test_parts), self.num_blocks)
        weights = torch.sigmoid(algorithm.x)
        return {"val_loss": val_loss, "val_loss_sem": val_sem, "test_loss": test_loss, "test_loss_sem": test_sem,
                "test_accuracy": float(accuracy), "best_block": best[1], "mean_weight": float(weights.mean())}


def load_task(dataset: str = "a8a", data_dir: str | Path | None = None, **settings: Any) -> HyperparamTask:
    """Convenience: `load_task("w8a", "../shared/data/libsvm", num_blocks=100)`."""
    dtype = settings.pop("dtype", torch.float64)
    device = settings.pop("device", "cpu")
    s = HyperparamSettings(dataset=dataset, data_dir=None if data_dir is None else str(data_dir), **settings)
    return HyperparamTask.load(s, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# the registered task (`mbbo run --task hyperparam`)
# ---------------------------------------------------------------------------------------------------------


def _build_hyperparam(settings: HyperparamSettings, dtype: torch.dtype, device: torch.device
                      ) -> tuple[MultiBlockProblem, HyperparamTask]:
    """Load the data and build the T1/T2 problem."""
    task = HyperparamTask.load(settings, dtype=dtype, device=device)
    return task.problem(), task


register_task(TaskSpec(
    name="hyperparam",
    description=("T1/T2: multi-block hyper-parameter optimisation with robust losses (one weight per training "
                 "sample shared by m logistic models with loss temperatures); T2 via remove_positive_fraction / "
                 "flip_probability"),
    settings_cls=HyperparamSettings,
    builder=_build_hyperparam,
    metrics=("val_loss", "test_loss", "test_accuracy", "best_block", "mean_weight"),
    aliases={"data_seed": "seed"},
    dataset_setting="dataset",
    data_dir_setting="data_dir",
    # the authors' code (BSVRB_ICML2023 HO/main.py), which the seed paper's curves come from; rows are
    # reshuffled by the task's row_sampling setting. v1's hypergradient uses the previous Hessian estimate as in
    # that code and the paper's section 4.1; its guard stays the eigenvalue floor (a deliberate fix). tau and
    # tau_v stay unset: the authors' values at m / B = 10, scaled for larger m / B (`lower_lr_scaling`), which
    # the delayed update's dc_i ~ m / B needs as much as the lazy replay does
    algorithm_defaults={"*": {"block_sampling": "reshuffle", "estimator_init": "uniform"},
                        "bsvrb_v1": {"hessian_timing": "previous"},
                        "bsvrb_v2": {"lower_update": "delayed"}},
    distributed=True,
    sharded=True,
))
