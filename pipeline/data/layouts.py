"""Dataset layouts: one small adapter per on-disk convention, one interface for the load stage.

Each adapter lists the files only (no pixels read): train rows with an id, a
validation group, the image path and the mask as a file path or an RLE string;
test rows with an id and a path. Problems are collected and raised together,
each naming its file.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data.io import InputError, special_file
from pipeline.data.ids import id_problem, id_sort_key, numeric_ids
from pipeline.params import DataParams

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MAX_LISTED = 20
# Ultrasound ids are ASCII decimal numbers (`\d` would also take e.g. Arabic-Indic digits), compared by value;
# the `.tif` suffix in any case, as IMAGE_SUFFIXES are for the other layouts.
_NUMBER, _TIF = "([0-9]+)", r"(?i:\.tif)"
_ULTRASOUND_IMAGE = re.compile(rf"{_NUMBER}_{_NUMBER}{_TIF}")
_ULTRASOUND_MASK = re.compile(rf"{_NUMBER}_{_NUMBER}_mask{_TIF}")
_ULTRASOUND_TEST = re.compile(rf"{_NUMBER}{_TIF}")
_BLANK = ("", "nan")  # a group cell that holds no group (pandas writes NaN as an empty cell)


@dataclass(frozen=True)
class Listing:
    """train: id, subject (validation group code), frame, path, mask_path, mask_rle; test: id, path.

    mask_rle is, in the csv layout, a tuple of (CSV line, RLE string) for every non-empty row of
    that id (the load stage decodes each and takes the union); "" in the file-mask layouts.
    """
    train: pd.DataFrame
    test: pd.DataFrame


def fail(problems: list[str]) -> None:
    """Raise one InputError listing every problem (the first MAX_LISTED of them)."""
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InputError(f"{len(problems)} problem(s) in the input data:\n  - "
                         + "\n  - ".join(problems[:MAX_LISTED]) + more)


def list_test_images(folder: str | Path, data: DataParams) -> list[tuple[str, Path]]:
    """The test images in `folder` as (id, path), numeric ids in numeric order, then the others by name.

    The one rule for which files are test images, shared by the load stage and `pipeline validate`:
    names starting with "." (AppleDouble `._1.tif`, `.DS_Store`) are skipped; every other entry
    must be a test image of the layout: `N.tif` (ASCII digits, suffix in any case: `7.TIF` is id
    "7") for ultrasound, else `ID` + one of IMAGE_SUFFIXES in any case. Raises one InputError
    listing every problem: the folder missing or unreadable, no images, any other file, two files
    of one id (`01.tif` and `1.tif`; `a.png` and `a.jpg`), or an id a submission cannot hold
    (`pipeline.data.ids.id_problem`).
    """
    problems: list[str] = []
    found = _test_images(Path(folder), data, problems)
    fail(problems)
    return [(i, found[i]) for i in _sorted_ids(found)]


def _test_images(folder: Path, data: DataParams, problems: list[str]) -> dict[str, Path]:
    found = _ultrasound_tests(folder, problems) if data.layout == "ultrasound" \
        else _images_by_stem(folder, problems, "test")
    numeric = numeric_ids(data)
    unwritable = {}
    for image_id, path in found.items():
        if (problem := id_problem(image_id, numeric)) is not None:
            unwritable[image_id] = f"{path}: id {image_id!r} {problem}"
    problems += unwritable.values()
    return {i: p for i, p in found.items() if i not in unwritable}


def _files(folder: Path, problems: list[str]) -> list[Path] | None:
    """The entries of `folder` but hidden ones (names starting with "."), sorted; None if unlistable."""
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        problems.append(f"{folder}: folder not found")
        return None
    except NotADirectoryError:
        problems.append(f"{folder}: not a folder")
        return None
    except OSError as exc:
        problems.append(f"{folder}: folder not readable ({exc.strerror or exc})")
        return None
    listed = []
    for path in sorted(p for p in entries if not p.name.startswith(".")):
        if (kind := special_file(path)) is not None:   # never opened: reading a FIFO blocks for ever
            problems.append(f"{path}: {kind}, not a regular file or folder")
        else:
            listed.append(path)
    return listed


def _same_id(first: Path, second: Path, what: str) -> str:
    return f"{first} and {second.name}: both are {what} (ids are numbers: leading zeros do not count); keep one"


def _ultrasound_tests(folder: Path, problems: list[str]) -> dict[str, Path]:
    """`N.tif` -> {"N": path}, the id spelled as in the name; two spellings of one number are an error."""
    files = _files(folder, problems)
    tests: dict[str, Path] = {}
    by_value: dict[int, Path] = {}
    for path in files or []:
        if not (m := _ULTRASOUND_TEST.fullmatch(path.name)):
            problems.append(f"{path}: name does not match N.tif (numeric id, ASCII digits 0-9)")
        elif (other := by_value.get(int(m[1]))) is not None:
            problems.append(_same_id(other, path, f"test image {int(m[1])}"))
        else:
            by_value[int(m[1])], tests[m[1]] = path, path
    if files is not None and not tests:
        problems.append(f"{folder}: no test images found")
    return tests


def _images_by_stem(folder: Path, problems: list[str], what: str) -> dict[str, Path]:
    files = _files(folder, problems)
    found: dict[str, Path] = {}
    for path in files or []:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        elif path.stem in found:
            problems.append(f"{path}: duplicate id {path.stem!r} (also {found[path.stem].name})")
        else:
            found[path.stem] = path
    if files is not None and not found:
        problems.append(f"{folder}: no {what} images found")
    return found


def _sorted_ids(ids: Iterable[str]) -> list[str]:
    """Numeric ids (ASCII digits) in numeric order first, then the others by name."""
    return sorted(ids, key=id_sort_key)


def _group_codes(groups: pd.Series) -> pd.Series:
    """Any group labels -> integer codes 1..G, stable by sorted label."""
    codes, _ = pd.factorize(groups.astype(str), sort=True)
    return pd.Series(codes + 1, index=groups.index)


def _lines(lines: Iterable[int]) -> str:
    lines = list(lines)
    more = f" ... ({len(lines)} in all)" if len(lines) > 10 else ""
    return ", ".join(map(str, lines[:10])) + more


def _groups_from_csv(raw_dir: Path, data: DataParams, ids: list[str], problems: list[str]) -> pd.Series:
    """Validation groups: the CSV's group column if named, else each image its own group.

    Every row of a training image needs a non-blank group, and all rows of one id the same one.
    """
    if data.group_column is None:
        return pd.Series(range(1, len(ids) + 1), index=ids)
    path = raw_dir / data.csv_file
    table = _read_csv(path, [data.id_column, data.group_column], problems)
    if table is None:
        return pd.Series(range(1, len(ids) + 1), index=ids)
    table = table[table[data.id_column].isin(ids)]
    table = table.assign(**{data.group_column: table[data.group_column].str.strip()})
    listed = set(table[data.id_column])
    blank = table[data.group_column].str.lower().isin(_BLANK)
    if blank.any():
        problems.append(f"{path}: blank {data.group_column!r} on line(s) {_lines(table.index[blank])} "
                        "(with data.group_column set, every training image needs a group)")
    table = table[~blank]
    conflicting = table.groupby(data.id_column)[data.group_column].nunique()
    for image_id in conflicting.index[conflicting > 1]:
        rows = table[table[data.id_column] == image_id]
        problems.append(f"{path}: id {image_id!r} has different {data.group_column!r} values "
                        f"({', '.join(map(repr, rows[data.group_column].unique()[:5]))}) on lines {_lines(rows.index)}")
    groups = table.drop_duplicates(data.id_column).set_index(data.id_column)[data.group_column]
    missing = [i for i in ids if i not in listed]
    if missing:
        problems.append(f"{path}: no {data.group_column!r} for {len(missing)} image(s), "
                        f"e.g. {', '.join(missing[:5])}")
    return _group_codes(groups.reindex(ids).fillna("?"))


def _read_csv(path: Path, columns: list[str], problems: list[str]) -> pd.DataFrame | None:
    """A CSV as strings, indexed by the line number each row starts on (the header is line 1).

    Read with the csv module to know those lines; blank lines are skipped, a short row is padded
    with empty cells and a row with more cells than the header is a problem.
    """
    if (kind := special_file(path)) is not None:
        problems.append(f"{path}: {kind}, not a CSV file (data.csv_file)")
        return None
    limit = csv.field_size_limit(2**31 - 1)  # an RLE cell of a large image can exceed the default 128 KiB
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows, lines, previous = [], [], 0
            for row in reader:
                if row:
                    rows.append(row)
                    lines.append(previous + 1)
                previous = reader.line_num
    except FileNotFoundError:
        problems.append(f"{path}: CSV file not found (data.csv_file)")
        return None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: not a readable CSV ({exc})")
        return None
    finally:
        csv.field_size_limit(limit)
    if not rows:
        problems.append(f"{path}: empty CSV file (no header)")
        return None
    header, width = rows[0], len(rows[0])
    long = [line for line, row in zip(lines[1:], rows[1:]) if len(row) > width]
    if long:
        problems.append(f"{path}: more cells than the header's {width} on line(s) {_lines(long)}")
        return None
    absent = [c for c in columns if c not in header]
    if absent:
        problems.append(f"{path}: column(s) {', '.join(map(repr, absent))} not found "
                        f"(has {', '.join(header)}); set data.id_column / rle_column / group_column")
        return None
    cells = [row + [""] * (width - len(row)) for row in rows[1:]]
    table = pd.DataFrame(cells, columns=header, index=pd.Index(lines[1:], name="line"), dtype=object)
    return table.loc[:, ~table.columns.duplicated()]


def _test_listing(tests: dict[str, Path]) -> pd.DataFrame:
    ids = _sorted_ids(tests)
    return pd.DataFrame({"id": ids, "path": [str(tests[i]) for i in ids]})


def scan_ultrasound(raw_dir: Path, data: DataParams) -> Listing:
    """`train/S_I.tif` + `train/S_I_mask.tif`, `test/N.tif`; the subject S is the group.

    Ids are ASCII numbers compared by value: two files of one id (`01_1.tif`, `1_1.tif`) are an
    error naming both, and an image's mask must spell its id the same way (`01_2.tif` pairs with
    `01_2_mask.tif`; beside `1_2_mask.tif` it is an error naming both).
    """
    problems: list[str] = []
    images: dict[tuple[int, int], tuple[str, Path]] = {}
    masks: dict[tuple[int, int], tuple[str, Path]] = {}
    train_files = _files(raw_dir / "train", problems)
    for path in train_files or []:
        if m := _ULTRASOUND_MASK.fullmatch(path.name):
            found, what = masks, "mask"
        elif m := _ULTRASOUND_IMAGE.fullmatch(path.name):
            found, what = images, "training image"
        else:
            problems.append(f"{path}: name does not match S_I.tif or S_I_mask.tif "
                            "(numeric subject and frame, ASCII digits 0-9)")
            continue
        key = (int(m[1]), int(m[2]))
        if key in found:
            problems.append(_same_id(found[key][1], path, f"{what} {key[0]}_{key[1]}"))
        else:
            found[key] = (f"{m[1]}_{m[2]}", path)
    if train_files is not None and not images and not masks:
        problems.append(f"{raw_dir / 'train'}: no training images found")
    tests = _test_images(raw_dir / "test", data, problems)
    for k in sorted(set(images) & set(masks)):
        (image_spelling, image), (mask_spelling, mask) = images[k], masks[k]
        if image_spelling != mask_spelling:
            problems.append(f"{image} and {mask.name}: image and mask spell id {k[0]}_{k[1]} differently; "
                            f"name the mask {image_spelling}_mask.tif")
            del images[k], masks[k]
    problems += [f"{images[k][1]}: image has no mask ({images[k][0]}_mask.tif)"
                 for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k][1]}: mask has no image ({masks[k][0]}.tif)" for k in sorted(set(masks) - set(images))]
    fail(problems)
    keys = sorted(images)
    train = pd.DataFrame({
        "id": [f"{s}_{i}" for s, i in keys], "subject": [s for s, _ in keys], "frame": [i for _, i in keys],
        "path": [str(images[k][1]) for k in keys], "mask_path": [str(masks[k][1]) for k in keys], "mask_rle": ""})
    return Listing(train, _test_listing(tests))


def train_dir(raw_dir: str | Path) -> Path:
    """Where the folders and csv layouts keep their training `images/` (and `masks/`): `train/` when the
    dataset has a `train/` folder, else the dataset root (`images/` + `masks/` beside `test/`)."""
    raw_dir = Path(raw_dir)
    return raw_dir / "train" if (raw_dir / "train").is_dir() else raw_dir


def _train_images(raw_dir: Path, problems: list[str]) -> tuple[Path, dict[str, Path]]:
    """(the training folder, its images by id); neither `train/` nor `images/` is one problem naming both."""
    where = train_dir(raw_dir)
    if where == raw_dir and not (raw_dir / "images").exists():
        problems.append(f"{raw_dir / 'train' / 'images'}: folder not found (nor images/ at the dataset root)")
        return where, {}
    return where, _images_by_stem(where / "images", problems, "training")


def _relative(folder: Path, raw_dir: Path) -> str:
    return f"{folder.relative_to(raw_dir).as_posix()}/"


def scan_folders(raw_dir: Path, data: DataParams) -> Listing:
    """`train/images/ID.ext` + `train/masks/ID.ext` (same names), `test/images/ID.ext`; without a `train/`
    folder, `images/` + `masks/` at the dataset root (`train_dir`). A `test/masks/` folder is not listed
    here: it is the test truth (`test_mask_paths`)."""
    problems: list[str] = []
    where, images = _train_images(raw_dir, problems)
    listed = where != raw_dir or (raw_dir / "images").exists()   # else _train_images said what is missing
    masks = _images_by_stem(where / "masks", problems, "mask") if listed else {}
    tests = _test_images(raw_dir / "test" / "images", data, problems)
    masks_dir, images_dir = _relative(where / "masks", raw_dir), _relative(where / "images", raw_dir)
    problems += [f"{images[k]}: image has no mask in {masks_dir}" for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k]}: mask has no image in {images_dir}" for k in sorted(set(masks) - set(images))]
    ids = sorted(set(images) & set(masks))
    groups = _groups_from_csv(raw_dir, data, ids, problems)
    fail(problems)
    train = pd.DataFrame({"id": ids, "subject": groups.loc[ids].to_numpy(), "frame": pd.NA,
                          "path": [str(images[i]) for i in ids], "mask_path": [str(masks[i]) for i in ids],
                          "mask_rle": ""})
    return Listing(train, _test_listing(tests))


def scan_csv(raw_dir: Path, data: DataParams) -> Listing:
    """`train/images/ID.ext` (or `images/ID.ext` without a `train/` folder) + a CSV of RLE masks, `test/images/ID.ext`.

    Several rows of one id are merged as the union of their pixels (in any order, even
    overlapping): each row is kept with its line, and the load stage decodes and ORs them.
    `-1`, `nan` or an empty cell is an empty mask.
    """
    problems: list[str] = []
    where, images = _train_images(raw_dir, problems)
    tests = _test_images(raw_dir / "test" / "images", data, problems)
    csv_path = raw_dir / data.csv_file
    table = _read_csv(csv_path, [data.id_column, data.rle_column], problems)
    rles: dict[str, list[tuple[int, str]]] = {}
    if table is not None:
        for line, image_id, rle_text in zip(table.index, table[data.id_column], table[data.rle_column]):
            rle_text = rle_text.strip()
            rows = rles.setdefault(image_id, [])
            if rle_text not in ("", "-1", "nan"):  # some competitions mark empty masks this way
                rows.append((int(line), rle_text))
        problems += [f"{csv_path}: id {i!r} has no image in {_relative(where / 'images', raw_dir)}"
                     for i in sorted(set(rles) - set(images))]
        problems += [f"{images[i]}: image has no row in {csv_path.name}" for i in sorted(set(images) - set(rles))]
    ids = sorted(set(images) & set(rles))
    groups = _groups_from_csv(raw_dir, data, ids, problems)
    fail(problems)
    train = pd.DataFrame({"id": ids, "subject": groups.loc[ids].to_numpy(), "frame": pd.NA,
                          "path": [str(images[i]) for i in ids], "mask_path": "",
                          "mask_rle": pd.Series([tuple(rles[i]) for i in ids], dtype=object)})
    return Listing(train, _test_listing(tests))


ADAPTERS: dict[str, Callable[[Path, DataParams], Listing]] = {
    "ultrasound": scan_ultrasound, "folders": scan_folders, "csv": scan_csv}


def test_mask_paths(raw_dir: str | Path, data: DataParams) -> dict[str, Path] | None:
    """The test set's true masks, when the dataset ships them: {test id: mask path}, or None.

    Only the folders layout has them: `test/masks/ID.ext` beside `test/images/ID.ext` (same names, the
    same file rules as the images: hidden names skipped, PNG/TIFF/JPEG suffixes in any case, one file per
    id). None when the layout is another one or there is no `test/masks/` folder. When the folder exists,
    every test image must have a mask and every mask a test image: otherwise (or an empty folder, a file
    that is not an image, two files of one id) one InputError lists every problem. Keys are the ids of
    `list_test_images` (same order); read each with `io.read_mask(path, data.foreground)`.
    """
    raw_dir = Path(raw_dir)
    folder = raw_dir / "test" / "masks"
    if data.layout != "folders" or not folder.is_dir():
        return None
    problems: list[str] = []
    masks = _images_by_stem(folder, problems, "mask")
    tests = _test_images(raw_dir / "test" / "images", data, problems)
    problems += [f"{tests[k]}: test image has no mask in test/masks/" for k in _sorted_ids(set(tests) - set(masks))]
    problems += [f"{masks[k]}: mask has no image in test/images/" for k in _sorted_ids(set(masks) - set(tests))]
    fail(problems)
    return {i: masks[i] for i in _sorted_ids(tests)}


def group_kind(data: DataParams) -> str:
    """What the validation groups are: "subject" when the data names them (the ultrasound layout's `S` of
    `S_I.tif`, or `data.group_column`), "image" when each image is its own group."""
    return "subject" if data.layout == "ultrasound" or data.group_column is not None else "image"


def scan(raw_dir: str | Path, data: DataParams) -> Listing:
    """List a dataset folder with the adapter `data.layout` names."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir}: data folder not found (set data.raw_dir in params.yaml)")
    return ADAPTERS[data.layout](raw_dir, data)
