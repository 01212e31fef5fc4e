"""Kaggle run-length encoding: 1-indexed, column-major `start length` pairs.

Pixels are numbered top to bottom, then left to right (Fortran order), from 1.
An empty mask encodes to the empty string. Other competitions number pixels
row-major or from 0: `order="C"` and `start=0` cover those.

>>> import numpy as np
>>> m = np.zeros((3, 2), dtype=bool); m[1:, 0] = True; m[0, 1] = True
>>> encode(m)          # column 0 holds pixels 1-3, column 1 pixels 4-6
'2 3'
>>> bool((decode('2 3', shape=(3, 2)) == m).all())
True
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

KAGGLE_SHAPE = (420, 580)


class RLEError(ValueError):
    """A run-length string that does not describe a mask of the given shape."""


class SubmissionError(ValueError):
    """A submission file that Kaggle would reject or mis-score."""


def encode(mask: np.ndarray, order: str = "F", start: int = 1) -> str:
    """Encode a 2-D mask (nonzero = foreground) as RLE; Kaggle ultrasound defaults."""
    if mask.ndim != 2:
        raise RLEError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[False], mask.ravel(order=order) != 0, [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + start  # starts and (exclusive) ends
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def parse_runs(rle: str, n_pixels: int, start: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an RLE string; returns 1-indexed starts and lengths."""
    text = "" if rle is None else str(rle).strip()
    if not text or text == "nan":
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        numbers = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise RLEError(f"non-integer value in {text[:40]!r}") from None
    if numbers.size % 2:
        raise RLEError(f"odd number of values ({numbers.size}); expected start/length pairs")
    starts, lengths = numbers[::2] + (1 - start), numbers[1::2]
    if (starts < 1).any():
        raise RLEError(f"start {starts[starts < 1][0] - (1 - start)} is below {start} (starts are {start}-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"run length {lengths[lengths < 1][0]} is not positive")
    ends = starts + lengths - 1
    if (ends > n_pixels).any():
        raise RLEError(f"run ending at pixel {ends[ends > n_pixels][0]} is outside the image ({n_pixels} pixels)")
    if (starts[1:] <= ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0])
        raise RLEError(f"runs not sorted or overlapping: start {starts[i + 1]} after run ending at {ends[i]}")
    return starts, lengths


def decode(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE, order: str = "F", start: int = 1) -> np.ndarray:
    """Decode RLE into a boolean mask of `shape` (rows, cols); Kaggle ultrasound defaults."""
    n = shape[0] * shape[1]
    starts, lengths = parse_runs(rle, n, start)
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, starts - 1 + lengths, -1)
    return (np.cumsum(delta[:-1]) > 0).reshape(shape, order=order)


def validate_submission(path: str | Path, expected_ids: Iterable[str] | None = None,
                        shape: tuple[int, int] = KAGGLE_SHAPE) -> int:
    """Check a submission CSV; returns its row count or raises SubmissionError listing problems."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SubmissionError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    if list(frame.columns) != ["img", "pixels"]:
        raise SubmissionError(f"{path}: header must be 'img,pixels', got {','.join(map(str, frame.columns))!r}")
    problems: list[str] = []
    ids = frame["img"].str.strip()
    bad_ids = ids[~ids.str.fullmatch(r"\d+")]
    if len(bad_ids):
        problems.append(f"non-numeric img ids: {', '.join(bad_ids.head(5))}")
    dupes = ids[ids.duplicated()].unique()
    if len(dupes):
        problems.append(f"img ids listed more than once: {', '.join(dupes[:5])}")
    if expected_ids is not None:
        expected = {str(i) for i in expected_ids}
        missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
        if missing:
            problems.append(f"{len(missing)} test ids missing, e.g. {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{len(extra)} ids not in the test set, e.g. {', '.join(extra[:5])}")
    n = shape[0] * shape[1]
    for img, rle in zip(ids, frame["pixels"]):
        try:
            parse_runs(rle, n)
        except RLEError as exc:
            problems.append(f"img {img}: {exc}")
            if len(problems) > 20:
                break
    if problems:
        raise SubmissionError(f"{path}: invalid submission:\n  - " + "\n  - ".join(problems))
    return len(frame)
