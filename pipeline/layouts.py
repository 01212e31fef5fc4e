"""Dataset layouts: one small adapter per on-disk convention, one interface for the load stage.

Each adapter lists the files only (no pixels read): train rows with an id, a
validation group, the image path and the mask as a file path or an RLE string;
test rows with an id and a path. Problems are collected and raised together,
each naming its file.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.io import InputError
from pipeline.params import DataParams

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MAX_LISTED = 20
_ULTRASOUND_IMAGE = re.compile(r"^(\d+)_(\d+)\.tif$")
_ULTRASOUND_MASK = re.compile(r"^(\d+)_(\d+)_mask\.tif$")
_ULTRASOUND_TEST = re.compile(r"^(\d+)\.tif$")


@dataclass(frozen=True)
class Listing:
    """train: id, subject (validation group code), frame, path, mask_path, mask_rle; test: id, path."""
    train: pd.DataFrame
    test: pd.DataFrame


def fail(problems: list[str]) -> None:
    """Raise one InputError listing every problem (the first MAX_LISTED of them)."""
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InputError(f"{len(problems)} problem(s) in the input data:\n  - "
                         + "\n  - ".join(problems[:MAX_LISTED]) + more)


def _files(folder: Path, problems: list[str]) -> list[Path]:
    if not folder.is_dir():
        problems.append(f"{folder}: folder not found")
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images_by_stem(folder: Path, problems: list[str], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _files(folder, problems):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        elif path.stem in found:
            problems.append(f"{path}: duplicate id {path.stem!r} (also {found[path.stem].name})")
        else:
            found[path.stem] = path
    if folder.is_dir() and not found:
        problems.append(f"{folder}: no {what} images found")
    return found


def _group_codes(groups: pd.Series) -> pd.Series:
    """Any group labels -> integer codes 1..G, stable by sorted label."""
    codes, _ = pd.factorize(groups.astype(str), sort=True)
    return pd.Series(codes + 1, index=groups.index)


def _groups_from_csv(raw_dir: Path, data: DataParams, ids: list[str], problems: list[str]) -> pd.Series:
    """Validation groups: the CSV's group column if named, else each image its own group."""
    if data.group_column is None:
        return pd.Series(range(1, len(ids) + 1), index=ids)
    table = _read_csv(raw_dir / data.csv_file, [data.id_column, data.group_column], problems)
    if table is None:
        return pd.Series(range(1, len(ids) + 1), index=ids)
    groups = table.drop_duplicates(data.id_column).set_index(data.id_column)[data.group_column]
    missing = [i for i in ids if i not in groups.index]
    if missing:
        problems.append(f"{raw_dir / data.csv_file}: no {data.group_column!r} for {len(missing)} image(s), "
                        f"e.g. {', '.join(missing[:5])}")
    return _group_codes(groups.reindex(ids).fillna("?"))


def _read_csv(path: Path, columns: list[str], problems: list[str]) -> pd.DataFrame | None:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        problems.append(f"{path}: CSV file not found (data.csv_file)")
        return None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: not a readable CSV ({exc})")
        return None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        problems.append(f"{path}: column(s) {', '.join(map(repr, absent))} not found "
                        f"(has {', '.join(table.columns)}); set data.id_column / rle_column / group_column")
        return None
    return table


def _test_listing(stems: dict[str, Path]) -> pd.DataFrame:
    ids = sorted(stems, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    return pd.DataFrame({"id": ids, "path": [str(stems[i]) for i in ids]})


def scan_ultrasound(raw_dir: Path, data: DataParams) -> Listing:
    """`train/S_I.tif` + `train/S_I_mask.tif`, `test/N.tif`; the subject S is the group."""
    problems: list[str] = []
    images, masks, tests = {}, {}, {}
    for path in _files(raw_dir / "train", problems):
        if m := _ULTRASOUND_MASK.match(path.name):
            masks[(int(m[1]), int(m[2]))] = path
        elif m := _ULTRASOUND_IMAGE.match(path.name):
            images[(int(m[1]), int(m[2]))] = path
        else:
            problems.append(f"{path}: name does not match S_I.tif or S_I_mask.tif (numeric subject and frame)")
    for path in _files(raw_dir / "test", problems):
        if m := _ULTRASOUND_TEST.match(path.name):
            tests[m[1]] = path
        else:
            problems.append(f"{path}: name does not match N.tif (numeric id)")
    problems += [f"{images[k]}: image has no mask ({k[0]}_{k[1]}_mask.tif)" for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k]}: mask has no image ({k[0]}_{k[1]}.tif)" for k in sorted(set(masks) - set(images))]
    if (raw_dir / "train").is_dir() and not images and not masks:
        problems.append(f"{raw_dir / 'train'}: no training images found")
    if (raw_dir / "test").is_dir() and not tests:
        problems.append(f"{raw_dir / 'test'}: no test images found")
    fail(problems)
    keys = sorted(images)
    train = pd.DataFrame({
        "id": [f"{s}_{i}" for s, i in keys], "subject": [s for s, _ in keys], "frame": [i for _, i in keys],
        "path": [str(images[k]) for k in keys], "mask_path": [str(masks[k]) for k in keys], "mask_rle": ""})
    return Listing(train, _test_listing(tests))


def scan_folders(raw_dir: Path, data: DataParams) -> Listing:
    """`train/images/ID.ext` + `train/masks/ID.ext` (same names), `test/images/ID.ext`."""
    problems: list[str] = []
    images = _images_by_stem(raw_dir / "train" / "images", problems, "training")
    masks = _images_by_stem(raw_dir / "train" / "masks", problems, "mask")
    tests = _images_by_stem(raw_dir / "test" / "images", problems, "test")
    problems += [f"{images[k]}: image has no mask in train/masks/" for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k]}: mask has no image in train/images/" for k in sorted(set(masks) - set(images))]
    ids = sorted(set(images) & set(masks))
    groups = _groups_from_csv(raw_dir, data, ids, problems)
    fail(problems)
    train = pd.DataFrame({"id": ids, "subject": groups.loc[ids].to_numpy(), "frame": pd.NA,
                          "path": [str(images[i]) for i in ids], "mask_path": [str(masks[i]) for i in ids],
                          "mask_rle": ""})
    return Listing(train, _test_listing(tests))


def scan_csv(raw_dir: Path, data: DataParams) -> Listing:
    """`train/images/ID.ext` + a CSV of RLE masks (several rows per id are merged), `test/images/ID.ext`."""
    problems: list[str] = []
    images = _images_by_stem(raw_dir / "train" / "images", problems, "training")
    tests = _images_by_stem(raw_dir / "test" / "images", problems, "test")
    csv_path = raw_dir / data.csv_file
    table = _read_csv(csv_path, [data.id_column, data.rle_column], problems)
    rles: dict[str, str] = {}
    if table is not None:
        for image_id, rle_text in zip(table[data.id_column], table[data.rle_column]):
            rle_text = rle_text.strip()
            if rle_text in ("-1", "nan"):  # some competitions mark empty masks this way
                rle_text = ""
            rles[image_id] = f"{rles.get(image_id, '')} {rle_text}".strip() if rle_text else rles.get(image_id, "")
        problems += [f"{csv_path}: id {i!r} has no image in train/images/" for i in sorted(set(rles) - set(images))]
        problems += [f"{images[i]}: image has no row in {csv_path.name}" for i in sorted(set(images) - set(rles))]
    ids = sorted(set(images) & set(rles))
    groups = _groups_from_csv(raw_dir, data, ids, problems)
    fail(problems)
    train = pd.DataFrame({"id": ids, "subject": groups.loc[ids].to_numpy(), "frame": pd.NA,
                          "path": [str(images[i]) for i in ids], "mask_path": "",
                          "mask_rle": [rles[i] for i in ids]})
    return Listing(train, _test_listing(tests))


ADAPTERS: dict[str, Callable[[Path, DataParams], Listing]] = {
    "ultrasound": scan_ultrasound, "folders": scan_folders, "csv": scan_csv}


def scan(raw_dir: str | Path, data: DataParams) -> Listing:
    """List a dataset folder with the adapter `data.layout` names."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir}: data folder not found (set data.raw_dir in params.yaml)")
    return ADAPTERS[data.layout](raw_dir, data)
