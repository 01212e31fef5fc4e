"""The competition's Dice: per image, then averaged; empty prediction on empty truth scores 1."""
from __future__ import annotations

import numpy as np


def dice_from_counts(inter: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    """Per-image Dice from pixel counts (broadcasting), so tuning can score many thresholds cheaply.

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    total = np.asarray(pred_area, np.int64) + np.asarray(truth_area, np.int64)
    return np.where(total == 0, 1.0, 2.0 * np.asarray(inter, np.int64) / np.maximum(total, 1))


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
    dice = dice_from_counts(inter, pred.sum(axis=axes, dtype=np.int64), truth.sum(axis=axes, dtype=np.int64))
    return dice[0] if single else dice


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of `dice_per_image`: the leaderboard score."""
    return float(np.mean(dice_per_image(pred, truth)))
