"""The ML-100K NDCG experiment and its dev-set tuning script (`experiments/ndcg_ml100k*.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k" / "u.data"


@pytest.fixture(scope="module")
def scripts():
    """``(ndcg_ml100k, ndcg_ml100k_tuning)`` as modules (the folder is not a package)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import ndcg_ml100k
        import ndcg_ml100k_tuning
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return ndcg_ml100k, ndcg_ml100k_tuning


def test_parse_overrides_types_and_grouping(scripts):
    main, _ = scripts
    out = main.parse_overrides(["ksong.psi_alpha=1", "ksong.topk_version=prac", "song.gamma0=0.5",
                                "bsvrb_ndcg.lr_decay_epochs=[30, 60]"])
    assert out == {"ksong": {"psi_alpha": 1, "topk_version": "prac"}, "song": {"gamma0": 0.5},
                   "bsvrb_ndcg": {"lr_decay_epochs": [30, 60]}}
    assert main.parse_overrides([]) == {}


@pytest.mark.parametrize(
    ("item", "message"),
    [("ksong.psi_alpha", "METHOD.FIELD=VALUE"), ("psi_alpha=1", "METHOD.FIELD=VALUE"),
     ("kson.eta0=1", "method 'kson'"), ("ksong.foo=1", "field 'foo'"), ("ksong.seed=3", "field 'seed'"),
     ("song.eta0=1", "field 'eta0' of 'song'"), ("ksong_reference.gamma_m=0.1", "field 'gamma_m' of 'ksong'")],
)
def test_parse_overrides_errors_name_the_item(scripts, item, message):
    main, _ = scripts
    with pytest.raises(ValueError, match=message):
        main.parse_overrides([item])


def test_hparams_apply_overrides_to_their_method_only(scripts):
    main, _ = scripts
    args = {"lr": 5e-3, "eta0": 1.0, "tau1": 0.1, "overrides": {"ksong": {"eta0": 0.5, "psi_alpha": 1.0}}}
    assert main._hparams(args, "ksong") == {"lr": 5e-3, "eta0": 0.5, "tau1": 0.1, "psi_alpha": 1.0}
    assert main._hparams(args, "song") == {"lr": 5e-3, "eta0": 1.0, "tau1": 0.1}
    assert main._hparams({"lr": 1e-3, "eta0": 1.0, "tau1": 0.1}, "song")["lr"] == 1e-3  # no overrides key
    # what reaches the trainer: only the fields the method has
    assert main._method_hparams(args, "song") == {"lr": 5e-3}
    assert main._method_hparams(args, "ksong") == main._hparams(args, "ksong")


def test_ksong_variants_are_rows_of_ksong_with_fixed_settings(scripts):
    """The reference form and the one-factor ablation: each row is K-SONG with its fixed settings (part of the
    run's key), and a row's --set override applies to that row only."""
    main, _ = scripts
    args = {"lr": 5e-3, "eta0": 1.0, "tau1": 0.1, "overrides": main.parse_overrides(["ksong_reference.gamma1=0.5"])}
    assert main.base_method("ksong_reference") == "ksong" and main.base_method("song") == "song"
    assert main._hparams(args, "ksong_reference") == {"lr": 5e-3, "eta0": 1.0, "tau1": 0.1, "init": "zero",
                                                      "lambda_step": "plain", "psi_derivative": "reference",
                                                      "gamma1": 0.5}
    assert main._hparams(args, "ksong_zero_init")["init"] == "zero"
    assert "gamma1" not in main._hparams(args, "ksong_zero_init")
    reference = main.VARIANTS["ksong_reference"][1]
    ablation = [main.VARIANTS[m][1] for m in main.VARIANTS if m != "ksong_reference"]
    assert all(len(a) == 1 for a in ablation)  # one factor each
    assert {k: v for a in ablation for k, v in a.items()} == reference  # together: the reference form
    from mbbo.ranking.configs import method_config

    for label, (method, fixed) in main.VARIANTS.items():  # every variant is a valid config
        assert method_config(method, **fixed).init == fixed.get("init", "first_sample"), label
    assert set(main.VARIANTS) <= set(main.TABLE_ORDER) and set(main.VARIANTS) <= set(main.METHOD_ORDER)


def test_choose_epochs_even_and_capped(scripts):
    main, _ = scripts
    measured = [{"train_wall": 1.0, "eval_wall": 0.5}, {"train_wall": 2.0, "eval_wall": 0.5}]
    epochs, per_epoch = main.choose_epochs(measured, n_seeds=3, workers=2, remaining=600.0)
    assert per_epoch == pytest.approx(4.0 * 3 / 1.6)
    assert epochs == 80 and epochs % 2 == 0
    assert main.choose_epochs(measured, 3, 2, 1e9)[0] == 120
    assert main.choose_epochs(measured, 3, 2, 1.0)[0] == 2


def test_parse_candidate_and_labels(scripts):
    _, tuning = scripts
    assert tuning.parse_candidate("song") == ("song", {})
    assert tuning.parse_candidate("ksong.psi_alpha=1,topk_version=prac") == (
        "ksong", {"psi_alpha": 1, "topk_version": "prac"})
    assert tuning.candidate_label("ksong", {"topk_version": "prac", "psi_alpha": 1}) == (
        "ksong(psi_alpha=1, topk_version=prac)")
    assert tuning.candidate_label("song", {}) == "song"
    for bad, message in (("sng", "method must be one of"), ("ksong.", "nothing after"), ("ksong.bad=1", "'bad'")):
        with pytest.raises(ValueError, match=message):
            tuning.parse_candidate(bad)


def test_candidate_dirs_separate_overrides(scripts, tmp_path: Path):
    _, tuning = scripts
    a = tuning.candidate_dir(tmp_path, "ksong", {"psi_alpha": 1, "eta0": 0.5})
    assert a == tuning.candidate_dir(tmp_path, "ksong", {"eta0": 0.5, "psi_alpha": 1})  # order-free
    assert a != tuning.candidate_dir(tmp_path, "ksong", {"psi_alpha": 2, "eta0": 0.5})
    assert a.parent == tmp_path and a.name.startswith("ksong_")


def test_summarise_means_and_ranks_by_dev(scripts):
    _, tuning = scripts
    runs = [
        {"method": "ksong", "overrides": {}, "seed": 0, "best_dev_ndcg@5": 0.08, "best_epoch": 10, "test_ndcg@10": 0.5},
        {"method": "ksong", "overrides": {}, "seed": 1, "best_dev_ndcg@5": 0.10, "best_epoch": 20, "test_ndcg@10": 0.1},
        {"method": "ksong", "overrides": {"psi_alpha": 1}, "seed": 0, "best_dev_ndcg@5": 0.095, "best_epoch": 4,
         "test_ndcg@10": 0.0},
        {"method": "song", "overrides": {}, "seed": 0, "best_dev_ndcg@5": 0.2, "best_epoch": 1, "test_ndcg@10": 0.2},
    ]
    rows = tuning.summarise(runs)
    assert [r["candidate"] for r in rows] == ["ksong(psi_alpha=1)", "ksong", "song"]  # by method, then dev
    plain = rows[1]
    assert plain["seeds"] == [0, 1]
    assert plain["dev_ndcg@5_mean"] == pytest.approx(0.09) and plain["dev_ndcg@5_std"] == pytest.approx(0.01)
    assert plain["test_ndcg@10_mean"] == pytest.approx(0.3) and plain["best_epoch_mean"] == 15
    assert tuning._cell(plain, "dev_ndcg@5") == "0.0900 ± 0.0100"
    assert tuning._cell(rows[0], "dev_ndcg@5") == "0.0950"  # one seed: no spread


@pytest.mark.skipif(not ML100K.is_file(), reason="shared ML-100K data not present")
def test_scripts_end_to_end_on_ml100k(scripts, tmp_path: Path):
    """Two epochs of SONG and K-SONG (one with a --set override) after a one-epoch warm-up, then one tuning
    candidate reusing the warm-up cache: the files are written and the override reaches the trainer."""
    main, tuning = scripts
    common = ["--data", str(ML100K), "--seeds", "0", "--warmup-epochs", "1", "--workers", "1"]
    work, out = tmp_path / "work", tmp_path / "out"
    assert main.main([*common, "--methods", "song", "ksong", "ksong_reference", "--epochs", "2", "--work-dir",
                      str(work), "--out", str(out), "--tag", "t", "--set", "ksong.psi_alpha=1.5"]) == 0
    for suffix in ("_table.csv", "_table.md", "_metrics.json", "_curves.png"):
        assert (out / f"t{suffix}").is_file()
    table = (out / "t_table.md").read_text()
    assert "Per-method settings" in table and "psi_alpha = 1.5" in table
    ksong = json.loads((work / "ksong_seed0" / "result.json").read_text())
    assert ksong["key"]["psi_alpha"] == 1.5 and ksong["epochs"] == 2 and len(ksong["curve"]) == 3
    assert "psi_alpha" not in json.loads((work / "song_seed0" / "result.json").read_text())["key"]
    reference = json.loads((work / "ksong_reference_seed0" / "result.json").read_text())
    assert reference["key"]["lambda_step"] == "plain" and "psi_alpha" not in reference["key"]
    assert reference["test"] != ksong["test"]
    assert "K-SONG, reference form" in table and "lambda_step = plain" in table
    # --reuse-only: no training; the finished runs are reported and the missing ones listed
    assert main.main([*common, "--methods", "song", "ksong_reference", "listnet", "--epochs", "2", "--work-dir",
                      str(work), "--out", str(out), "--tag", "r", "--reuse-only"]) == 0
    assert not (work / "listnet_seed0").exists()
    reused = (out / "r_table.md").read_text()
    assert "| SONG | 0 |" in reused and "Not run (`--reuse-only`): ListNet seed 0." in reused
    assert json.loads((out / "r_metrics.json").read_text())["missing_runs"] == [["listnet", 0]]

    assert tuning.main([*common, "--epochs", "2", "--candidate", "song.gamma0=0.5", "--work-dir",
                        str(tmp_path / "tune"), "--warmup-cache", str(work / "warmup_cache"), "--out", str(out),
                        "--tag", "tune"]) == 0
    summary = json.loads((out / "tune.json").read_text())
    assert [r["candidate"] for r in summary["rows"]] == ["song(gamma0=0.5)"]
    assert 0.0 < summary["rows"][0]["dev_ndcg@5_mean"] < 1.0
    assert "song(gamma0=0.5)" in (out / "tune.md").read_text()


def test_task_defaults_are_the_committed_experiments_settings():
    """`mbbo run --task ndcg` with no --set runs what the results page reports (not the papers' ML-20M values)."""
    from mbbo.ranking.configs import METHOD_CONFIGS, TOPK_METHODS
    from mbbo.tasks.ndcg import NDCGSettings

    committed = json.loads((EXPERIMENTS / "results" / "ndcg_ml100k_metrics.json").read_text())["settings"]
    settings = NDCGSettings()
    for method, cls in METHOD_CONFIGS.items():
        config = cls()
        for name in ("lr", "lr_decay", "epochs", "batch_size", "num_pos", "num_neg"):
            assert getattr(config, name) == committed[name], (method, name)
        assert config.decay_epochs() == (committed["lr_decay_epoch"],)
    for method in TOPK_METHODS:
        config = METHOD_CONFIGS[method]()
        assert (config.eta0, config.tau1, config.topk) == (committed["eta0"], committed["tau1"], committed["topk"])
    assert (settings.warmup_epochs, settings.warmup_lr) == (committed["warmup_epochs"], committed["warmup_lr"])


def test_finished_run_is_found_through_another_path_to_the_same_data(scripts, tmp_path):
    """A run recorded with the data's path through a symlink is reused; another file or setting is not."""
    main, _ = scripts
    real = tmp_path / "data" / "u.data"
    real.parent.mkdir()
    real.write_text("1\t1\t5\t0\n")
    (tmp_path / "link").symlink_to(real.parent)
    args = {"work_dir": str(tmp_path / "work"), "lr": 5e-3, "eta0": 1.0, "tau1": 0.1, "warmup_epochs": 40,
            "warmup_lr": 5e-3, "data": str(tmp_path / "link" / "u.data"), "overrides": {}}
    run_dir = tmp_path / "work" / "song_seed0"
    run_dir.mkdir(parents=True)
    key = main._run_key({**args, "data": str(real)}, "song", 0, 120)
    (run_dir / "result.json").write_text(json.dumps({"key": key, "test": {}}))
    assert main.finished_run(args, "song", 0, 120) is not None
    assert main.finished_run(args, "song", 0, 60) is None
    other = tmp_path / "data" / "other.data"
    other.write_text("")
    assert main.finished_run({**args, "data": str(other)}, "song", 0, 120) is None
