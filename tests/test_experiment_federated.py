"""The federated digits experiment script (`experiments/federated_digits.py`): its run plan and report."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import federated_digits
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return federated_digits


def test_every_planned_run_is_a_valid_command(script: ModuleType) -> None:
    from mbbo.cli import build_parser, resolve_experiment

    runs = script.planned_runs()
    names = [name for name, _ in runs]
    assert len(names) == len(set(names))
    main_grid = len(script.SEEDS) * len(script.SPLITS) * len(script.METHODS)
    assert names[:main_grid] == [script.run_id(m, s, seed) for seed in script.SEEDS for s in script.SPLITS
                                 for m in script.METHODS]
    assert sum("--nproc" in args for _, args in runs) == 1
    for name, args in runs:
        parsed = build_parser().parse_args(["run", *args])
        experiment = resolve_experiment(parsed)
        method = args[args.index("--algorithm") + 1]
        assert experiment.options.algorithm == method
        assert experiment.settings.split in script.SPLITS, name
        if method == "dsbo":
            assert experiment.settings.num_clients == 8


def test_report_on_an_empty_scratch_folder_writes_empty_tables(script: ModuleType, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(script, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(script, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(script, "plot_bands", lambda *a, **k: None)
    monkeypatch.setattr(script, "_dsbo_figure", lambda: None)
    script.report()
    assert (tmp_path / "results" / "federated_digits_summary.csv").is_file()
    assert not (tmp_path / "results" / "federated_digits_dsbo_real.json").exists()
    assert script.rounds_key("dsbo") == "gossip_rounds" and script.rounds_key("fednest") == "comm_rounds"
    assert script._mbytes({"comm_bytes": 2e6}) == 2.0 and script._mbytes({"comm_mbytes": 3.0}) == 3.0
