"""Shared test constants: the tiny model and training run the tests use (vary them with dataclasses.replace)."""
from __future__ import annotations

import dataclasses

from pipeline.params import TrainParams

TINY_MODEL = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 4), encoder_weights="none",
                         height=64, width=64)  # a small U-Net at 64x64: building and checkpoints
TINY_TRAIN = dataclasses.replace(TINY_MODEL, epochs=2, batch_size=8, folds=3, train_folds=1,
                                 lr=3e-3)  # one fold of three, two epochs: a whole train stage in seconds
NORM = {"mean": 0.4, "std": 0.2}  # a checkpoint's input normalisation
