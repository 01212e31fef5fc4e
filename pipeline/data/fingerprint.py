"""Dataset fingerprint (after nnU-Net's): what the training data looks like, in one JSON-able dict.

A pure function of the decoded training images and masks at their native sizes: image sizes,
channels and source modes, intensity percentiles, how many masks are empty, how large the objects
are and in how many pieces, the validation groups, and letterbox borders. The load stage writes
it; the automatic settings (working size, area thresholds, dedup scope) and the report read it.

Fast on large sets: intensities come from a fixed number of pixels sampled per image with a
seeded generator (deterministic), border widths from one row and one column maximum per image,
connected components from each non-empty mask's bounding box only.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)   # of the pixel intensities
QUANTILES = (5, 25, 50, 75, 95)             # of per-mask area fractions and component counts
INTENSITY_SAMPLES = 1_000_000               # pixels sampled over the whole set (at least one per image)
DARK = 10                                   # a border row/column has every value <= this
MIN_BORDER = 2                              # px of dark rows/columns on a side that make a letterbox
EIGHT_CONNECTED = np.ones((3, 3), bool)     # diagonal neighbours belong to one object


def fingerprint(*, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], modes: Sequence[str],
                groups: Sequence[Any], group_kind: str, samples: int = INTENSITY_SAMPLES, dark: int = DARK,
                seed: int = 0) -> dict[str, Any]:
    """The fingerprint of a training set.

    images: native-size uint8 arrays, (H,W) or (H,W,3), in any mix of sizes; masks: the matching bool
    (H,W) masks; modes: each image file's source mode ("L", "RGB", ...; any length, e.g. train and
    test); groups: each image's validation group; group_kind: "subject" when the groups are real
    (subjects, patients), "image" when each image is its own group (`layouts.group_kind`).
    `samples` pixels in all (at least one per image) are drawn for the intensity percentiles with
    `np.random.default_rng(seed)`; `dark` is the largest value a letterbox border may hold.

    Keys: images; sizes (each distinct height x width with its count, commonest first),
    median_height, median_width, median_aspect (median of h/w over the images); channels ({"1": n,
    "3": n}); modes (counts); intensity ({"p0.5", "p5", "p50", "p95", "p99.5"} over the sampled pixels
    of all channels, mask-agnostic); empty_fraction; mask_area_fraction and components ({"q5", "q25",
    "q50", "q75", "q95"} over the non-empty masks: area / (h*w), 8-connected component count; None
    when every mask is empty) with multi_component_fraction; groups, group_kind,
    one_image_per_group, median_images_per_group; letterbox: fraction (of images with a dark border of
    at least MIN_BORDER px on some side), dark_max, border_px (median width per side, top / bottom /
    left / right, over those images; None when no image has one), side_fraction (of all images, per side).
    """
    n = len(images)
    if n == 0:
        raise ValueError("fingerprint of no images")
    if len(masks) != n or len(groups) != n:
        raise ValueError(f"fingerprint: {n} images but {len(masks)} masks and {len(groups)} groups")
    heights = np.array([a.shape[0] for a in images], np.int64)
    widths = np.array([a.shape[1] for a in images], np.int64)
    channels = Counter(str(a.shape[2] if a.ndim == 3 else 1) for a in images)
    sizes = Counter(zip(heights.tolist(), widths.tolist()))
    areas = np.array([np.count_nonzero(m) for m in masks], np.int64)
    filled = np.flatnonzero(areas)
    group_sizes = np.array(list(Counter(groups).values()), np.int64)
    return {
        "images": n,
        "sizes": [{"height": h, "width": w, "count": c}
                  for (h, w), c in sorted(sizes.items(), key=lambda item: (-item[1], item[0]))],
        "median_height": _number(np.median(heights)),
        "median_width": _number(np.median(widths)),
        "median_aspect": _number(np.median(heights / widths)),
        "channels": dict(sorted(channels.items())),
        "modes": dict(sorted(Counter(modes).items())),
        "intensity": _intensity(images, samples, seed),
        "empty_fraction": _number(1 - len(filled) / n),
        "mask_area_fraction": _quantiles(areas[filled] / (heights[filled] * widths[filled])) if len(filled) else None,
        **_components([masks[k] for k in filled]),
        "groups": len(group_sizes),
        "group_kind": group_kind,
        "one_image_per_group": bool(len(group_sizes) == n),
        "median_images_per_group": _number(np.median(group_sizes)),
        "letterbox": _letterbox(images, dark),
    }


def _number(value: Any, digits: int = 4) -> float:
    return round(float(value), digits)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{q}": _number(v, 6) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES))}


def _intensity(images: Sequence[np.ndarray], samples: int, seed: int) -> dict[str, float]:
    """Percentiles of about `samples` pixels drawn evenly over the images (with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    per_image = max(1, -(-samples // len(images)))
    drawn = []
    for a in images:
        flat = a.reshape(-1)
        drawn.append(flat if flat.size <= per_image else flat[rng.integers(0, flat.size, per_image)])
    values = np.concatenate(drawn)
    return {f"p{p:g}": _number(v, 2) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def _components(masks: list[np.ndarray]) -> dict[str, Any]:
    """8-connected components per non-empty mask, labelled inside the mask's bounding box only."""
    if not masks:
        return {"components": None, "multi_component_fraction": None}
    counts = np.empty(len(masks), np.int64)
    for k, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        box = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        counts[k] = ndimage.label(box, structure=EIGHT_CONNECTED)[1]
    return {"components": _quantiles(counts), "multi_component_fraction": _number(np.mean(counts > 1))}


def _border(maxima: np.ndarray, dark: int) -> tuple[int, int]:
    """Leading and trailing run of values <= dark (0, 0 when the whole line is dark: a blank image)."""
    bright = np.flatnonzero(maxima > dark)
    if not len(bright):
        return 0, 0
    return int(bright[0]), int(len(maxima) - 1 - bright[-1])


def _letterbox(images: Sequence[np.ndarray], dark: int) -> dict[str, Any]:
    """Constant dark borders: rows and columns whose maximum (over all channels) is <= dark, per side."""
    widths = np.zeros((len(images), 4), np.int64)   # top, bottom, left, right
    for k, a in enumerate(images):
        gray = a.max(axis=2) if a.ndim == 3 else a
        widths[k, :2] = _border(gray.max(axis=1), dark)
        widths[k, 2:] = _border(gray.max(axis=0), dark)
    boxed = widths.max(axis=1) >= MIN_BORDER   # one dark line is an edge artefact, not a frame
    sides = ("top", "bottom", "left", "right")
    typical = {s: _number(np.median(widths[boxed, i]), 1) for i, s in enumerate(sides)} if boxed.any() else None
    per_side = {s: _number(np.mean(widths[:, i] >= MIN_BORDER)) for i, s in enumerate(sides)}
    return {"fraction": _number(boxed.mean()), "dark_max": dark, "border_px": typical, "side_fraction": per_side}
