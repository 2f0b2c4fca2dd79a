"""The `mbbo` command line, in process: `main([...])` exit codes, files and their contents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mbbo import cli
from mbbo.algorithms.bsvrb import BSVRBv1Config, BSVRBv2Config
from mbbo.cli import Experiment, RunOptions, build_parser, main, resolve_experiment
from mbbo.tasks import registry
from mbbo.tasks.quadratic import QuadraticSettings, build_quadratic
from mbbo.tasks.registry import TaskSpec

QUAD = ["run", "--task", "quadratic", "--no-progress", "--set", "num_blocks=4", "block_batch=2"]
HYPER_KEYS = {"iteration", "epoch", "time", "compile_time", "oracle_calls", "val_loss", "test_loss", "test_accuracy"}


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _config(out: Path) -> dict[str, Any]:
    return json.loads((out / "config.json").read_text())


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mbbo: error: ") and "Traceback" not in err
    return err


# --- run ------------------------------------------------------------------------------------------------


def test_run_quadratic_writes_resolved_config_metrics_and_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "4", "--eval-every", "2", "--seed", "3",
                 "--out", str(out), "--set", "lr=1e-2"]) == 0
    stdout = capsys.readouterr().out
    assert f"results in {out}" in stdout and "final: iteration 4" in stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt"}
    config = _config(out)
    assert config["task"] == "quadratic" and config["algorithm"] == "bsvrb_v2" and config["dataset"] is None
    expected_hyper = {**dataclasses.asdict(BSVRBv2Config()), "lr": 0.01, "block_batch": 2}
    assert config["hyper"] == expected_hyper
    assert config["settings"] == {**dataclasses.asdict(QuadraticSettings()), "num_blocks": 4}
    assert config["seed"] == 3 and config["threads"] == 1
    assert config["dtype"] == "float64" and config["device"] == "cpu"
    assert config["torch_version"] == str(torch.__version__)
    assert config["runner"]["iterations"] == 4 and config["runner"]["eval_every"] == 2
    records = _records(out)
    assert [r["iteration"] for r in records] == [0, 2, 4]
    assert {"iteration", "epoch", "time", "oracle_calls", "grad_norm", "objective"} <= set(records[-1])
    assert records[1]["epoch"] == 1.0  # one epoch = ceil(m / B) = 2 iterations


def test_run_default_out_dir_threads_and_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        assert main([*QUAD, "--algorithm", "rsvrb", "--iterations", "2", "--seed", "5", "--threads", "2",
                     "--dtype", "float32"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    out = Path("runs/quadratic-rsvrb-s5")
    assert (out / "checkpoint.pt").is_file()
    assert str(out) in capsys.readouterr().out
    config = _config(out)
    assert config["threads"] == 2 and config["dtype"] == "float32"
    # epochs by default, evaluation once per epoch
    assert config["runner"]["epochs"] is None and config["runner"]["eval_every"] == 2


def test_run_epochs_default_budget(tmp_path: Path) -> None:
    out = tmp_path / "e"
    assert main([*QUAD, "--algorithm", "ma_v2", "--out", str(out)]) == 0
    config = _config(out)
    assert config["runner"]["epochs"] == cli.DEFAULT_EPOCHS and config["runner"]["iterations"] is None
    assert [r["iteration"] for r in _records(out)] == [0, 2]


def test_run_hyperparam_breast_cancer_restarted(tmp_path: Path) -> None:
    out = tmp_path / "h"
    assert main(["run", "--task", "hyperparam", "--dataset", "breast_cancer", "--algorithm", "re_bsvrb_v1",
                 "--iterations", "3", "--eval-every", "1", "--no-progress", "--out", str(out), "--set",
                 "num_blocks=3", "block_batch=2", "batch_size=8", "stage_length=2", "flip_probability=0.2",
                 "remove_positive_fraction=0.5"]) == 0
    config = _config(out)
    assert config["dataset"] == "breast_cancer" and config["algorithm"] == "re_bsvrb_v1"
    assert config["restart"] == {"stage_length": 2, "decay": 2.0, "growth": 2.0, "output": "last"}
    assert config["settings"]["flip_probability"] == 0.2 and config["settings"]["num_blocks"] == 3
    # the task's defaults (the authors' block sampling and estimator initialisation) under the user's values
    assert config["hyper"] == {**dataclasses.asdict(BSVRBv1Config()), "block_batch": 2, "block_sampling": "reshuffle",
                               "estimator_init": "uniform", "hessian_timing": "previous"}
    records = _records(out)
    assert len(records) == 4
    assert all(set(r) >= HYPER_KEYS for r in records)


def test_run_hyperparam_a8a_shared_data(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "a8a"
    assert main(["run", "--task", "hyperparam", "--data-dir", str(shared_data / "libsvm"), "--algorithm",
                 "bsvrb_v2", "--iterations", "3", "--no-progress", "--out", str(out)]) == 0
    config = _config(out)
    assert config["dataset"] == "a8a" and config["settings"]["num_blocks"] == 100
    assert config["settings"]["data_dir"] == str(shared_data / "libsvm")
    # no --set: the authors' combination, recorded
    assert config["settings"]["row_sampling"] == "reshuffle"
    assert {k: config["hyper"][k] for k in ("block_sampling", "lower_update", "estimator_init")} == {
        "block_sampling": "reshuffle", "lower_update": "delayed", "estimator_init": "uniform"}
    records = _records(out)
    assert [r["iteration"] for r in records] == [0, 3]
    assert all(set(r) >= HYPER_KEYS for r in records)
    assert records[-1]["epoch"] == pytest.approx(3 * 10 * 32 / 18_156)  # epoch = iteration B b / n_train
    assert (out / "checkpoint.pt").is_file()


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    common = [*QUAD, "--algorithm", "bsvrb_v2", "--eval-every", "1", "--set", "noise=0.5", "lr=0.05"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*common, "--iterations", "6", "--out", str(full)]) == 0
    assert main([*common, "--iterations", "3", "--out", str(split)]) == 0
    assert main([*common, "--iterations", "6", "--out", str(split), "--resume"]) == 0

    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip(_records(split)) == strip(_records(full))
    assert len(_records(full)) == 7


def test_resume_refuses_an_old_format_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint of the hand-written state format (before the declared States) is refused, saying so."""
    from mbbo.checkpoint import load_checkpoint, save_checkpoint

    common = [*QUAD, "--algorithm", "bsvrb_v2", "--out", str(tmp_path / "run")]
    assert main([*common, "--iterations", "2"]) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    payload = load_checkpoint(path)
    state = payload["algorithm"]
    payload["algorithm"] = {k: v for k, v in state.items() if k not in ("format", "state")} | {"algorithm": {}}
    save_checkpoint(path, payload)
    assert main([*common, "--iterations", "4", "--resume"]) == 2
    assert "algorithm state format 1" in _error(capsys)


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    args = [*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in _error(capsys)
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _error(capsys)
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(tmp_path / "x"),
                 "--resume"]) == 2
    assert "cannot resume: no checkpoint" in _error(capsys)


# --- configuration layers -------------------------------------------------------------------------------


def test_yaml_config_with_set_overriding(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("task: quadratic\nalgorithm: bsvrb_v1\niterations: 5\nlr: 0.01\nnum_blocks: 4\n"
                    "hyper:\n  block_batch: 2\nsettings:\n  noise: 0.0\n")
    out = tmp_path / "y"
    assert main(["run", "--config", str(path), "--no-progress", "--out", str(out), "--iterations", "2",
                 "--set", "lr=0.02", "noise=0.3"]) == 0
    config = _config(out)
    assert config["algorithm"] == "bsvrb_v1" and config["hyper"]["lr"] == 0.02  # --set beats the file
    assert config["hyper"]["block_batch"] == 2 and config["settings"]["num_blocks"] == 4
    assert config["settings"]["noise"] == 0.3
    assert config["runner"]["iterations"] == 2  # the flag beats the file


def test_toml_config_with_set_overriding(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('task = "quadratic"\nalgorithm = "re_rsvrb"\nepochs = 3\nlr = 1e-2\nstage_length = 3\n'
                    'seed = 4\n[settings]\nnum_blocks = 6\n')
    out = tmp_path / "t"
    assert main(["run", "--config", str(path), "--no-progress", "--out", str(out), "--seed", "1",
                 "--set", "block_batch=3", "stage_length=2", "seed=2", "iterations=2"]) == 0
    config = _config(out)
    assert config["algorithm"] == "re_rsvrb" and config["hyper"]["lr"] == 0.01
    assert config["hyper"]["block_batch"] == 3 and config["restart"]["stage_length"] == 2
    assert config["seed"] == 2  # defaults < file < flags < --set
    # iterations from --set replace the file's epochs
    assert config["runner"]["iterations"] == 2 and config["runner"]["epochs"] is None


def test_resolve_experiment_sections_and_precedence(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "--task", "quadratic", "--algorithm", "bsvrb_v2", "--set",
                                      "hyper.lr=0.5", "settings.num_blocks=12", "iterations=1e3"])
    experiment = resolve_experiment(args)
    assert isinstance(experiment, Experiment) and isinstance(experiment.options, RunOptions)
    assert experiment.hyper["lr"] == 0.5 and experiment.settings.num_blocks == 12
    assert experiment.options.iterations == 1000 and experiment.options.epochs is None
    assert experiment.out_dir == Path("runs/quadratic-bsvrb_v2-s0")
    assert experiment.restart is None and experiment.dataset is None
    config = experiment.config()
    assert {"task", "dataset", "algorithm", "settings", "hyper", "seed", "threads", "dtype", "device",
            "torch_version"} <= set(config)


def test_ambiguous_key_and_misfitting_algorithm(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    @dataclasses.dataclass
    class WithLr(QuadraticSettings):
        lr: float = 1.0

    spec = TaskSpec(name="toy", description="toy", settings_cls=WithLr, builder=build_quadratic,
                    algorithms=("bsvrb_v2",), algorithms_reason="it needs Hessian-vector products")
    monkeypatch.setitem(registry.TASKS, "toy", spec)
    base = ["run", "--task", "toy", "--iterations", "1", "--no-progress", "--out", str(tmp_path / "toy")]
    assert main([*base, "--algorithm", "rsvrb"]) == 2
    err = _error(capsys)
    assert "algorithm 'rsvrb' does not fit task 'toy'" in err and "Hessian-vector products" in err
    assert main([*base, "--algorithm", "bsvrb_v2", "--set", "lr=0.1"]) == 2
    assert "write settings.lr or hyper.lr" in _error(capsys)
    assert main([*base, "--algorithm", "bsvrb_v2", "--set", "hyper.lr=0.1", "settings.lr=3"]) == 0


def test_single_block_algorithm_on_one_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soba"
    base = ["run", "--task", "quadratic", "--algorithm", "soba", "--iterations", "2", "--no-progress",
            "--out", str(out)]
    assert main(base) == 2
    assert "soba is a single-block algorithm" in _error(capsys)
    assert main([*base, "--set", "num_blocks=1"]) == 0
    assert _config(out)["settings"]["num_blocks"] == 1
    # a misfit only the built problem shows (SABA needs stored rows, the quadratic samples noise)
    assert main([*base, "--set", "num_blocks=1", "--algorithm", "saba", "--overwrite"]) == 2
    assert "'saba' does not fit task 'quadratic'" in _error(capsys)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--algorithm", "bsvrb_v3"], "unknown algorithm 'bsvrb_v3'"),
    (["--algorithm", "bsvrb_v2", "--set", "lrr=1"], "unknown key 'lrr' (from --set)"),
    (["--algorithm", "bsvrb_v2", "--set", "lr=abc"], "hyper-parameter 'lr': expected float, got 'abc'"),
    (["--algorithm", "bsvrb_v2", "--set", "lr=-1"], "lr must be a finite number in (0.0, inf)"),
    (["--algorithm", "bsvrb_v2", "--set", "num_blocks=1.5"], "'num_blocks': expected int, got 1.5"),
    (["--algorithm", "bsvrb_v2", "--set", "stage_length=3"], "applies only to restarted algorithms"),
    (["--algorithm", "bsvrb_v2", "--set", "dtype=float16"], "bad value for dtype: 'float16'"),
    (["--algorithm", "bsvrb_v2", "--device", "nonsense"], "bad value for device: 'nonsense'"),
    (["--algorithm", "bsvrb_v2", "--dataset", "a8a"], "task 'quadratic' takes no --dataset"),
    (["--algorithm", "bsvrb_v2", "--set", "hyper=3"], "'hyper' must be a mapping"),
    (["--algorithm", "bsvrb_v2", "--set", "noequals"], "must have the form key=value"),
    (["--algorithm", "bsvrb_v2", "--config", "missing.yaml"], "no config file at missing.yaml"),
    (["--algorithm", "bsvrb_v2", "--set", "lr=nan"], "lr must be a finite number in (0.0, inf), got nan"),
    (["--algorithm", "bsvrb_v2", "--set", "eval_every=0"], "eval_every must be an integer in [1, inf), got 0"),
    (["--algorithm", "bsvrb_v2", "--set", "checkpoint_every=-2"], "checkpoint_every must be an integer"),
    (["--algorithm", "bsvrb_v2", "--seed", str(2**70)], "seed must be an integer in [0, 2**63 - 1]"),
    (["--algorithm", "bsvrb_v2", "--set", "seed=-1"], "seed must be an integer in [0, 2**63 - 1], got -1"),
    (["--algorithm", "bsvrb_v2", "--set", "seed=1.5"], "'seed': expected int, got 1.5"),
    (["--algorithm", "bsvrb_v2", "--set", "threads=0"], "threads must be an integer in [1, inf), got 0"),
    (["--algorithm", "bsvrb_v2", "--set", "block_strata=3"],
     "block_strata = 3 must divide the number of blocks m = 4 and block_batch B = 2"),
    (["--algorithm", "rsvrb", "--set", "block_strata=0"], "block_strata must be a positive integer, got 0"),
])
def test_bad_input_exits_2_with_message(extra: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUAD, "--iterations", "1", "--out", str(tmp_path / "bad"), *extra]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_empty_out_flag_and_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", ""]) == 2
    assert "out is empty" in _error(capsys)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(afile), "--overwrite"]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert afile.read_text() == "keep me"


def test_python_dash_m_mbbo_and_version() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mbbo", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"mbbo {cli.mbbo.__version__}"


def test_unknown_key_lists_valid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUAD, "--algorithm", "re_bsvrb_v2", "--set", "lrr=1", "--out", str(tmp_path / "k")]) == 2
    err = _error(capsys)
    for fragment in ("Did you mean lr?", "run options: task", "Task settings: num_blocks",
                     "Hyper-parameters of re_bsvrb_v2: block_batch", "Restart options: stage_length"):
        assert fragment in err


def test_missing_task_or_algorithm_and_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--algorithm", "bsvrb_v2"]) == 2
    assert "no task given" in _error(capsys)
    assert main(["run", "--task", "quadratic"]) == 2
    assert "no algorithm given" in _error(capsys)
    assert main(["run", "--task", "nope", "--algorithm", "bsvrb_v2"]) == 2
    assert "unknown task 'nope'" in _error(capsys)


def test_data_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--task", "hyperparam", "--dataset", "nosuch", "--data-dir", str(tmp_path),
                 "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(tmp_path / "d")]) == 2
    assert "nosuch" in _error(capsys)


def test_argparse_errors_help_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--iterations", "0"]) == 2
    assert "expected an integer >= 1" in capsys.readouterr().err
    assert main(["run", "--epochs", "1", "--iterations", "2"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["run", "--dtype", "float16"]) == 2
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert main([]) == 2


def test_divergence_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "40", "--out", str(tmp_path / "div"),
                 "--set", "lr=1e30"]) == 1
    assert "the run diverged" in _error(capsys)


def test_unexpected_errors_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(tmp_path / "u")])


def test_interrupt_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupt)
    assert main([*QUAD, "--algorithm", "bsvrb_v2", "--iterations", "1", "--out", str(tmp_path / "i")]) == 130
    assert "--resume" in capsys.readouterr().err


# --- plot and list --------------------------------------------------------------------------------------


def test_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for algorithm in ("bsvrb_v1", "bsvrb_v2"):
        out = tmp_path / algorithm
        assert main([*QUAD, "--algorithm", algorithm, "--iterations", "2", "--out", str(out)]) == 0
        runs.append(str(out))
    figure = tmp_path / "fig" / "grad.png"
    assert main(["plot", *runs, "--x", "oracle_calls", "--y", "grad_norm", "-o", str(figure), "--logy"]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {figure}" in capsys.readouterr().out
    assert main(["plot", *runs, "--y", "nope", "-o", str(figure)]) == 2
    assert "unknown metric 'nope'" in _error(capsys)
    assert main(["plot", str(tmp_path / "missing"), "--y", "grad_norm", "-o", str(figure)]) == 2
    assert "does not exist" in _error(capsys)


def test_list_prints_registered_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("hyperparam", "quadratic", "bsvrb_v1", "bsvrb_v2", "rsvrb", "ma_v1", "re_<name>",
                 "stage_length=1000", "a8a", "w8a", "breast_cancer", "num_blocks=100", "lr=0.001",
                 "grad_norm"):
        assert name in out
    assert main(["list", "datasets"]) == 0
    only = capsys.readouterr().out
    assert "breast_cancer" in only and "Tasks" not in only
    assert "diabetes" in only and "fourclass" in only and "svm_slack" in only


def test_run_help_names_the_settings_and_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    out = capsys.readouterr().out
    assert "hyperparam: dataset, num_blocks, batch_size" in out
    assert "`mbbo list algorithms`" in out and "`mbbo list tasks`" in out
    for name in registry.task_names():
        assert f"  {name}: " in out
