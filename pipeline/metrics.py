"""The competition's Dice: per image, then averaged; empty prediction on empty truth scores 1."""
from __future__ import annotations

import numpy as np


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice for each image of a batch (N, H, W) or a single (H, W) pair.

    Both empty -> 1.0; exactly one empty -> 0.0 (a single stray pixel on an empty truth scores 0).
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    single = pred.ndim == 2
    if single:
        pred, truth = pred[None], truth[None]
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, truth).sum(axis=axes, dtype=np.int64)
    total = pred.sum(axis=axes, dtype=np.int64) + truth.sum(axis=axes, dtype=np.int64)
    dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
    return dice[0] if single else dice


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of `dice_per_image`: the leaderboard score."""
    return float(np.mean(dice_per_image(pred, truth)))
