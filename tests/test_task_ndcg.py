from __future__ import annotations

import dataclasses

import pytest
import torch

import mbbo.tasks.ndcg as ndcg
from mbbo.ranking.trainer import RankingTrainer
from mbbo.tasks.ndcg import NDCGSettings, NDCGTask, build, load_split, popularity_ndcg

KS = (5, 10, 20, 50)


@pytest.fixture(scope="module")
def settings(shared_data, tmp_path_factory):
    return NDCGSettings(
        data_path=str(shared_data / "movielens" / "ml-100k" / "u.data"),
        warmup_epochs=1,
        warmup_cache=str(tmp_path_factory.mktemp("warm")),
    )


def test_split_popularity_anchor_and_epoch_length(settings):
    split = load_split(settings)
    assert split.summary()["users"] == 943 and split.n_items == 1682
    pop = popularity_ndcg(split, "test")
    assert pop["ndcg@10"] == pytest.approx(0.0657, abs=0.001)  # ndcg.md section 5, protocol A
    task = NDCGTask(split, settings)
    assert task.iterations_per_epoch() == 4  # ceil(943 / 256)


def test_build_warm_start_cache_and_short_training_beats_the_warm_start(settings, monkeypatch):
    trainer, task = build("ksong", settings, lr=5e-3, batch_size=256)
    assert isinstance(trainer, RankingTrainer) and trainer.topk == 20
    cached = list((ndcg.Path(settings.warmup_cache)).glob("warmup_*.pt"))
    assert len(cached) == 1
    assert set(task.warm_info["before_reset"]) == {f"{w}_ndcg@{k}" for w in ("dev", "test") for k in KS}
    start = task.evaluate(trainer)
    assert set(start) == {f"{w}_ndcg@{k}" for w in ("dev", "test") for k in KS}  # no train_loss before a step

    # the second method of the same seed reuses the cached warm start (the warm-up is not run again)
    def fail(*args, **kwargs):
        raise AssertionError("warm-up ran twice")

    monkeypatch.setattr(ndcg, "warmup", fail)
    other, _ = build("listnet", settings)
    for a, b in zip(trainer.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    monkeypatch.undo()

    torch.manual_seed(0)
    for _ in range(2 * task.iterations_per_epoch()):
        trainer.step()
    end = task.evaluate(trainer)
    assert "train_loss" in end
    # the head was re-initialised after the warm-up: two epochs of K-SONG recover a useful ranking
    assert end["dev_ndcg@10"] > start["dev_ndcg@10"] + 0.01
    assert end["test_ndcg@10"] > start["test_ndcg@10"] + 0.01


def test_settings_and_build_validation(settings):
    with pytest.raises(ValueError, match="method='sgd'"):
        build("sgd", settings)
    with pytest.raises(ValueError, match="warmup_lr"):
        build("song", {"warmup_lr": 0.0})
    with pytest.raises(ValueError, match="unknown NDCG setting"):
        build("song", {"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['bogus'\] for method 'song'"):
        build("song", settings, bogus=1)
    with pytest.raises(ValueError, match="ks="):
        NDCGSettings(ks=(0,)).validate()
    with pytest.raises(ValueError, match="head_init"):
        NDCGSettings(head_init="zeros").validate()
    with pytest.raises(ValueError, match=r"gamma0 must be a finite number in \(0\.0, 1\.0\], got 0\.0"):
        build("song", settings, gamma0=0.0)


def test_cli_runs_every_method_family_on_ml100k(shared_data, tmp_path) -> None:
    """`mbbo run --task ndcg --algorithm NAME` (tiny warm-up, two steps): a bilevel method and a baseline."""
    from mbbo.cli import main
    from mbbo.metrics_log import read_metrics
    from mbbo.tasks.registry import get_task

    data = str(shared_data / "movielens" / "ml-100k")
    for method in ("bsvrb_ndcg", "listnet"):
        out = tmp_path / method
        code = main(["run", "--task", "ndcg", "--algorithm", method, "--data-dir", data, "--iterations", "2",
                     "--eval-every", "2", "--out", str(out), "--no-progress",
                     "--set", "warmup_epochs=1", f"warmup_cache={tmp_path / 'cache'}"])
        assert code == 0
        records = read_metrics(out / "metrics.jsonl")
        assert records[-1]["iteration"] == 2 and 0.0 <= records[-1]["test_ndcg@10"] <= 1.0
        assert (out / "checkpoint.pt").is_file()
    assert "ksong" in get_task("ndcg").compatible_algorithms()
    assert main(["run", "--task", "ndcg", "--algorithm", "bsvrb_v2", "--data-dir", data, "--iterations", "1",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2


def test_ratings_without_dev_or_test_interactions_are_an_error(tmp_path):
    from mbbo.data.errors import DataError

    path = tmp_path / "u.data"  # every user rated one film: nothing for dev and test
    path.write_text("".join(f"{u}\t{u}\t4\t88125{u:04d}\n" for u in range(1, 30)))
    with pytest.raises(DataError, match=r"u\.data: no user has dev interactions .* every NDCG would be NaN"):
        load_split(NDCGSettings(data_path=str(path), warmup_cache=""))


def test_a_corrupt_warm_up_cache_is_recomputed(settings, tmp_path):
    local = dataclasses.replace(settings, warmup_cache=str(tmp_path))
    state, _ = ndcg.warm_start(load_split(local), local)
    (cached,) = tmp_path.glob("warmup_*.pt")
    cached.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="warm-up cache .* is unreadable .* recomputing it"):
        again, _ = ndcg.warm_start(load_split(local), local)
    for key in state:
        assert torch.equal(state[key], again[key])
    ndcg.load_checkpoint(cached)  # rewritten, readable again


def test_cli_methods_take_only_their_own_settings(tmp_path, capsys) -> None:
    """One config per method: `--set` names another method's field -> exit 2 naming the method's fields (before
    any data is loaded); the K-SONG variant options reach ksong; `mbbo list` shows each method's settings."""
    from mbbo.cli import main
    from mbbo.tasks.registry import get_task

    args = ["run", "--task", "ndcg", "--iterations", "1", "--no-progress", "--data-dir", str(tmp_path / "none")]
    assert main([*args, "--algorithm", "song", "--set", "eta0=1.0", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "eta0" in err and "gamma0" in err and "Hyper-parameters of song" in err
    assert main([*args, "--algorithm", "ksong", "--set", "lambda_step=sgd", "--out", str(tmp_path / "b")]) == 2
    assert "lambda_step must be one of 'moving_average', 'plain', got 'sgd'" in capsys.readouterr().err
    methods = get_task("ndcg").methods
    assert methods is not None and "psi_derivative" in {f.name for f in dataclasses.fields(methods["ksong"])}
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "hyper-parameters of ksong" in out and "lambda_step='moving_average'" in out
