"""Any dataset, self-configured: `dvc exp run` with only the dataset's params set runs every stage.

Each test copies the project (its git-tracked files) into a fresh git repository, points
`data.raw_dir` at a dataset and runs the whole DVC graph as a user would. Training is cut to
one epoch on two folds (`-S train.epochs=1 ...`) to keep the suite fast; every size-dependent
knob stays `auto`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.stages import synth
from pipeline.params import Params, SynthParams

REPO = Path(__file__).resolve().parents[1]
USGRA = REPO.parent / "shared" / "datasets" / "usgra-seg"
FAST = ["-S", "train.epochs=1", "-S", "train.folds=2", "-S", "train.train_folds=2", "-S", "diagnostics.enabled=false"]
GIT = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
       "GIT_COMMITTER_EMAIL": "test@example.com"}


def _env() -> dict[str, str]:
    return {**os.environ, **GIT, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}


def _project(tmp_path: Path) -> Path:
    """The project's tracked files in a new git repository with one commit."""
    project = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=project, check=True, env=_env())
    return project


def _exp_run(project: Path, *sets: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", "exp", "run", *sets, *FAST], cwd=project, env=_env(), capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    return done


def _validate(project: Path, test_images: Path, params: str) -> None:
    (project / "validate_params.yaml").write_text(params)
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", "data/submission/submission.csv",
                           "--test-dir", str(test_images), "--params", "validate_params.yaml"],
                          cwd=project, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "valid" in done.stdout, done.stdout + done.stderr


def test_a_101x101_rgb_png_dataset_runs_every_stage(tmp_path: Path) -> None:
    """The TGS-Salt shape: small square RGB PNGs in the folders layout, no groups."""
    project = _project(tmp_path)
    raw = project / "data" / "raw" / "salt"
    synth.run(Params(seed=3, synth=SynthParams(subjects=4, frames_per_subject=10, test_images=8, height=101,
                                               width=101, layout="folders")), out=raw)
    for png in (raw / "train" / "images").glob("*.png"):
        Image.open(png).convert("RGB").save(png)
    for png in (raw / "test" / "images").glob("*.png"):
        Image.open(png).convert("RGB").save(png)
    _exp_run(project, "-S", "data.layout=folders", "-S", "data.raw_dir=data/raw/salt")

    assert not (project / "data" / "raw" / "synthetic" / "train").exists(), "the synthetic set was generated"
    plan = json.loads((project / "reports" / "plan" / "plan.json").read_text())
    values = plan["values"]
    fingerprint = json.loads((project / "reports" / "load" / "fingerprint.json").read_text())
    small = fingerprint["mask_area_fraction"]["q50"] * 128 * 128 < Params().train.object_pixels
    # 101 fits the budget: padded up to 128, then doubled where the median mask covers too few pixels there
    assert (values["train.height"], values["train.width"]) == ((256, 256) if small else (128, 128))
    assert values["dedup.grid"] == [5, 5] and values["dedup.scope"] == "global"
    assert values["tune.min_areas"] == sorted({round(f * 101 * 101) for f in Params().tune.min_area_fractions})
    assert {"train.height", "dedup.grid", "tune.min_areas"} <= set(plan["automatic"])
    assert fingerprint["sizes"] == [{"height": 101, "width": 101, "count": 40}]
    _validate(project, raw / "test" / "images", "data:\n  layout: folders\n  submission_columns: [img, pixels]\n")
    summary = (project / "reports" / "summary.md").read_text()
    assert "Dataset fingerprint and plan" in summary and "Nerve segmentation" in summary


@pytest.mark.skipif(not USGRA.is_dir(), reason=f"{USGRA} absent: the real-data test needs ../shared/datasets")
def test_the_real_usgra_seg_dataset_of_mixed_sizes_runs_every_stage(tmp_path: Path) -> None:
    """USGRA-seg dataset, tmkand/usgra-seg, CC-BY 4.0: three image sizes, palette masks (nerve = 1)."""
    project = _project(tmp_path)
    _exp_run(project, "-S", "data.layout=folders", "-S", f"data.raw_dir={USGRA}", "-S", "data.foreground=[1]")

    fingerprint = json.loads((project / "reports" / "load" / "fingerprint.json").read_text())
    assert len(fingerprint["sizes"]) == 3 and fingerprint["empty_fraction"] == 0
    predict = json.loads((project / "reports" / "predict" / "metrics.json").read_text())
    assert predict["test_images"] == 40 and 0.0 <= predict["test_dice"] <= 1.0   # scored on test/masks
    _validate(project, USGRA / "test" / "images",
              "data:\n  layout: folders\n  foreground: [1]\n  submission_columns: [img, pixels]\n")
    rows = (project / "data" / "submission" / "submission.csv").read_text().splitlines()[1:]
    sizes = {p.stem: Image.open(p).size for p in (USGRA / "test" / "images").glob("*.png")}
    ends = {}
    for row in rows:
        image_id, runs = row.split(",")
        numbers = np.array(runs.split(), int)
        ends[image_id] = int((numbers[0::2] + numbers[1::2] - 1).max()) if len(numbers) else 0
    assert all(ends[i] <= w * h for i, (w, h) in sizes.items())   # each encoded at its own size
