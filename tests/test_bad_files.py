"""Corrupt or hand-edited files between stages, odd sizes, no network, a full disk, a bad option value:
each ends in one `error:` line naming the file or key (exit code 1), never a traceback (issue 20, case 5)."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import artifacts
from pipeline.errors import InputError
from pipeline.params import Params, ParamsError

runner = CliRunner()


@pytest.mark.parametrize("text, message", [
    ("", "empty file, not a manifest"),
    ("id,split,row,subject\n1_1,train,abc,1\n", r"column row must hold whole numbers >= 0, got 'abc' on line 2"),
    ("id,split,row,subject\n1_1,train,1.5,1\n", r"column row must hold whole numbers >= 0, got 1.5 on line 2"),
    ("id,split,row,subject\n1_1,train,,1\n", r"column row must hold whole numbers >= 0"),
])
def test_a_corrupt_processed_manifest_is_one_line(tmp_path, text, message):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        artifacts.read_training_manifest(path, 10)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("drop, change, message", [
    ("height", None, "missing column(s) height"),
    ("width", None, "missing column(s) width"),
    (None, ("height", "0"), "column height must hold whole numbers >= 1, got 0 on line 2"),
    (None, ("width", "nan"), "column width must hold whole numbers >= 1"),
])
def test_an_interim_manifest_without_sizes_is_one_line(tiny_interim, tmp_path, drop, change, message):
    interim = shutil.copytree(tiny_interim, tmp_path / "interim")
    manifest = pd.read_csv(interim / "manifest.csv", dtype=str, keep_default_na=False)
    if drop:
        manifest = manifest.drop(columns=drop)
    else:
        manifest.loc[0, change[0]] = change[1]
    manifest.to_csv(interim / "manifest.csv", index=False)
    with pytest.raises(InputError) as info:
        artifacts.read_manifest(interim)
    assert str(info.value).startswith(f"{interim / 'manifest.csv'}: {message}"), str(info.value)


def test_a_plan_with_an_invalid_value_names_the_plan_and_key(tiny_plan, tmp_path):
    plan = json.loads(tiny_plan.read_text())
    plan["values"]["dedup.grid"] = [0, 3]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(InputError) as info:
        artifacts.read_plan(path).apply(Params())
    assert str(info.value).startswith(f"{path}: dedup.grid: planned value (0, 3) is not valid")
    plan["values"]["dedup.grid"], plan["values"]["train.height"] = [4, 4], "tall"
    path.write_text(json.dumps(plan))
    with pytest.raises(InputError, match="train.height: planned value 'tall' is not valid"):
        artifacts.read_plan(path).apply(Params())


@pytest.mark.parametrize("key, value", [("median_height", float("nan")), ("median_width", 0), ("images", 0),
                                        ("sizes", [{"height": 0, "width": 580, "count": 3}]),
                                        ("groups", "3"), ("one_image_per_group", None)])
def test_a_fingerprint_with_nan_or_zero_sizes_plans_nothing(tiny_interim, tmp_path, key, value):
    from pipeline.stages import plan

    fp = json.loads((tiny_interim.parent / "fingerprint.json").read_text())
    fp[key] = value
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(fp))   # NaN is written as NaN, which Python's json reads back
    with pytest.raises(InputError) as info:
        plan.run(Params(), fingerprint=path, out=tmp_path / "plan.json")
    assert str(info.value).startswith(f"{path}: {key} is ") and "run the load stage again" in str(info.value)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("thresholds, message", [
    ({"pixel": 0.5, "presence": 0.5}, "expected exactly the keys pixel, presence, min_area (and optionally "
                                      "keep_largest, min_component)"),
    ({"pixel": "0.5", "presence": 0.5, "min_area": 0}, "pixel must be a number in [0, 1], got '0.5'"),
])
def test_the_report_refuses_a_broken_thresholds_file_in_one_line(tmp_path, tiny_interim, thresholds, message):
    (tmp_path / "thresholds.json").write_text(json.dumps(thresholds))
    (tmp_path / "reports").mkdir()
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = runner.invoke(app, ["report", "--reports", str(tmp_path / "reports"), "--interim", str(tiny_interim),
                                 "--oof", str(tmp_path / "oof"), "--thresholds", str(tmp_path / "thresholds.json"),
                                 "--html", str(tmp_path / "out.html"), "--summary", str(tmp_path / "out.md"),
                                 "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: {tmp_path / 'thresholds.json'}: {message}", result.output
    assert not (tmp_path / "out.html").exists() and not (tmp_path / "out.md").exists()


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1)])
def test_the_dedup_gallery_draws_one_pixel_images(tmp_path, shape):
    from PIL import Image

    from pipeline.stages import dedup

    images = np.zeros((2, *shape), np.uint8)
    masks = np.zeros((2, *shape), np.uint8)
    masks[0].flat[0] = 1
    pairs = pd.DataFrame({"id_a": ["1_1"], "id_b": ["1_2"], "distance": [0.0], "mask_dice": [0.0]})
    dedup.save_gallery(tmp_path / "gallery.png", images, masks, pairs, np.array([0]), np.array([1]), "one pair")
    with Image.open(tmp_path / "gallery.png") as img:
        assert img.size[0] > 100


def test_imagenet_weights_without_a_network_are_one_line(monkeypatch):
    """No network: the hub's download error (after its retries) becomes one line naming the key."""
    import segmentation_models_pytorch.encoders as encoders

    from pipeline.model.network import build_model
    from pipeline.params import TrainParams

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution\nretrying")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(ParamsError) as info:
        build_model(TrainParams(encoder_weights="imagenet"))
    text = str(info.value)
    assert text.startswith("train.encoder_weights: imagenet: cannot get the pretrained resnet18 weights (OSError: "
                           "[Errno -3] Temporary failure in name resolution retrying); offline?")
    assert "\n" not in text


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """ENOSPC while writing: one line, exit code 1, and nothing of the run left behind."""
    from pipeline.stages import synth

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)

    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  subjects: 2\n  frames_per_subject: 2\n  test_images: 1\n  height: 32\n"
                      "  width: 32\n")
    monkeypatch.setattr(synth, "write_tiff", full)
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "raw"), "--params", str(params)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]   # beside progress bars
    assert len(errors) == 1 and errors[0].startswith("error: no space left on the device writing "), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "raw").exists() and [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


@pytest.mark.parametrize("args, message", [
    (["validate", "x.csv", "--height", "abc"], "error: Invalid value for '--height'"),
    (["validate", "x.csv", "--size", "3"], "error: No such option: --size"),
    (["validate"], "error: Missing argument"),
])
def test_a_bad_command_line_is_one_error_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and "--help" in lines[0], result.output
