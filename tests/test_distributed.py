"""The train stage under torchrun: 2 CPU processes (gloo) on the tiny dataset.

Checks what DistributedDataParallel must not change: every validation image is predicted
once (no DistributedSampler padding duplicates), in the single-process order, with the
same probabilities a single process computes from the saved best checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from helpers import TINY_TRAIN
from pipeline.data import artifacts
from pipeline.stages import train
from pipeline.model import transforms
from pipeline.data.artifacts import open_arrays, read_manifest
from pipeline.model.checkpoints import load_checkpoint
from pipeline.params import AugmentParams, to_dict
from pipeline.model.runtime import Runtime

SEED = 11
# 3 subjects -> 3 folds of one subject each; one frame per subject is left out so every fold holds
# an odd number of images, which 2 ranks cannot split evenly: padding duplicates would show.
TINY = dataclasses.replace(TINY_TRAIN, height=32, width=48, batch_size=4, threads=1)


def test_two_cpu_ranks_match_a_single_process_evaluation(tiny_interim: Path, tiny_plan: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_interim)
    train_rows = manifest[manifest.split == "train"]
    train_rows = train_rows[train_rows.groupby("subject").cumcount() > 0]
    train_rows.to_csv(tmp_path / "manifest.csv", index=False)
    artifacts.save_augmentation(transforms.build(AugmentParams(), seed=1), tmp_path / "augment.json")
    params = {"seed": SEED, "train": to_dict(TINY), "diagnostics": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline", "train", "--interim", str(tiny_interim), "--manifest", str(tmp_path / "manifest.csv"),
           "--augment", str(tmp_path / "augment.json"), "--plan", str(tiny_plan), "--models", str(tmp_path / "models"),
           "--oof", str(tmp_path / "oof"), "--reports", str(tmp_path / "reports"),
           "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "models" / "fold_0").iterdir()) == ["best.pt", "done.json"]

    oof = np.load(tmp_path / "oof" / "oof.npz")
    images, masks = open_arrays(tiny_interim, "train")
    rows = train_rows.row.to_numpy()
    folds = train.subject_folds(train_rows.subject.astype(str).to_numpy(), TINY.folds, SEED)
    val = np.flatnonzero(folds == 0)
    assert len(val) % 2 == 1
    assert oof["ids"].tolist() == train_rows.id.astype(str).to_numpy()[val].tolist()

    model, state = load_checkpoint(tmp_path / "models" / "fold_0" / "best.pt")
    x, y = transforms.working_arrays(images[rows], masks[rows], (TINY.height, TINY.width))
    fold = train.Fold(0, x[folds != 0], y[folds != 0], x[val], y[val], state["norm"], "")
    torch.set_num_threads(1)
    probs, presence, _ = train.predict(model, fold.x_val, fold.y_val, fold, TINY,
                                       Runtime(torch.device("cpu"), amp=False))
    np.testing.assert_allclose(oof["mask_prob"].astype(np.float32), probs.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(oof["presence_prob"], presence, atol=1e-4)
