"""The model's input and output transforms in numpy, without torch: what `segment` runs.

They reproduce `pipeline.model.network.preprocess` (up to the normalisation, which the exported
graph applies per fold) and `pipeline.model.network.to_native` to float rounding
(`tests/test_deploy.py` checks both against torch on many sizes and both resize modes):

- `preprocess`: uint8 (H,W) or (H,W,C) -> float32 (C,h,w) in [0, 1] at the working size:
  divide by 255, resize with torch's antialiased bilinear filter (PIL's triangle filter: the
  support widens with the downscale factor; weights renormalised at the borders) to the whole
  working size (`stretch`), or to the aspect-ratio-kept fit, never enlarged, then pad the rest
  on the bottom and right (`pad`: reflect where the image is large enough, else repeat the edge).
- `to_native`: float (h,w) at the working size -> (H,W) on the native grid: crop the fitted part
  (`pad`), then plain bilinear interpolation with half-pixel centres (torch's
  `align_corners=False`, no antialiasing; source coordinates below 0 clamp to 0).

Each resize is two small matrix products (rows, then columns), so a 420x580 image costs well
under a millisecond.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

RESIZE_MODES = ("stretch", "pad")


def fitted_size(native: tuple[int, int], size: tuple[int, int], resize: str) -> tuple[int, int]:
    """Where a native image lands in the working canvas: all of it (stretch), or its aspect ratio
    kept, never enlarged, in the top-left corner (pad). Equal to `pipeline.model.network.fitted_size`."""
    if resize == "stretch":
        return int(size[0]), int(size[1])
    scale = min(1.0, size[0] / native[0], size[1] / native[1])
    return max(1, round(native[0] * scale)), max(1, round(native[1] * scale))


@lru_cache(maxsize=64)
def antialias_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's / PIL's antialiased bilinear resize along one axis, computed in
    float32 as torch computes them for float32 input."""
    f32 = np.float32
    scale = f32(n_in / n_out)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    weights = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (f32(i) + f32(0.5))
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        taps = np.maximum(f32(0), f32(1) - np.abs((np.arange(lo, hi, dtype=f32) - center + f32(0.5)) * invscale))
        total = taps.sum(dtype=f32)
        weights[i, lo:hi] = taps / total if total > 0 else taps
    return weights


@lru_cache(maxsize=64)
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of torch's bilinear resize, align_corners=False, no antialiasing.

    The source coordinates are rounded to float32 as torch's are for float32 input; that halves the
    difference to `pipeline.model.network.to_native` against exact coordinates (it stays below
    ~4e-6 in a probability: torch's own rounding differs in ways not reproduced here)."""
    scale = np.float32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = src.astype(np.int64)  # floor: src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float64)
    weights = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, i0), 1.0 - frac)
    np.add.at(weights, (rows, i1), frac)
    return weights


def _resize(planes: np.ndarray, shape: tuple[int, int], weights) -> np.ndarray:
    """(C,H,W) float64 -> (C,h,w) with separable weight matrices (rows, then columns)."""
    if planes.shape[-2:] == tuple(shape):
        return planes
    rows, cols = weights(planes.shape[-2], shape[0]), weights(planes.shape[-1], shape[1])
    return np.einsum("hH,cHW,wW->chw", rows, planes, cols, optimize=True)


def preprocess(image: np.ndarray, size: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """uint8 (H,W) or (H,W,C) -> float32 (C,h,w) in [0, 1] at the working size `size`, as the model's
    input before normalisation (the bundle's graph normalises)."""
    planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    x = planes.astype(np.float64) / 255.0
    inner = fitted_size(x.shape[-2:], size, resize)
    x = _resize(x, inner, antialias_weights)
    if inner != tuple(size):
        pad = ((0, 0), (0, size[0] - inner[0]), (0, size[1] - inner[1]))
        x = np.pad(x, pad, mode="reflect" if max(size[0] - inner[0], size[1] - inner[1]) < min(inner) else "edge")
    return x.astype(np.float32)


def to_native(prob: np.ndarray, shape: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """float (h,w) probabilities at the working size -> float32 (H,W) on the native grid of `shape`."""
    inner = fitted_size(tuple(shape), prob.shape[-2:], resize)
    prob = np.asarray(prob, np.float64)[: inner[0], : inner[1]]
    return _resize(prob[None], tuple(shape), bilinear_weights)[0].astype(np.float32)
