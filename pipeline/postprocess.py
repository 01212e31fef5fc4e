"""Probabilities -> final masks: the one definition of the thresholds that tune picks and predict applies.

A pixel is foreground when its probability is above `pixel`; the whole mask is then
kept only if the presence probability is at least `presence` and its total area is at
least `min_area`, otherwise it becomes empty (so `presence: 0` and `min_area: 0` switch
the gates off exactly). Empty images are most of the score,
so the two gates matter more than the pixel threshold.
"""
from __future__ import annotations

import numpy as np

from pipeline.artifacts import Thresholds


def binarize(mask_prob: np.ndarray, pixel: float) -> np.ndarray:
    """Foreground pixels: probability strictly above the threshold."""
    return mask_prob > pixel


def keep(presence_prob: np.ndarray, area: np.ndarray, presence: float | np.ndarray,
         min_area: int | np.ndarray) -> np.ndarray:
    """Which masks survive the gates; broadcasts, so tune scores a whole grid from per-image areas."""
    return (presence_prob >= presence) & (area >= min_area)


def apply(mask_prob: np.ndarray, presence_prob: np.ndarray, t: Thresholds) -> np.ndarray:
    """(N,H,W) probabilities and (N,) presence -> (N,H,W) boolean masks."""
    masks = binarize(mask_prob, t.pixel)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    masks &= keep(presence_prob, area, t.presence, t.min_area)[:, None, None]
    return masks
