"""Shared fixtures: a tiny synthetic dataset in the Kaggle layout, and its loaded form."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pipeline.stages import load, plan, synth  # noqa: E402
from pipeline.params import Params, SynthParams  # noqa: E402

TINY = SynthParams(subjects=3, frames_per_subject=10, test_images=6, height=96, width=128,
                   empty_fraction=0.5, label_noise=0.3)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 96x128 synthetic dataset: 3 subjects x 10 frames, 6 test images, with truth/."""
    out = tmp_path_factory.mktemp("raw") / "synthetic"
    synth.run(Params(seed=7, synth=TINY), out=out)
    return out


@pytest.fixture(scope="session")
def tiny_interim(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset after the load stage (arrays + manifest)."""
    out = tmp_path_factory.mktemp("interim") / "interim"
    load.run(Params(), raw=tiny_raw, out=out, metrics=out.parent / "load_metrics.json",
             fingerprint=out.parent / "fingerprint.json")
    return out


def make_plan(fingerprint: Path, out: Path, params: Params = Params()) -> Path:
    """A plan resolved for `params` (default: every knob auto) from a load stage's fingerprint."""
    plan.run(params, fingerprint=fingerprint, out=out)
    return out


@pytest.fixture(scope="session")
def tiny_plan(tiny_interim: Path) -> Path:
    """The plan of the tiny dataset: every `auto` knob of the default params resolved."""
    return make_plan(tiny_interim.parent / "fingerprint.json", tiny_interim.parent / "plan.json")


@pytest.fixture(scope="session")
def train_inputs(tiny_interim: Path, tiny_plan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The train stage's inputs: the tiny interim data, a 'cleaned' manifest (all train rows), a saved
    augmentation pipeline and the plan."""
    from pipeline.data import artifacts
    from pipeline.data.artifacts import read_manifest
    from pipeline.model import transforms
    from pipeline.params import AugmentParams

    d = tmp_path_factory.mktemp("train_inputs")
    manifest = read_manifest(tiny_interim)
    manifest[manifest.split == "train"].to_csv(d / "manifest.csv", index=False)
    artifacts.save_augmentation(transforms.build(AugmentParams(), seed=1), d / "augment.json")
    return {"interim": tiny_interim, "manifest": d / "manifest.csv", "augment": d / "augment.json",
            "plan": tiny_plan}


@pytest.fixture(scope="session")
def tiny_folds(tiny_interim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`models/train` of two tiny folds (64x64, stretch; with folds.json and each fold's done.json, as train
    writes them), each trained two Adam steps on 8 images of the tiny dataset so weights and BatchNorm
    statistics are no longer their initial values; each fold has its own normalisation."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from helpers import TINY_MODEL, mark_trained
    from pipeline.data.artifacts import open_arrays
    from pipeline.model.checkpoints import save_checkpoint
    from pipeline.model.network import build_model, preprocess, split_outputs

    images, masks = open_arrays(tiny_interim, "train")
    images, masks = np.array(images[:8]), np.array(masks[:8])  # a few images: seconds on 2 cores
    size = (TINY_MODEL.height, TINY_MODEL.width)
    target = F.interpolate(torch.from_numpy(np.asarray(masks, np.float32))[:, None], size=size, mode="nearest")
    root = tmp_path_factory.mktemp("folds") / "train"
    for k in range(2):
        torch.manual_seed(k)
        model, norm = build_model(TINY_MODEL).train(), {"mean": 0.3 + 0.05 * k, "std": 0.2 + 0.02 * k}
        x = preprocess(np.asarray(images), size, norm["mean"], norm["std"])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            logits, label = split_outputs(model(x))
            loss = F.binary_cross_entropy_with_logits(logits, target) \
                + F.binary_cross_entropy_with_logits(label, target.amax(dim=(1, 2, 3)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_checkpoint(root / f"fold_{k}" / "best.pt", model.eval(), TINY_MODEL, norm)
    mark_trained(root)  # the last train run's folds, as predict and export require
    return root


TINY_THRESHOLDS = {"pixel": 0.5, "presence": 0.95, "min_area": 0, "keep_largest": True, "min_component": 0.001}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_folds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export stage's bundle of `tiny_folds` with TINY_THRESHOLDS (beside it: thresholds.json)."""
    import json

    from pipeline.stages import export

    root = tmp_path_factory.mktemp("export")
    (root / "thresholds.json").write_text(json.dumps(TINY_THRESHOLDS))
    export.run(Params(), models=tiny_folds, thresholds=root / "thresholds.json", out=root / "export")
    return root / "export"
