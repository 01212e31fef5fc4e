"""Load stage: a dataset folder -> compact uint8 arrays + a manifest.

The layout adapter (`pipeline.layouts`, chosen by `data.layout`) lists the files;
this stage reads every image and mask, checks them (readability, shape, mask
values, pairing, ids) and reports all problems at once, naming each file.
Writes `train_images.npy`, `train_masks.npy` (0/1), `test_images.npy` and
`manifest.csv` into one directory, atomically. Images are (N,H,W) for
`data.channels: gray` and (N,H,W,3) for `rgb`; the native size is recorded in the
manifest so nothing downstream assumes 420x580.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import layouts, rle
from pipeline.artifacts import MANIFEST_COLUMNS, write_interim
from pipeline.io import InputError, read_image, read_mask, write_json
from pipeline.params import Params

T = TypeVar("T")


def _read_all(items: list[str], reader: Callable[[str], T], desc: str, problems: list[str]) -> list[T | None]:
    """Read in a thread pool (decoding releases the GIL); failures become problems (in item order), not exceptions."""
    def read(item: str) -> T | InputError | None:
        try:
            return reader(item)
        except InputError as exc:
            return exc
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(tqdm(pool.map(read, items), total=len(items), desc=desc, unit="img", mininterval=1.0))
    for r in results:
        if isinstance(r, InputError):
            problems += getattr(r, "problems", [str(r)])
    return [None if isinstance(r, InputError) else r for r in results]


def _stack(arrays: list[np.ndarray | None], names: list[str], shape: tuple[int, ...], problems: list[str],
           dtype: type = np.uint8) -> np.ndarray:
    out = np.zeros((len(arrays),) + shape, dtype)
    for k, (a, name) in enumerate(zip(arrays, names)):
        if a is None:
            continue
        if a.shape[:2] != shape[:2]:
            problems.append(f"{name}: size {a.shape[0]}x{a.shape[1]} differs from the dataset's {shape[0]}x{shape[1]}")
        else:
            out[k] = a
    return out


def run(params: Params, *, raw: str | Path, out: str | Path, metrics: str | Path) -> dict[str, float]:
    """Write the arrays and manifest to `out` and the summary to `metrics`."""
    raw_dir, data = Path(raw), params.data
    listing = layouts.scan(raw_dir, data)
    train, test = listing.train, listing.test
    problems: list[str] = []
    modes: list[str] = []

    def image(path: str) -> np.ndarray:
        array, mode = read_image(path, data.channels)
        modes.append(mode)
        return array

    images = _read_all(train.path.tolist(), image, "load train images", problems)
    tests = _read_all(test.path.tolist(), image, "load test images", problems)
    # Every problem at once: the dataset's size is the commonest among the images that did read,
    # and the masks are read (decoded) even when some images did not.
    read = [a.shape for a in images if a is not None] or [a.shape for a in tests if a is not None]
    if not read:
        layouts.fail(problems or [f"{raw_dir}: no image could be read"])
    shape = pd.Series(read).value_counts().index[0]
    mask_shape = shape[:2]
    if (train.mask_path != "").all():
        masks = _read_all(train.mask_path.tolist(), read_mask, "load train masks", problems)
        mask_names = train.mask_path.tolist()
    else:
        order, start = ("F" if data.rle_order == "column" else "C"), data.rle_start
        rows_of = dict(zip(train.id, train.mask_rle))
        csv_path = Path(raw_dir) / data.csv_file

        def decode(image_id: str) -> np.ndarray | None:
            """The union of the pixels of every CSV row of this id (rows in any order, even overlapping)."""
            mask, bad = np.zeros(mask_shape, bool), []
            for line, text in rows_of[image_id]:
                try:
                    mask |= rle.decode(text, mask_shape, order, start)
                except rle.RLEError as exc:
                    bad.append(f"{csv_path}: id {image_id!r} (line {line}): mask RLE: {exc}")
            if bad:
                error = InputError(bad[0])
                error.problems = bad  # one entry per bad row in the problem list
                raise error
            return mask

        masks = _read_all(train.id.tolist(), decode, "decode train masks", problems)
        mask_names = [f"{csv_path} (id {i})" for i in train.id]
    train_images = _stack(images, train.path.tolist(), shape, problems)
    test_images = _stack(tests, test.path.tolist(), shape, problems)
    train_masks = _stack(masks, mask_names, mask_shape, problems)
    layouts.fail(problems)
    areas = train_masks.reshape(len(train), -1).sum(axis=1)
    size = dict(height=mask_shape[0], width=mask_shape[1])
    train = train.assign(split="train", row=np.arange(len(train)), has_mask=areas > 0, mask_area=areas, **size)
    test = test.assign(split="test", row=np.arange(len(test)), has_mask=pd.NA, mask_area=pd.NA,
                       subject=pd.NA, frame=pd.NA, mask_path="", **size)
    manifest = pd.concat([train, test], ignore_index=True)[MANIFEST_COLUMNS]
    write_interim(out, train_images=train_images, train_masks=train_masks, test_images=test_images,
                  manifest=manifest)
    summary = {
        "train_images": int(len(train)), "test_images": int(len(test)),
        "subjects": int(train.subject.nunique()), "height": int(mask_shape[0]), "width": int(mask_shape[1]),
        "channels": 1 if len(shape) == 2 else int(shape[2]),
        "colour_images_converted_to_gray": int(sum(m == "RGB" for m in modes)) if data.channels == "gray" else 0,
        "empty_fraction": round(float(1 - train.has_mask.mean()), 4),
        "mean_mask_area": round(float(areas[areas > 0].mean()) if (areas > 0).any() else 0.0, 1),
    }
    write_json(metrics, summary)
    return summary
