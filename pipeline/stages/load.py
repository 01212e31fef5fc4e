"""Load stage: a dataset folder -> compact uint8 arrays + a manifest.

The layout adapter (`pipeline.data.layouts`, chosen by `data.layout`) lists the files;
this stage reads every image and mask, checks them (readability, shape, mask
values, pairing, ids) and reports all problems at once, naming each file.
Writes `train_images.npy`, `train_masks.npy` (0/1), `test_images.npy` and
`manifest.csv` into one directory, atomically. Images are (N,H,W) for
`data.channels: gray` and (N,H,W,3) for `rgb`; the native size is recorded in the
manifest so nothing downstream assumes 420x580.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data import layouts, rle
from pipeline.data.artifacts import MANIFEST_COLUMNS, write_interim
from pipeline.data.fingerprint import fingerprint as dataset_fingerprint
from pipeline.data.io import InputError, mask_problems, read_image, read_mask_values, write_json
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


def _canvas(arrays: list[np.ndarray | None]) -> tuple[int, ...]:
    """The smallest (H, W[, C]) that holds every array: images of mixed sizes share one array,
    each in its top-left corner, its native size in the manifest."""
    shapes = [a.shape for a in arrays if a is not None] or [(1, 1)]
    return tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))


def _listed(names: list[str], most: int = 5) -> str:
    """`none`, or how many with the first few names (a summary line and a metrics value)."""
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return f"{len(names)}: {', '.join(names[:most])}{more} (99th percentile below 1/{DIM} of the typical image's)"


def _stack(arrays: list[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((len(arrays),) + shape, np.uint8)
    for k, a in enumerate(arrays):
        if a is not None:
            out[(k, *map(slice, a.shape))] = a
    return out


DIM = 8   # an image whose bright end is this many times below the dataset's typical one is reported


def dim_images(arrays: list[np.ndarray | None], names: list[str]) -> list[str]:
    """The images at another intensity scale than the rest: their 99th percentile (of every 7th pixel) is
    below 1/DIM of the median image's (a 16-bit scan saved at 1/256, a 12-bit one in the low bits). Not an
    error (a blank frame is real data): the load stage reports them."""
    levels = np.array([np.percentile(a.reshape(-1)[::7], 99) if a is not None else np.nan for a in arrays])
    typical = float(np.nanmedian(levels)) if np.isfinite(levels).any() else 0.0
    return [n for n, level in zip(names, levels) if np.isfinite(level) and level * DIM < typical]


def run(params: Params, *, raw: str | Path, out: str | Path, metrics: str | Path,
        fingerprint: str | Path) -> dict[str, float]:
    """Write the arrays and manifest to `out`, the summary to `metrics` and the dataset's fingerprint
    (what the plan stage configures from) to `fingerprint`."""
    raw_dir, data = Path(raw), params.data
    listing = layouts.scan(raw_dir, data)
    train, test = listing.train, listing.test
    problems: list[str] = []
    modes: dict[str, list[str]] = {"train": [], "test": []}

    def reader(split: str) -> Callable[[str], np.ndarray]:
        def image(path: str) -> np.ndarray:
            array, mode = read_image(path, data.channels)
            modes[split].append(mode)
            return array
        return image

    images = _read_all(train.path.tolist(), reader("train"), "load train images", problems)
    tests = _read_all(test.path.tolist(), reader("test"), "load test images", problems)
    # Every problem at once: masks are read (decoded) even when some images did not. Images may
    # differ in size; each mask must have its own image's size.
    if all(a is None for a in images + tests):
        layouts.fail(problems or [f"{raw_dir}: no image could be read"])
    if (train.mask_path != "").all():
        read = _read_all(train.mask_path.tolist(), functools.partial(read_mask_values, foreground=data.foreground),
                         "load train masks", problems)
        masks = [None if r is None else r[0] for r in read]
        mask_names = train.mask_path.tolist()
        # Together, not one file at a time: masks that mix conventions, and the files that differ from the rest
        problems += mask_problems(mask_names, [None if r is None else r[1] for r in read], data.foreground)
    else:
        order, start = ("F" if data.rle_order == "column" else "C"), data.rle_start
        rows_of = dict(zip(train.id, train.mask_rle))
        shape_of = {i: a.shape[:2] for i, a in zip(train.id, images) if a is not None}
        csv_path = Path(raw_dir) / data.csv_file

        def decode(image_id: str) -> np.ndarray | None:
            """The union of the pixels of every CSV row of this id (rows in any order, even overlapping),
            at its image's size."""
            if image_id not in shape_of:
                return None  # its image is unreadable: that problem is listed already
            mask, bad = np.zeros(shape_of[image_id], bool), []
            for line, text in rows_of[image_id]:
                try:
                    mask |= rle.decode(text, shape_of[image_id], order, start)
                except rle.RLEError as exc:
                    bad.append(f"{csv_path}: id {image_id!r} (line {line}): mask RLE: {exc}")
            if bad:
                error = InputError(bad[0])
                error.problems = bad  # one entry per bad row in the problem list
                raise error
            return mask

        masks = _read_all(train.id.tolist(), decode, "decode train masks", problems)
        mask_names = [f"{csv_path} (id {i})" for i in train.id]
    for image, mask, name in zip(images, masks, mask_names):
        if image is not None and mask is not None and mask.shape != image.shape[:2]:
            problems.append(f"{name}: mask size {mask.shape[0]}x{mask.shape[1]} differs from its image's "
                            f"{image.shape[0]}x{image.shape[1]}")
    if data.foreground is not None and masks and not any(m is not None and m.any() for m in masks):
        problems.append(f"{raw_dir}: no training mask holds any of the data.foreground values {list(data.foreground)} "
                        "(the label values of the object in these masks?)")
    layouts.fail(problems)
    train_images, test_images = _stack(images, _canvas(images)), _stack(tests, _canvas(tests))
    train_masks = _stack([m.astype(np.uint8) for m in masks], train_images.shape[1:3])
    areas = train_masks.reshape(len(train), -1).sum(axis=1, dtype=np.int64)
    train = train.assign(split="train", row=np.arange(len(train)), has_mask=areas > 0, mask_area=areas,
                         height=[a.shape[0] for a in images], width=[a.shape[1] for a in images])
    test = test.assign(split="test", row=np.arange(len(test)), has_mask=pd.NA, mask_area=pd.NA,
                       subject=pd.NA, frame=pd.NA, mask_path="",
                       height=[a.shape[0] for a in tests], width=[a.shape[1] for a in tests])
    manifest = pd.concat([train, test], ignore_index=True)[MANIFEST_COLUMNS]
    write_interim(out, train_images=train_images, train_masks=train_masks, test_images=test_images,
                  manifest=manifest)
    sizes = pd.concat([train, test]).groupby(["height", "width"]).size().sort_values(ascending=False)
    (height, width), n_sizes = sizes.index[0], len(sizes)
    summary = {
        "train_images": int(len(train)), "test_images": int(len(test)),
        "subjects": int(train.subject.nunique()), "group_kind": layouts.group_kind(data),
        "height": int(height), "width": int(width),
        "image_sizes": int(n_sizes),
        "channels": 1 if train_images.ndim == 3 else int(train_images.shape[3]),
        "colour_images_converted_to_gray": (sum(m == "RGB" for m in modes["train"] + modes["test"])
                                            if data.channels == "gray" else 0),
        "images_at_another_scale": _listed(dim_images(images + tests, train.path.tolist() + test.path.tolist())),
        "empty_fraction": round(float(1 - train.has_mask.mean()), 4),
        "mean_mask_area": round(float(areas[areas > 0].mean()) if (areas > 0).any() else 0.0, 1),
    }
    write_json(metrics, summary)
    write_json(fingerprint, dataset_fingerprint(images=images, masks=masks, modes=modes["train"], groups=train.subject.tolist(),
                                                group_kind=summary["group_kind"], seed=params.seed))
    return summary
