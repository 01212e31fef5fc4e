import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 3\nsynth:\n  subjects: 2\n  frames_per_subject: 3\n  test_images: 2\n"
                    "  height: 64\n  width: 80\n")
    return path


def test_help_lists_every_stage_in_pipeline_order():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    stages = ("synth", "load", "dedup", "clean", "augment", "train", "tune", "predict", "validate", "report")
    listed = [m.group(1) for m in re.finditer(r"^\W*(\w+)\s{2,}\S", result.output, re.MULTILINE)]
    assert [name for name in listed if name in stages] == list(stages), listed


def test_validate_takes_the_image_size_from_the_test_images(params, tmp_path):
    """64x80 test images: a run ending at pixel 5120 fits, one past it does not (420x580 would take both)."""
    raw = tmp_path / "raw"
    assert runner.invoke(app, ["synth", "--out", str(raw), "--params", str(params)]).exit_code == 0
    ids = sorted(int(p.stem) for p in (raw / "test").glob("*.tif"))
    for end, code in ((5120, 0), (5121, 1)):
        sub = tmp_path / f"sub{end}.csv"
        sub.write_text("img,pixels\n" + "".join(f"{i},{end - 9} 10\n" for i in ids))
        result = runner.invoke(app, ["validate", str(sub), "--test-dir", str(raw / "test"), "--params", str(params)])
        assert result.exit_code == code, result.output
    assert "ends past the image (5120 pixels)" in result.output  # the size came from the 64x80 images


def test_synth_then_load(params, tmp_path):
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["synth", "--out", str(raw), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "train_images: 6" in result.output
    result = runner.invoke(app, ["load", "--raw", str(raw), "--out", str(tmp_path / "interim"),
                                 "--metrics", str(tmp_path / "m.json"), "--fingerprint", str(tmp_path / "fp.json"),
                                 "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "interim" / "manifest.csv").exists()


def test_bad_params_is_one_clear_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("synth:\n  subjects: -1\n")
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--params", str(bad)])
    assert result.exit_code == 1
    assert "synth.subjects" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_bad_input_is_one_clear_line(params, tmp_path):
    result = runner.invoke(app, ["load", "--raw", str(tmp_path / "absent"), "--out", str(tmp_path / "o"),
                                 "--metrics", str(tmp_path / "m.json"), "--fingerprint", str(tmp_path / "fp.json"),
                                 "--params", str(params)])
    assert result.exit_code == 1
    assert "absent" in result.output and "Traceback" not in result.output


def test_module_entry_point_help_is_fast_and_works():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "load" in out.stdout
    heavy = subprocess.run([sys.executable, "-c", "import pipeline.cli, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert heavy.stdout.strip() == "False", "importing the CLI must not import torch"


def _interim_with_test_ids(tiny_interim, tmp_path, ids):
    """A copy of the loaded tiny dataset whose test images have the given ids."""
    import shutil

    import pandas as pd

    interim = tmp_path / "interim"
    shutil.copytree(tiny_interim, interim)
    manifest = pd.read_csv(interim / "manifest.csv", dtype=str, keep_default_na=False)
    test = manifest.index[manifest.split == "test"]
    manifest.loc[test, "id"] = ids
    manifest.to_csv(interim / "manifest.csv", index=False)
    return interim


def _predict(interim, models, tmp_path, data):
    from pipeline.stages import predict
    from pipeline.params import Params, PredictParams

    (tmp_path / "thresholds.json").write_text('{"pixel": 0.5, "presence": 0.5, "min_area": 0}')
    (tmp_path / "raw").mkdir(exist_ok=True)  # no truth/: nothing to score against
    return predict.run(Params(predict=PredictParams(batch_size=4), data=data), interim=interim, models=models,
                       thresholds=tmp_path / "thresholds.json", raw=tmp_path / "raw", out=tmp_path / "sub.csv",
                       metrics=tmp_path / "m.json")


def test_predict_refuses_an_unwritable_id_before_loading_any_model(tiny_interim, tmp_path):
    """The ultrasound layout's numeric-id rule, checked up front: the error names the id and the manifest,
    not the submission's temporary file, and comes before the (here missing) checkpoints are looked at."""
    from pipeline.params import DataParams
    from pipeline.data.rle import SubmissionError

    interim = _interim_with_test_ids(tiny_interim, tmp_path, ["1", "2", "3a", "4", "5", "6"])
    with pytest.raises(SubmissionError) as info:
        _predict(interim, tmp_path / "no_models", tmp_path, DataParams(layout="ultrasound"))
    text = str(info.value)
    assert "id '3a' is not a numeric id" in text and str(interim / "manifest.csv") in text
    assert ".tmp" not in text and not (tmp_path / "sub.csv").exists() and not (tmp_path / "m.json").exists()


def _one_fold(models):
    import torch

    from pipeline.model.checkpoints import save_checkpoint
    from pipeline.model.network import build_model
    from pipeline.params import TrainParams

    tiny = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), height=64, width=64)
    torch.manual_seed(0)
    save_checkpoint(models / "fold_0" / "best.pt", build_model(tiny), tiny, {"mean": 0.3, "std": 0.2})
    from helpers import mark_trained

    mark_trained(models)
    return models


def test_predict_writes_ids_with_commas_and_quotes_that_read_back(tiny_interim, tmp_path):
    import pandas as pd

    from pipeline.data import rle
    from pipeline.params import DataParams

    ids = ["a,1", 'b"2', 'c,"3"', "d 4", "e5", "f6"]
    interim = _interim_with_test_ids(tiny_interim, tmp_path, ids)
    data = DataParams(layout="folders", submission_columns=("id", "rle_mask"))
    assert _predict(interim, _one_fold(tmp_path / "models"), tmp_path, data)["test_images"] == 6
    table = pd.read_csv(tmp_path / "sub.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["id", "rle_mask"] and sorted(table.id) == sorted(ids)
    assert rle.validate_submission_file(tmp_path / "sub.csv", height=96, width=128, data=data) == 6
    assert rle.validate_submission(tmp_path / "sub.csv", ids, (96, 128), columns=("id", "rle_mask"),
                                   numeric_ids=False) == 6


def test_predict_invalid_submission_names_the_output_not_its_temporary(tiny_interim, tmp_path, monkeypatch):
    from pipeline.stages import predict
    from pipeline.params import DataParams
    from pipeline.data.rle import SubmissionError

    monkeypatch.setattr(predict.rle, "encode", lambda mask, order="F", start=1: "0 5")
    with pytest.raises(SubmissionError) as info:
        _predict(tiny_interim, _one_fold(tmp_path / "models"), tmp_path, DataParams())
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'sub.csv'} (not written): invalid submission") and ".tmp" not in text
    assert "start 0 is below 1" in text and not (tmp_path / "sub.csv").exists()


def test_validate_a_folder_is_one_clear_line(params, tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path), "--params", str(params)])
    assert result.exit_code == 1, result.output
    assert f"error: {tmp_path}: is a folder, not a CSV file" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option, value", [("--height", "-5"), ("--width", "0")])
def test_validate_refuses_a_size_that_is_not_positive(params, tmp_path, option, value):
    sub = tmp_path / "sub.csv"
    sub.write_text("img,pixels\n1,1 2\n")
    result = runner.invoke(app, ["validate", str(sub), option, value, "--params", str(params)])
    assert result.exit_code == 1, result.output
    assert f"{option} must be a positive whole number of pixels, got {value}" in result.output
    assert "Traceback" not in result.output


def test_validate_ignores_appledouble_files_in_the_test_folder(params, tmp_path):
    raw = tmp_path / "raw"
    assert runner.invoke(app, ["synth", "--out", str(raw), "--params", str(params)]).exit_code == 0
    ids = sorted(int(p.stem) for p in (raw / "test").glob("*.tif"))
    (raw / "test" / f"._{ids[0]}.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS metadata, not an image
    sub = tmp_path / "sub.csv"
    sub.write_text("img,pixels\n" + "".join(f"{i},5111 10\n" for i in ids))  # ends at pixel 5120 of 64x80
    result = runner.invoke(app, ["validate", str(sub), "--test-dir", str(raw / "test"), "--params", str(params)])
    assert result.exit_code == 0 and f"valid ({len(ids)} rows)" in result.output, result.output
