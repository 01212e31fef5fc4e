"""`pipeline segment`: parity with predict, any folder of images, numpy transforms against torch, refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_THRESHOLDS
from pipeline.cli import app
from pipeline.data import rle
from pipeline.data.io import read_image
from pipeline.deploy import resize, segment
from pipeline.deploy.bundle import read_bundle
from pipeline.model import network
from pipeline.params import Params, PredictParams
from pipeline.stages import predict

REPO = Path(__file__).resolve().parents[1]
SHAPE = (96, 128)            # the tiny dataset's native size
PROB_TOLERANCE = 1e-4        # segment's native probabilities vs predict's (measured ~1e-6)
runner = CliRunner()


def _masks(path):
    rows = rle.read_rows(path)
    return rows[0], {i: rle.decode(r, SHAPE) for i, r in rows[1:]}


def test_segment_gives_predicts_submission(tiny_bundle, tiny_folds, tiny_interim, tiny_raw, tmp_path):
    """The tiny run's test images through `segment` (numpy + ONNX Runtime) and through predict (torch): the
    same submission. A mask may differ only where a probability lies within the tolerance of a threshold
    (float rounding); such images are counted, and here there are none."""
    want_csv = tmp_path / "predict" / "submission.csv"
    predict.run(Params(predict=PredictParams(batch_size=4)), interim=tiny_interim, models=tiny_folds,
                thresholds=tiny_bundle.parent / "thresholds.json", raw=tiny_raw, out=want_csv,
                metrics=tmp_path / "metrics.json")
    summary = segment.run(bundle=tiny_bundle, images=tiny_raw / "test", out=tmp_path / "seg", batch_size=4)
    assert summary["images"] == 6 and summary["provider"] == "CPUExecutionProvider"
    header, want = _masks(want_csv)
    got_header, got = _masks(tmp_path / "seg" / "submission.csv")
    assert got_header == header == ["img", "pixels"] and list(got) == list(want) == [str(i) for i in range(1, 7)]

    b = read_bundle(tiny_bundle)
    session = segment.open_session(b)
    images = [read_image(tiny_raw / "test" / f"{i}.tif")[0] for i in want]
    probs, presence = segment.predict(session, b, images)
    t = b.thresholds
    unexplained, rounding = [], 0
    for (image_id, mask), prob, p in zip(want.items(), probs, presence):
        if (mask != got[image_id]).any():
            near = (np.abs(prob - t.pixel) <= PROB_TOLERANCE).any() or abs(p - t.presence) <= PROB_TOLERANCE
            rounding += near
            if not near:
                unexplained.append(image_id)
    assert not unexplained, f"masks differ beyond float rounding: {unexplained}"
    assert rounding == 0  # counted: on this run no image even differs by rounding
    empty = [i for i, m in want.items() if not m.any()]
    assert 0 < len(empty) < 6, "the thresholds must leave some masks and empty others, or parity proves little"
    assert (presence < t.presence).any() and (presence >= t.presence).any()


def test_masks_and_overlays_at_native_size(tiny_bundle, tmp_path):
    """Any folder: names that are not numbers, PNG / JPEG / TIFF, gray and colour, any size."""
    images = tmp_path / "scans"
    images.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"7": rng.integers(0, 256, (96, 128), np.uint8), "scan b": rng.integers(0, 256, (150, 200, 3), np.uint8),
              "tiny": rng.integers(0, 256, (40, 30), np.uint8)}
    Image.fromarray(arrays["7"]).save(images / "7.tif")
    Image.fromarray(arrays["scan b"]).save(images / "scan b.png")
    Image.fromarray(arrays["tiny"]).save(images / "tiny.jpg", quality=95)
    (tmp_path / "b").mkdir()
    b = shutil.copytree(tiny_bundle, tmp_path / "b" / "bundle")
    meta = json.loads((b / "bundle.json").read_text())
    meta["postprocess"] |= {"presence": 0.0, "keep_largest": False, "min_component": 0.0}  # edits need no re-export
    (b / "bundle.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["segment", "--bundle", str(b), "--images", str(images), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "images: 3" in result.output
    out = tmp_path / "out"
    rows = rle.read_rows(out / "submission.csv")
    assert [r[0] for r in rows] == ["img", "7", "scan b", "tiny"]  # numbers first, then names
    for (image_id, encoded), shape in zip(rows[1:], [(96, 128), (150, 200), (40, 30)]):
        mask = np.asarray(Image.open(out / "masks" / f"{image_id}.png"))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
        assert (rle.decode(encoded, shape) == (mask == 255)).all()
        drawn = np.asarray(Image.open(out / "overlays" / f"{image_id}.png"))
        assert drawn.shape == (*shape, 3)
        assert (drawn == segment.OUTLINE).all(axis=2).any() == bool(mask.any())
    assert sorted(p.name for p in images.iterdir()) == ["7.tif", "scan b.png", "tiny.jpg"]  # nothing written there


def test_segment_runs_without_torch(tiny_bundle, tiny_raw, tmp_path):
    """The command in a process where `import torch` fails: the inference path needs no training stack."""
    args = ["segment", "--bundle", str(tiny_bundle), "--images", str(tiny_raw / "test"), "--out", str(tmp_path / "out")]
    code = ("import sys\nsys.modules['torch'] = None  # every `import torch` now raises ImportError\n"
            f"from pipeline.cli import app\napp({args!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images: 6" in done.stdout
    assert len(rle.read_rows(tmp_path / "out" / "submission.csv")) == 7


def test_overlay_draws_the_outline_only():
    image = np.full((40, 50), 100, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:25] = True
    drawn = segment.overlay(image, mask)
    red = (drawn == segment.OUTLINE).all(axis=2)
    assert red[10, 5:25].all() and red[19, 5:25].all() and red[10:20, 5].all() and red[10:20, 24].all()
    assert not red[11:19, 6:24].any() and not red[~mask].any()
    assert (drawn[~red] == 100).all()
    assert (segment.overlay(image, np.zeros_like(mask)) == 100).all()


@pytest.mark.parametrize("native", [(420, 580), (96, 128), (101, 101), (50, 70), (300, 200), (33, 200)])
@pytest.mark.parametrize("mode", ["stretch", "pad"])
def test_numpy_transforms_equal_torch(native, mode):
    """segment's torch-free preprocess and to_native against pipeline.model.network's, down and up, both modes,
    gray and colour: equal to float rounding (measured up to ~4e-6, from torch's float32 coordinates)."""
    rng = np.random.default_rng(native[0])
    for image in (rng.integers(0, 256, native, np.uint8), rng.integers(0, 256, (*native, 3), np.uint8)):
        for size in ((96, 128), (64, 64), (128, 128)):
            want = network.preprocess(image[None], size, 0.0, 1.0, mode)[0].numpy()
            got = resize.preprocess(image, size, mode)
            assert got.shape == want.shape and got.dtype == np.float32
            assert np.abs(got - want).max() <= 1e-5
            assert resize.fitted_size(native, size, mode) == network.fitted_size(native, size, mode)
            prob = rng.random(size).astype(np.float32)
            want = network.to_native(torch.from_numpy(prob)[None, None], native, mode)[0].numpy()
            got = resize.to_native(prob, native, mode)
            assert got.shape == native and np.abs(got - want).max() <= 1e-5


# ---------------------------------------------------------------- refusals: one error line, exit 1, nothing written

def _segment(bundle, images, out):
    """The error the command ends with: one `error:` line (a listing of input problems may follow it, as
    for the stages); exit code 1, no traceback."""
    result = runner.invoke(app, ["segment", "--bundle", str(bundle), "--images", str(images), "--out", str(out)])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    return result.output[result.output.index("error: "):]


@pytest.mark.parametrize("tamper", ["model", "hash"])
def test_refuses_a_bundle_that_does_not_match_its_model(tiny_bundle, tiny_raw, tmp_path, tamper):
    b = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    if tamper == "model":
        with open(b / "model.onnx", "ab") as fh:
            fh.write(b"\0")
    else:
        meta = json.loads((b / "bundle.json").read_text())
        meta["model"]["sha256"] = "0" * 64
        (b / "bundle.json").write_text(json.dumps(meta))
    line = _segment(b, tiny_raw / "test", tmp_path / "out")
    assert "model.onnx: SHA-256" in line and "does not match" in line
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_is_no_bundle(tiny_raw, tmp_path):
    line = _segment(tiny_raw, tiny_raw / "test", tmp_path / "out")
    assert "bundle.json: not found" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_never_writes_into_the_images_folder(tiny_bundle, tiny_raw, tmp_path, where):
    images = shutil.copytree(tiny_raw / "test", tmp_path / "images")
    before = sorted(p.name for p in images.iterdir())
    out = images if where == "same" else images / "masks"
    line = _segment(tiny_bundle, images, out)
    assert ("is the input --images" if where == "same" else "lies inside the input --images") in line
    assert sorted(p.name for p in images.iterdir()) == before


def test_never_overwrites_a_folder_it_did_not_write(tiny_bundle, tiny_raw, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    line = _segment(tiny_bundle, tiny_raw / "test", tmp_path / "out")
    assert "already exists and was not written by the segment stage" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "not an image"])
def test_an_unreadable_image_is_one_error_and_nothing_written(tiny_bundle, tiny_raw, tmp_path, damage):
    images = shutil.copytree(tiny_raw / "test", tmp_path / "images")
    if damage == "empty":
        (images / "9.png").write_bytes(b"")
    elif damage == "truncated":
        data = (images / "1.tif").read_bytes()
        (images / "9.tif").write_bytes(data[: len(data) // 3])
    else:
        (images / "notes.txt").write_text("not an image")
    line = _segment(tiny_bundle, images, tmp_path / "out")
    expected = {"empty": "9.png: empty file (0 bytes)", "truncated": "9.tif: unreadable or truncated image",
                "not an image": "notes.txt: not an image file"}[damage]
    assert expected in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
