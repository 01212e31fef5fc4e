"""Probabilities -> final masks: the one definition of the thresholds that tune picks and predict applies.

Per image, in this order:
1. binarise: a pixel is foreground when its probability is above `pixel`;
2. connected components (8-connected): drop every component smaller than `min_component` x the
   image's area (h x w pixels; 0 keeps all), and with `keep_largest` keep only the largest
   component (ties: the first in raster order). The two commute: the largest survives the
   size filter exactly when any component does;
3. gates: the whole mask is kept only if the presence probability is at least `presence` and
   its total area (after step 2) is at least `min_area`, otherwise it becomes empty.
`presence: 0`, `min_area: 0`, `min_component: 0` and `keep_largest: false` switch each rule off
exactly. Empty images are most of the score, so the gates matter more than the pixel threshold.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.data.artifacts import Thresholds

STRUCTURE = np.ones((3, 3), bool)  # 8-connected: diagonal neighbours belong to the same component


def binarize(mask_prob: np.ndarray, pixel: float) -> np.ndarray:
    """Foreground pixels: probability strictly above the threshold."""
    return mask_prob > pixel


def keep(presence_prob: np.ndarray, area: np.ndarray, presence: float | np.ndarray,
         min_area: int | np.ndarray) -> np.ndarray:
    """Which masks survive the gates; broadcasts, so tune scores a whole grid from per-image areas."""
    return (presence_prob >= presence) & (area >= min_area)


def min_component_pixels(fraction: float | np.ndarray, h: int, w: int) -> np.ndarray:
    """The smallest component kept, in pixels (a float: a component is kept when its area >= this)."""
    return np.asarray(fraction, np.float64) * float(h * w)


def components(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray]:
    """8-connected components of one 2-D boolean mask: (labels over the bounding box of the foreground,
    that box, component areas (C,) in label order). Labelling only the box keeps sparse masks cheap."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return np.zeros((0, 0), np.int32), (slice(0, 0), slice(0, 0)), np.zeros(0, np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inside = mask[box]
    labels, n = ndimage.label(inside, STRUCTURE)
    return labels, box, np.bincount(labels[inside], minlength=n + 1)[1:]


def kept_components(areas: np.ndarray, keep_largest: np.ndarray | bool,
                    min_pixels: np.ndarray | float) -> np.ndarray:
    """Which of one image's components (areas (C,)) survive each option: keep_largest and min_pixels
    broadcast to options (O,); returns (O, C) booleans. Tune scores every option with this, apply one."""
    keep_largest, min_pixels = np.broadcast_arrays(np.atleast_1d(keep_largest), np.atleast_1d(min_pixels))
    kept = areas[None, :] >= min_pixels[:, None]
    if len(areas):
        largest = np.zeros(len(areas), bool)
        largest[np.argmax(areas)] = True  # ties: the lowest label, i.e. first in raster order
        kept &= ~keep_largest[:, None] | largest[None, :]
    return kept


def filter_components(masks: np.ndarray, keep_largest: bool, min_component: float) -> np.ndarray:
    """(N,H,W) booleans -> the same with the component rules applied per image (in place and returned)."""
    if not keep_largest and min_component <= 0:
        return masks
    h, w = masks.shape[1:3]
    limit = min_component_pixels(min_component, h, w)
    for mask in masks:
        labels, box, areas = components(mask)
        if len(areas):
            kept = np.concatenate([[False], kept_components(areas, keep_largest, limit)[0]])
            mask[box] &= kept[labels]
    return masks


def apply(mask_prob: np.ndarray, presence_prob: np.ndarray, t: Thresholds) -> np.ndarray:
    """(N,H,W) probabilities and (N,) presence -> (N,H,W) boolean masks (binarise, components, gates)."""
    masks = filter_components(binarize(mask_prob, t.pixel), t.keep_largest, t.min_component)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    masks &= keep(presence_prob, area, t.presence, t.min_area)[:, None, None]
    return masks
