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

import csv
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.data.ids import id_problem, numeric_ids
from pipeline.data.io import special_file
from pipeline.params import DataParams

KAGGLE_SHAPE = (420, 580)
MAX_LISTED = 20
_INTEGER = re.compile(r"-?[0-9]+")


class RLEError(ValueError):
    """A run-length string that does not describe a mask of the given shape."""


class SubmissionError(ValueError):
    """A submission file that Kaggle would reject or mis-score."""


def encode(mask: np.ndarray, order: str = "F", start: int = 1) -> str:
    """Encode a 2-D mask (nonzero = foreground) as RLE; Kaggle ultrasound defaults."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[False], mask.ravel(order=order) != 0, [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + start  # starts and (exclusive) ends
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def parse_runs(rle: str | float | None, n_pixels: int, start: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an RLE string whose starts count from `start`; returns 1-indexed starts and lengths.

    None and float NaN (pandas' empty cell) mean an empty mask; the text itself must be
    plain ASCII integers, so '+3', '1e3' or 'nan' are refused rather than guessed at.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    tokens = str(rle).split()
    bad = next((t for t in tokens if not _INTEGER.fullmatch(t) or len(t) > 18), None)
    if bad is not None:
        raise RLEError(f"{bad[:20]!r} is not an integer of at most 18 digits")
    if len(tokens) % 2:
        raise RLEError(f"odd number of values ({len(tokens)}); expected start/length pairs")
    numbers = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    starts, lengths = numbers[:, 0] + (1 - start), numbers[:, 1]
    if (starts < 1).any():
        raise RLEError(f"start {starts[starts < 1][0] - (1 - start)} is below {start} (starts are {start}-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"run length {lengths[lengths < 1][0]} is not positive")
    ends = starts + lengths - 1  # no overflow: both are below 10**18
    if (ends > n_pixels).any():
        i = int(np.flatnonzero(ends > n_pixels)[0])
        raise RLEError(f"run {starts[i] - (1 - start)} {lengths[i]} ends past the image ({n_pixels} pixels)")
    if (starts[1:] <= ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0])
        raise RLEError(f"runs not sorted or overlapping: start {starts[i + 1]} after run ending at {ends[i]}")
    return starts, lengths


_SEPARATED = re.compile(r"[0-9]+(?: [0-9]+)*")


def separator_problem(rle: str) -> str | None:
    """Why the numbers of `rle` are not separated by single ASCII spaces, as the submission format says (a
    tab, a no-break space, two spaces, a leading or trailing space), or None ("" is an empty mask)."""
    if rle == "" or _SEPARATED.fullmatch(rle):
        return None
    for k, char in enumerate(rle):
        if char.isspace() and char != " ":
            return f"separator {char!r} at position {k + 1}; runs are separated by single ASCII spaces"
        if char == " " and (k == 0 or k == len(rle) - 1 or rle[k - 1] == " "):
            where = "leading" if k == 0 else "trailing" if k == len(rle) - 1 else "double"
            return f"{where} space at position {k + 1}; runs are separated by single spaces"
    return None   # the numbers themselves are parse_runs' to check


def decode(rle: str | float | None, shape: tuple[int, int] = KAGGLE_SHAPE, order: str = "F",
           start: int = 1) -> np.ndarray:
    """Decode RLE into a boolean mask of `shape` (rows, cols); Kaggle ultrasound defaults."""
    n = shape[0] * shape[1]
    starts, lengths = parse_runs(rle, n, start)
    delta = np.zeros(n + 1, dtype=np.int8)
    delta[starts - 1] += 1  # starts are unique, and so are ends: plain fancy updates are exact
    delta[starts - 1 + lengths] -= 1
    return (np.cumsum(delta[:-1]) > 0).reshape(shape, order=order)


def read_numbered_rows(path: str | Path) -> list[tuple[int, list[str]]]:
    """A CSV's rows (header included, blank lines skipped), each with the file line it starts on.

    Read with the csv module (quoted fields may hold commas, quotes and line breaks);
    SubmissionError if the file is missing, a folder or unreadable.
    """
    path = Path(path)
    rows: list[tuple[int, list[str]]] = []
    if (kind := special_file(path)) is not None:   # opening a FIFO would block for ever
        raise SubmissionError(f"{path}: {kind}, not a CSV file")
    limit = csv.field_size_limit(2**31 - 1)  # a valid mask of many runs at 420x580 takes more than 128 KiB
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            line = 1
            for row in reader:
                if row:
                    rows.append((line, row))
                line = reader.line_num + 1  # the next row starts after every line this one used
    except FileNotFoundError:
        raise SubmissionError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SubmissionError(f"{path}: is a folder, not a CSV file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def read_rows(path: str | Path) -> list[list[str]]:
    """A CSV's rows (header included, blank lines skipped) with the csv module; SubmissionError if unreadable."""
    return [row for _, row in read_numbered_rows(path)]


def check_ids(ids: Sequence[str], numeric: bool, source: str) -> None:
    """SubmissionError naming up to 5 ids of `source` that cannot be written to a submission, or duplicates."""
    bad = [(i, why) for i in ids if (why := id_problem(i, numeric)) is not None]
    dup = [i for i, k in Counter(ids).items() if k > 1]
    problems = [f"id {i!r} {why}" for i, why in bad[:5]]
    if len(bad) > 5:
        problems.append(f"... and {len(bad) - 5} more such id(s)")
    if dup:
        problems.append(f"{len(dup)} id(s) listed more than once: {', '.join(map(repr, dup[:5]))}")
    if problems:
        rule = " (data.layout ultrasound: ids must be plain numbers)" if numeric and bad else ""
        raise SubmissionError(f"{source}: {len(bad) + len(dup)} image id(s) cannot be written to a submission"
                              f"{rule}:\n  - " + "\n  - ".join(problems))


def write_submission(path: str | Path, rows: Iterable[tuple[str, str]], columns: Sequence[str]) -> None:
    """Write a submission CSV with the csv module: a field holding a comma or quote is quoted properly."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def validate_submission(path: str | Path, expected_ids: Iterable[str] | None = None,
                        shape: tuple[int, int] = KAGGLE_SHAPE, columns: Sequence[str] = ("img", "pixels"),
                        start: int = 1, numeric_ids: bool = True,
                        shapes: Mapping[str, tuple[int, int]] | None = None) -> int:
    """Check a submission CSV; returns its row count or raises SubmissionError listing problems.

    Checks the header, that ids are numeric (`numeric_ids`), unique and exactly the
    `expected_ids`, and every run string against an image of `shape` (or of its own size in
    `shapes`, id -> (height, width), when the images differ in size). Read with the csv
    module, not pandas: pandas silently turns a row with an extra field into an index
    column, shifting every value.
    """
    path = Path(path)
    columns = list(columns)
    if len(columns) != 2 or columns[0] == columns[1]:
        raise SubmissionError(f"{path}: the header must be two different column names (id, run-length mask), "
                              f"not {','.join(columns)!r} (data.submission_columns)")
    rows = read_numbered_rows(path)
    if not rows or rows[0][1] != columns:
        got = ",".join(rows[0][1]) if rows else ""
        raise SubmissionError(f"{path}: header must be {','.join(columns)!r}, got {got!r}")
    problems: list[str] = []
    seen: set[str] = set()
    n = shape[0] * shape[1]
    for line, row in rows[1:]:
        if len(row) != 2:
            problems.append(f"line {line}: expected 2 fields ({','.join(columns)}), got {len(row)}")
            continue
        img, pixels = row
        if (why := id_problem(img, numeric_ids)) is not None:
            problems.append(f"line {line}: id {img!r} {why}")
        elif img in seen:
            problems.append(f"line {line}: id {img} is listed more than once")
        seen.add(img)
        if (why := separator_problem(pixels)) is not None:
            problems.append(f"line {line}: id {img}: {why}")
            continue
        try:
            parse_runs(pixels, n if shapes is None or img not in shapes else shapes[img][0] * shapes[img][1], start)
        except RLEError as exc:
            problems.append(f"line {line}: id {img}: {exc}")
    if expected_ids is not None:
        expected = {str(i) for i in expected_ids}
        missing, extra = sorted(expected - seen, key=_sort_key), sorted(seen - expected, key=_sort_key)
        if missing:
            problems.append(f"{len(missing)} test id(s) missing, e.g. {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{len(extra)} id(s) not in the test set, e.g. {', '.join(extra[:5])}")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SubmissionError(f"{path}: invalid submission ({len(problems)} problem(s)):\n  - "
                              + "\n  - ".join(problems[:MAX_LISTED]) + more)
    return len(rows) - 1


def _sort_key(img: str) -> tuple[int, str]:
    return (len(img), img)  # numeric order for digit ids, without parsing them


def validate_submission_file(submission: str | Path, *, test_dir: str | Path | None = None,
                             height: int | None = None, width: int | None = None,
                             data: DataParams = DataParams()) -> int:
    """The `validate` command: check `submission` with the conventions of `data` (columns, RLE start,
    numeric-id rule); returns its row count, or raises SubmissionError / InputError.

    With `test_dir`, its test images (listed by the load stage's rule, `layouts.list_test_images`:
    dot-files such as AppleDouble `._1.tif` skipped) must each appear exactly once, and each run
    string is checked against its own image's size (unless `height` and `width` are given). Without
    it the size is `height` x `width`, each defaulting to the Kaggle 420 x 580.
    """
    from pipeline.data.io import InputError, image_size
    from pipeline.data.layouts import list_test_images

    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"--{name} must be a positive whole number of pixels, got {value!r}")
    ids, shapes = None, None
    if test_dir is not None:
        images = list_test_images(Path(test_dir), data)
        ids = [image_id for image_id, _ in images]
        if height is None or width is None:  # each run string against its own image's size
            shapes = {image_id: image_size(path) for image_id, path in images}
    if height is not None or width is not None or not shapes:
        default = next(iter(shapes.values())) if shapes else KAGGLE_SHAPE
        shape, shapes = (default[0] if height is None else height, default[1] if width is None else width), None
    else:
        shape = next(iter(shapes.values()))
    return validate_submission(submission, ids, shape, columns=data.submission_columns, start=data.rle_start,
                               numeric_ids=numeric_ids(data), shapes=shapes)
