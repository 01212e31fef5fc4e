import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_MODEL, mark_trained
from pipeline.stages import predict
from pipeline.data import rle
from pipeline.cli import app
from pipeline.data.io import InputError
from pipeline.data.artifacts import open_arrays
from pipeline.model.metrics import dice_per_image
from pipeline.model.checkpoints import CheckpointError, save_checkpoint
from pipeline.model.network import build_model
from pipeline.params import Params, PredictParams, TrainParams
from pipeline.data.artifacts import Thresholds
from pipeline.data.rle import SubmissionError

TINY = dataclasses.replace(TINY_MODEL, decoder_channels=(32, 16, 8))
SHAPE = (96, 128)  # the tiny dataset's native size


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two untrained tiny folds with different weights and normalisation."""
    root = tmp_path_factory.mktemp("models") / "train"
    for k in range(2):
        torch.manual_seed(k)
        save_checkpoint(root / f"fold_{k}" / "best.pt", build_model(TINY), TINY, {"mean": 0.3 + 0.1 * k, "std": 0.2})
    mark_trained(root)
    return root


def _thresholds(tmp_path, t: Thresholds):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(t.to_dict()))
    return path


def _run(tiny_interim, models, raw, tmp_path, t: Thresholds, p=PredictParams(batch_size=4)):
    return predict.run(Params(predict=p), interim=tiny_interim, models=models, thresholds=_thresholds(tmp_path, t),
                       raw=raw, out=tmp_path / "sub" / "submission.csv", metrics=tmp_path / "metrics.json")


def _truth(tiny_raw):
    table = pd.read_csv(tiny_raw / "truth" / "test_masks.csv", dtype=str, keep_default_na=False)
    return np.stack([rle.decode(x, SHAPE) for x in table.sort_values("img", key=lambda s: s.astype(int)).pixels])


def test_end_to_end_everything_foreground(tiny_interim, tiny_raw, models, tmp_path):
    metrics = _run(tiny_interim, models, tiny_raw, tmp_path, Thresholds(pixel=0.0, presence=0.0, min_area=0))
    path = tmp_path / "sub" / "submission.csv"
    assert rle.validate_submission(path, [str(i) for i in range(1, 7)], SHAPE) == 6
    lines = path.read_text().splitlines()
    assert lines == ["img,pixels"] + [f"{i},1 {96 * 128}" for i in range(1, 7)]  # sorted ids, full masks
    truth = _truth(tiny_raw)
    assert metrics["synthetic_test_dice"] == pytest.approx(dice_per_image(np.ones_like(truth), truth).mean(), abs=1e-5)
    assert metrics["synthetic_test_all_empty_dice"] == pytest.approx((~truth.any(axis=(1, 2))).mean(), abs=1e-5)
    assert metrics["predicted_empty"] == 0 and metrics["test_images"] == metrics["synthetic_test_images"] == 6
    assert metrics["models"] == 2 and metrics["tta_views"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left behind


def test_end_to_end_presence_gate_empties_everything(tiny_interim, tiny_raw, models, tmp_path):
    metrics = _run(tiny_interim, models, tiny_raw, tmp_path, Thresholds(pixel=0.0, presence=1.0, min_area=0))
    lines = (tmp_path / "sub" / "submission.csv").read_text().splitlines()
    assert lines == ["img,pixels"] + [f"{i}," for i in range(1, 7)]
    assert metrics["predicted_empty_fraction"] == 1.0
    assert metrics["synthetic_test_dice"] == metrics["synthetic_test_all_empty_dice"]


def test_no_truth_no_synthetic_score(tiny_interim, tiny_raw, models, tmp_path):
    raw = shutil.copytree(tiny_raw, tmp_path / "raw", ignore=shutil.ignore_patterns("truth"))
    metrics = _run(tiny_interim, models, raw, tmp_path, Thresholds(), PredictParams(tta_flip=False))
    assert not any(k.startswith("synthetic") for k in metrics) and metrics["tta_views"] == 1
    assert (tmp_path / "sub" / "submission.csv").exists()


def test_flip_tta_makes_predictions_mirror_symmetric(tiny_interim, models):
    images, _ = open_arrays(tiny_interim, "test")
    images = np.array(images[:3])
    ensemble = predict.Ensemble(models, torch.device("cpu"))
    for tta in (True, False):
        mask, presence = ensemble(images, tta)
        mask_m, presence_m = ensemble(images[..., ::-1], tta)
        same = torch.allclose(mask_m, mask.flip(-1), atol=1e-5) and torch.allclose(presence_m, presence, atol=1e-5)
        assert same == tta  # an untrained net is not symmetric by itself; TTA must un-flip its flipped view


def test_folds_are_averaged(tiny_interim, models, tmp_path):
    images = np.array(open_arrays(tiny_interim, "test")[0][:2])
    single = []
    for k in range(2):
        (tmp_path / str(k)).mkdir()
        shutil.copytree(models / f"fold_{k}", tmp_path / str(k) / f"fold_{k}")
        mark_trained(tmp_path / str(k))
        single.append(predict.Ensemble(tmp_path / str(k), torch.device("cpu"))(images, False))
    both = predict.Ensemble(models, torch.device("cpu"))(images, False)
    assert torch.allclose(both[0], (single[0][0] + single[1][0]) / 2, atol=1e-6)
    assert torch.allclose(both[1], (single[0][1] + single[1][1]) / 2, atol=1e-6)
    assert not torch.allclose(single[0][0], single[1][0], atol=1e-3)


def test_invalid_submission_is_an_error_and_never_written(tiny_interim, tiny_raw, models, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "submission.csv"
    out.parent.mkdir()
    out.write_text("previous\n")
    monkeypatch.setattr(predict.rle, "encode", lambda mask, order="F", start=1: "0 5")
    with pytest.raises(SubmissionError, match="start 0 is below 1"):
        _run(tiny_interim, models, tiny_raw, tmp_path, Thresholds())
    assert out.read_text() == "previous\n" and len(list(out.parent.iterdir())) == 1
    assert not (tmp_path / "metrics.json").exists()


def test_missing_inputs_are_clear_errors(tiny_interim, tiny_raw, models, tmp_path):
    with pytest.raises(InputError, match="folds.json: not found"):
        _run(tiny_interim, tmp_path / "nothing", tiny_raw, tmp_path, Thresholds())
    with pytest.raises(InputError, match="thresholds file not found"):
        predict.run(Params(), interim=tiny_interim, models=models, thresholds=tmp_path / "absent.json", raw=tiny_raw,
                    out=tmp_path / "s.csv", metrics=tmp_path / "m.json")
    wrong = tmp_path / "wrong"
    shutil.copytree(models, wrong / "train")
    save_checkpoint(wrong / "train" / "fold_1" / "best.pt", build_model(TINY), TrainParams(
        encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), height=32, width=32), {"mean": 0, "std": 1})
    with pytest.raises(CheckpointError, match="different sizes"):
        _run(tiny_interim, wrong / "train", tiny_raw, tmp_path, Thresholds())
    assert not (tmp_path / "sub").exists()


def test_predict_cli(tiny_interim, tiny_raw, models, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("predict:\n  tta_flip: false\n  batch_size: 5\n")
    args = ["predict", "--interim", str(tiny_interim), "--models", str(models),
            "--thresholds", str(_thresholds(tmp_path, Thresholds())), "--raw", str(tiny_raw),
            "--out", str(tmp_path / "s.csv"), "--metrics", str(tmp_path / "m.json"), "--params", str(params)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "synthetic_test_dice:" in result.output and "tta_views: 1" in result.output
    assert rle.validate_submission(tmp_path / "s.csv", [str(i) for i in range(1, 7)], SHAPE) == 6
    args[args.index("--models") + 1] = str(tmp_path / "none")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "folds.json: not found" in result.output and "Traceback" not in result.output


def test_submission_masks_are_postprocess_apply_with_the_component_rules(tiny_interim, tiny_raw, models, tmp_path,
                                                                         monkeypatch):
    """predict writes exactly `postprocess.apply` of its native probabilities, component rules included."""
    from pipeline.model import postprocess
    from pipeline.data.artifacts import read_manifest

    native = []
    real = predict.to_native
    monkeypatch.setattr(predict, "to_native", lambda *a, **k: native.append(real(*a, **k)) or native[-1])
    _run(tiny_interim, models, tiny_raw, tmp_path, Thresholds(), PredictParams(batch_size=4, tta_flip=False))
    prob = torch.cat(native).numpy()
    test = read_manifest(tiny_interim).query("split == 'test'").sort_values("row")
    pixel = float(np.quantile(prob, 0.8))  # an untrained net: speckled masks, many components
    rules = Thresholds(pixel=pixel, presence=0.0, min_area=0, keep_largest=True, min_component=0.001)
    native.clear()
    _run(tiny_interim, models, tiny_raw, tmp_path, rules, PredictParams(batch_size=4, tta_flip=False))
    assert np.array_equal(torch.cat(native).numpy(), prob)  # the same probabilities both times
    written = pd.read_csv(tmp_path / "sub" / "submission.csv", dtype=str, keep_default_na=False).set_index("img")
    masks = np.stack([rle.decode(written.loc[i, "pixels"], SHAPE) for i in test.id])
    expected = postprocess.apply(prob, np.zeros(len(prob), np.float32), rules)
    assert np.array_equal(masks, expected)
    plain = prob > pixel
    assert (masks.sum(axis=(1, 2)) < plain.sum(axis=(1, 2))).all() and masks.any(axis=(1, 2)).all()  # rules acted
