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
