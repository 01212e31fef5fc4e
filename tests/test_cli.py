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
                                 "--metrics", str(tmp_path / "m.json"), "--params", str(params)])
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
                                 "--metrics", str(tmp_path / "m.json"), "--params", str(params)])
    assert result.exit_code == 1
    assert "absent" in result.output and "Traceback" not in result.output


def test_module_entry_point_help_is_fast_and_works():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "load" in out.stdout
    heavy = subprocess.run([sys.executable, "-c", "import pipeline.cli, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert heavy.stdout.strip() == "False", "importing the CLI must not import torch"
