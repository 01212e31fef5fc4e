"""Shared test constants: the tiny model and training run the tests use (vary them with dataclasses.replace)."""
from __future__ import annotations

import dataclasses

from pipeline.params import TrainParams

TINY_MODEL = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 4), encoder_weights="none",
                         height=64, width=64)  # a small U-Net at 64x64: building and checkpoints
TINY_TRAIN = dataclasses.replace(TINY_MODEL, epochs=2, batch_size=8, folds=3, train_folds=1,
                                 lr=3e-3)  # one fold of three, two epochs: a whole train stage in seconds
NORM = {"mean": 0.4, "std": 0.2}  # a checkpoint's input normalisation


def run_train(params, inputs, out, manifest=None) -> dict:
    """The train stage on the `train_inputs` fixture's files, writing models/, oof/ and reports/ under
    `out`; `manifest` replaces the fixture's cleaned one."""
    from pipeline.stages import train

    return train.run(params, interim=inputs["interim"], manifest=manifest or inputs["manifest"],
                     augment=inputs["augment"], plan=inputs["plan"], models=out / "models", oof=out / "oof",
                     reports=out / "reports")


def mark_trained(models, folds=None, run_hash: str = "hand-made") -> None:
    """Make hand-saved `fold_K/best.pt` checkpoints the last train run's, as predict requires: a
    done.json per fold and the models folder's folds.json (default: every fold_K there)."""
    from pathlib import Path

    from pipeline.data.artifacts import write_trained_folds
    from pipeline.model.checkpoints import FoldFiles

    models = Path(models)
    if folds is None:
        folds = sorted(int(p.name[5:]) for p in models.glob("fold_*") if p.name[5:].isdigit())
    for k in folds:
        FoldFiles(models / f"fold_{k}", run_hash).finish(epoch=1, history=[], best_dice=0.0, diagnostics=None)
    write_trained_folds(models, run_hash=run_hash, folds=folds)
