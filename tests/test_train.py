"""The train stage: folds, loss, metrics, outputs, resuming, and its failure modes, on a tiny dataset."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_TRAIN as TINY, run_train
from pipeline.stages import train
from pipeline.cli import app
from pipeline.params import Params, TrainParams


def _run(t: TrainParams, train_inputs: dict[str, Path], out: Path, manifest: Path | None = None) -> dict:
    return run_train(Params(seed=5, train=t), train_inputs, out, manifest)


# ---------------------------------------------------------------- folds

def test_folds_never_put_a_subject_on_both_sides() -> None:
    subjects = np.repeat(np.arange(12), np.random.default_rng(0).integers(5, 40, 12)).astype(str)
    folds = train.subject_folds(subjects, 4, seed=42)
    for k in range(4):
        assert not set(subjects[folds == k]) & set(subjects[folds != k])
    assert set(folds.tolist()) == {0, 1, 2, 3}
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 40  # greedy balancing: within one subject's size
    assert np.array_equal(folds, train.subject_folds(subjects, 4, seed=42))


def test_more_folds_than_subjects_is_an_error() -> None:
    with pytest.raises(train.TrainingError, match="train.folds"):
        train.subject_folds(np.array(["1", "1", "2"]), 3, seed=0)


# ---------------------------------------------------------------- EMA and metrics

def test_ema_follows_the_weights_by_hand_with_buffers_and_warm_up() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = train.Ema(model, 0.99)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in initial.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for n in range(3):
        (model(torch.randn(8, 3)) - 1).pow(2).mean().backward()  # training mode: BatchNorm statistics move too
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    moved = [k for k, v in model.state_dict().items()
             if v.is_floating_point() and (v - initial[k]).abs().max() > 1e-3]
    # BatchNorm normalises the Linear output, so the Linear layer gets (almost) no gradient: whether
    # its weights move at all is down to rounding, which differs between CPUs. Check the rest.
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(moved)
    for k, v in ema.model.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        if k in moved:  # an average, not the weights: it lags behind them by far more than rounding
            assert (v - model.state_dict()[k]).abs().max() > 1e-4, k
    assert ema.model.state_dict()["1.num_batches_tracked"] == 3
    again = train.Ema(model, 0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 3 and all(torch.equal(v, ema.model.state_dict()[k])
                                      for k, v in again.model.state_dict().items())


def test_presence_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert train.presence_auc(scores, labels) == pytest.approx(pairs)
    assert train.presence_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert math.isnan(train.presence_auc(np.array([0.1, 0.9]), np.array([True, True])))


def test_evaluate_gates_masks_by_presence_and_reports_the_empty_baseline() -> None:
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[0, :4] = truth[1, :4] = 1
    probs = np.zeros((4, 8, 8), np.float16)
    probs[0, :4] = probs[1, :4] = probs[2, :4] = 0.9  # image 2: a false mask, but presence says no
    presence = np.array([0.9, 0.2, 0.1, 0.1], np.float32)  # image 1: presence misses it
    m = train.evaluate(probs, presence, truth)
    assert m["dice"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert m["dice_tuned"] == pytest.approx(1.0)  # a presence threshold in (0.1, 0.2] gets all four right
    assert m["empty_dice"] == pytest.approx(0.5)
    assert m["presence_acc"] == pytest.approx(0.75)


def test_pixel_stats_are_exact() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 30), dtype=np.uint8)
    stats = train.pixel_stats(images, chunk=2)
    assert stats["mean"] == pytest.approx(images.mean() / 255)
    assert stats["std"] == pytest.approx(images.std() / 255)


# ---------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def trained(train_inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One uninterrupted tiny run, shared by the output checks and as the resume reference."""
    out = tmp_path_factory.mktemp("trained")
    return out, _run(TINY, train_inputs, out)


def test_stage_writes_checkpoints_oof_and_dvclive_metrics(train_inputs, trained) -> None:
    out, summary = trained
    state = torch.load(out / "models" / "fold_0" / "best.pt", weights_only=True)  # plain data only
    assert state["config"]["encoder_depth"] == 3 and set(state["norm"]) == {"mean", "std"}
    assert sorted(p.name for p in (out / "models" / "fold_0").iterdir()) == ["best.pt", "done.json"]
    oof = np.load(out / "oof" / "oof.npz")
    assert set(oof.files) == {"ids", "mask_prob", "presence_prob"}
    n = len(oof["ids"])
    assert oof["mask_prob"].shape == (n, 64, 64) and oof["mask_prob"].dtype == np.float16
    assert oof["presence_prob"].shape == (n,) and oof["presence_prob"].dtype == np.float32
    manifest = pd.read_csv(train_inputs["manifest"], dtype={"id": str})
    val_subjects = set(manifest.set_index("id").loc[oof["ids"], "subject"])
    assert len(val_subjects) == 1 and n == (manifest.subject == next(iter(val_subjects))).sum()
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert {"dice", "empty_dice", "dice_gain", "presence_acc", "presence_auc"} <= set(metrics)
    truth = np.load(train_inputs["interim"] / "train_masks.npy")[manifest.set_index("id").loc[oof["ids"], "row"]]
    assert metrics["empty_dice"] == pytest.approx((truth.reshape(n, -1).max(1) == 0).mean(), abs=1e-4)
    curve = (out / "reports" / "plots" / "metrics" / "fold_0" / "val_dice.tsv").read_text().splitlines()
    assert curve[0] == "step\tval_dice" and len(curve) == 1 + TINY.epochs
    assert summary["dice"] == metrics["dice"]


def _interrupted_in_epoch_two(monkeypatch, t, train_inputs, out) -> None:
    """Run train with a KeyboardInterrupt in the second epoch, then put the real epoch back."""
    real, calls = train.train_epoch, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _run(t, train_inputs, out)
    monkeypatch.setattr(train, "train_epoch", real)


def test_resume_after_interruption_ends_with_the_same_weights(train_inputs, trained, tmp_path, monkeypatch,
                                                              capsys) -> None:
    _interrupted_in_epoch_two(monkeypatch, TINY, train_inputs, tmp_path)
    killed = torch.load(tmp_path / "models" / "fold_0" / "last.pt", weights_only=True)
    assert killed["epoch"] == 1 and {"optimizer", "scheduler", "rng"} <= set(killed)  # mid-fold: all to resume
    _run(TINY, train_inputs, tmp_path)
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err
    assert not (tmp_path / "models" / "fold_0" / "last.pt").exists()  # finished: removed
    whole = torch.load(trained[0] / "models" / "fold_0" / "best.pt", weights_only=True)
    cut = torch.load(tmp_path / "models" / "fold_0" / "best.pt", weights_only=True)
    assert whole["epoch"] == cut["epoch"] and whole["model"].keys() == cut["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    losses = [[(row["train_loss"], row["val_loss"]) for row in json.loads((d / "models" / "fold_0" / "done.json")
                                                                      .read_text())["history"]]
              for d in (trained[0], tmp_path)]
    assert losses[0] == losses[1]  # every epoch trained the same, the last one too
    a, b = np.load(trained[0] / "oof" / "oof.npz"), np.load(tmp_path / "oof" / "oof.npz")
    assert np.array_equal(a["mask_prob"], b["mask_prob"])
    curve = (tmp_path / "reports" / "plots" / "metrics" / "fold_0" / "val_dice.tsv").read_text()
    assert len(curve.splitlines()) == 1 + TINY.epochs  # the resumed run re-logs the epoch it did not train


def test_ema_saves_the_average_and_resumes_to_the_same_weights(train_inputs, trained, tmp_path, monkeypatch) -> None:
    """With train.ema on, best.pt holds the weight average (not the trained weights), and a run killed
    after epoch 1 resumes with the average's state from last.pt, ending bit-identical."""
    t = dataclasses.replace(TINY, ema=0.9)
    real, raw = train.train_epoch, []

    def keep_raw(*args, **kwargs):
        loss = real(*args, **kwargs)
        raw.append({k: v.clone() for k, v in args[0].state_dict().items()})  # the trained weights per epoch
        return loss

    monkeypatch.setattr(train, "train_epoch", keep_raw)
    _run(t, train_inputs, tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "models" / "fold_0" / "best.pt", weights_only=True)
    trained_then = raw[whole["epoch"] - 1]
    assert whole["model"].keys() == trained_then.keys()
    assert any(not torch.equal(v, trained_then[k]) for k, v in whole["model"].items()
               if v.is_floating_point())  # the average, not the trained weights

    monkeypatch.setattr(train, "train_epoch", real)
    _interrupted_in_epoch_two(monkeypatch, t, train_inputs, tmp_path / "cut")
    killed = torch.load(tmp_path / "cut" / "models" / "fold_0" / "last.pt", weights_only=True)
    assert killed["ema"]["updates"] > 0 and killed["ema"]["model"].keys() == killed["model"].keys()
    _run(t, train_inputs, tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "models" / "fold_0" / "best.pt", weights_only=True)
    assert cut["epoch"] == whole["epoch"]
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    plain = torch.load(trained[0] / "models" / "fold_0" / "best.pt", weights_only=True)
    assert any(not torch.equal(v, plain["model"][k]) for k, v in whole["model"].items() if v.is_floating_point())


def test_finished_fold_keeps_only_best_and_a_small_marker(trained) -> None:
    """Once a fold is done only best.pt (prediction) and done.json (its hash and history tell a re-run
    the fold is finished) stay: no last.pt, no optimizer, scheduler or RNG state anywhere."""
    fold = trained[0] / "models" / "fold_0"
    best = torch.load(fold / "best.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "rng"} & set(best), sorted(best)
    done = json.loads((fold / "done.json").read_text())
    assert done["epoch"] == TINY.epochs and len(done["history"]) == TINY.epochs and done["run_hash"]
    assert len(done["diagnostics"]["epochs"]) == TINY.epochs
    weights = sum(v.numel() * v.element_size() for v in best["model"].values())
    assert (fold / "best.pt").stat().st_size < 1.2 * weights
    assert (fold / "done.json").stat().st_size < 0.05 * weights


def test_rerun_with_the_same_inputs_skips_the_finished_fold(train_inputs, trained, tmp_path, monkeypatch,
                                                            capsys) -> None:
    shutil.copytree(trained[0] / "models", tmp_path / "models")
    before = {p.name: p.read_bytes() for p in (tmp_path / "models" / "fold_0").iterdir()}
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    summary = _run(TINY, train_inputs, tmp_path)
    err = capsys.readouterr().err
    assert f"resuming after epoch {TINY.epochs} of {TINY.epochs}" in err and "starting this fold over" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "models" / "fold_0").iterdir()} == before
    assert summary["dice"] == trained[1]["dice"]
    a, b = np.load(trained[0] / "oof" / "oof.npz"), np.load(tmp_path / "oof" / "oof.npz")
    assert np.array_equal(a["mask_prob"], b["mask_prob"])


def test_unknown_encoder_is_one_clear_error_before_any_work(train_inputs, tmp_path) -> None:
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match=r"train.encoder: unknown encoder 'resnet81'; did you mean resnet18"):
        train.run(Params(seed=5, train=dataclasses.replace(TINY, encoder="resnet81")), interim=tmp_path / "missing",
                  manifest=tmp_path / "missing.csv", augment=train_inputs["augment"], plan=train_inputs["plan"],
                  models=tmp_path / "models",
                  oof=tmp_path / "oof", reports=tmp_path / "reports")
    assert not (tmp_path / "models").exists()


def test_changed_params_start_over_instead_of_resuming(train_inputs, trained, tmp_path, capsys) -> None:
    shutil.copytree(trained[0] / "models", tmp_path / "models")
    _run(dataclasses.replace(TINY, lr=1e-3), train_inputs, tmp_path)
    err = capsys.readouterr().err
    assert "other train params or inputs; starting this fold over" in err and "resuming" not in err
    done = [json.loads((d / "models" / "fold_0" / "done.json").read_text()) for d in (trained[0], tmp_path)]
    assert len(done[1]["history"]) == TINY.epochs and done[1]["run_hash"] != done[0]["run_hash"]
    assert done[1]["history"][0]["lr"] != done[0]["history"][0]["lr"]  # trained again, at the new rate


def test_non_finite_loss_stops_with_a_clear_error(train_inputs, tmp_path, monkeypatch) -> None:
    real = train.compute_loss
    monkeypatch.setattr(train, "compute_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(train.TrainingError, match=r"fold 0 epoch 1/2: the loss became nan"):
        _run(TINY, train_inputs, tmp_path)


def test_cli_prints_training_errors_without_a_traceback(train_inputs, tmp_path) -> None:
    manifest = pd.read_csv(train_inputs["manifest"], dtype={"id": str})
    manifest[manifest.subject == manifest.subject.iloc[0]].to_csv(tmp_path / "one_subject.csv", index=False)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  folds: 3\n  train_folds: 1\n")
    result = CliRunner().invoke(app, ["train", "--interim", str(train_inputs["interim"]), "--manifest",
                                      str(tmp_path / "one_subject.csv"), "--augment", str(train_inputs["augment"]),
                                      "--plan", str(train_inputs["plan"]), "--models", str(tmp_path / "m"),
                                      "--oof", str(tmp_path / "o"), "--reports", str(tmp_path / "r"),
                                      "--params", str(params)])
    assert result.exit_code == 1
    assert "error: train.folds: 3 folds need at least 3 subjects, the data has 1" in result.output
    assert "Traceback" not in result.output


def test_deep_supervision_trains_saves_the_plain_model_and_resumes_to_the_same_weights(train_inputs, tmp_path,
                                                                                      monkeypatch) -> None:
    """With train.deep_supervision the side heads train with the model and are kept in last.pt (a killed run
    resumes bit-identical), while best.pt holds only the U-Net, which loads into a plain model."""
    from pipeline.model.network import build_model

    t = dataclasses.replace(TINY, deep_supervision=True)
    _run(t, train_inputs, tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "models" / "fold_0" / "best.pt", weights_only=True)
    build_model(t).load_state_dict(whole["model"])  # strict: no side-head keys
    _interrupted_in_epoch_two(monkeypatch, t, train_inputs, tmp_path / "cut")
    killed = torch.load(tmp_path / "cut" / "models" / "fold_0" / "last.pt", weights_only=True)
    assert any(k.startswith("heads.") for k in killed["model"])
    _run(t, train_inputs, tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "models" / "fold_0" / "best.pt", weights_only=True)
    assert cut["epoch"] == whole["epoch"] and cut["model"].keys() == whole["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key


def test_checkpoint_keeps_the_best_or_the_last_epoch_of_one_training(train_inputs, tmp_path) -> None:
    """`train.checkpoint` picks which epoch's weights the fold keeps as best.pt, and nothing else: the two
    runs train alike (same history), best keeps the first epoch with the highest tuned validation Dice,
    last the final epoch."""
    kept = {}
    for choice in ("best", "last"):
        _run(dataclasses.replace(TINY, epochs=3, checkpoint=choice), train_inputs, tmp_path / choice)
        fold = tmp_path / choice / "models" / "fold_0"
        history = json.loads((fold / "done.json").read_text())["history"]
        kept[choice] = (torch.load(fold / "best.pt", weights_only=True)["epoch"], history)
    (best_epoch, history), (last_epoch, again) = kept["best"], kept["last"]
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in again], rel=1e-5)
    scores = [r["val_dice_tuned"] for r in history]
    assert best_epoch == 1 + int(np.argmax(scores)) and last_epoch == 3
