"""Probabilities -> final masks: the one definition of the thresholds that tune picks and predict applies.

A pixel is foreground when its probability is above `pixel`; the whole mask is then
kept only if the presence probability is at least `presence` and its total area is at
least `min_area`, otherwise it becomes empty (so `presence: 0` and `min_area: 0` switch
the gates off exactly). Empty images are most of the score,
so the two gates matter more than the pixel threshold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import InputError, read_json


@dataclass(frozen=True)
class Thresholds:
    pixel: float = 0.5
    presence: float = 0.5
    min_area: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


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


def check_probabilities(values: np.ndarray, what: str, ids: np.ndarray | list[str]) -> None:
    """Refuse NaN, inf or values outside [0, 1]: every threshold comparison with NaN is False, so
    a NaN would silently become an empty mask (or a skipped gate) instead of an error."""
    values = np.asarray(values)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        per_image = bad.reshape(len(values), -1).any(axis=1)
        kind = "NaN/inf" if not np.isfinite(values).all() else "values outside [0, 1]"
        examples = ", ".join(str(i) for i in np.asarray(ids)[per_image][:5])
        raise InputError(f"{what}: {kind} for {int(per_image.sum())} of {len(values)} image(s), e.g. {examples}")


def read_thresholds(path: str | Path) -> Thresholds:
    """Load the tune stage's thresholds.json, refusing anything but three sane numbers."""
    path = Path(path)
    try:
        raw = read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: thresholds file not found (run the tune stage)") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    names = [f.name for f in dataclasses.fields(Thresholds)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise InputError(f"{path}: expected exactly the keys {', '.join(names)}")
    for name in ("pixel", "presence"):
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"{path}: {name} must be a number in [0, 1], got {v!r}")
    v = raw["min_area"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InputError(f"{path}: min_area must be a non-negative integer, got {v!r}")
    return Thresholds(pixel=float(raw["pixel"]), presence=float(raw["presence"]), min_area=v)
