"""Load stage: a Kaggle-layout folder -> compact uint8 arrays + a manifest.

Reads `train/S_I.tif`, `train/S_I_mask.tif` and `test/N.tif`, checks everything
(pairing, readability, shape, mask values, ids) and reports all problems at once,
naming each file. Writes `train_images.npy`, `train_masks.npy` (0/1),
`test_images.npy` and `manifest.csv` into one directory, atomically.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.io import InputError, atomic_dir, read_gray, write_csv, write_json, write_npy

TRAIN_IMAGE = re.compile(r"^(\d+)_(\d+)\.tif$")
TRAIN_MASK = re.compile(r"^(\d+)_(\d+)_mask\.tif$")
TEST_IMAGE = re.compile(r"^(\d+)\.tif$")
MAX_LISTED = 20


def _fail(problems: list[str]) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InputError(f"{len(problems)} problem(s) in the input data:\n  - "
                         + "\n  - ".join(problems[:MAX_LISTED]) + more)


def scan(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pair train images with masks and list test images; every stray or unpaired file is a problem."""
    problems: list[str] = []
    for sub in ("train", "test"):
        if not (raw_dir / sub).is_dir():
            problems.append(f"{raw_dir / sub}: folder not found (expected the Kaggle layout train/ and test/)")
    _fail(problems)
    images, masks = {}, {}
    for path in sorted((raw_dir / "train").iterdir()):
        if path.name.startswith("."):
            continue
        if m := TRAIN_MASK.match(path.name):
            masks[(int(m[1]), int(m[2]))] = path
        elif m := TRAIN_IMAGE.match(path.name):
            images[(int(m[1]), int(m[2]))] = path
        else:
            problems.append(f"{path}: name does not match S_I.tif or S_I_mask.tif (numeric subject and frame)")
    problems += [f"{images[k]}: image has no mask ({k[0]}_{k[1]}_mask.tif)" for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k]}: mask has no image ({k[0]}_{k[1]}.tif)" for k in sorted(set(masks) - set(images))]
    tests = {}
    for path in sorted((raw_dir / "test").iterdir()):
        if path.name.startswith("."):
            continue
        if m := TEST_IMAGE.match(path.name):
            tests[int(m[1])] = path
        else:
            problems.append(f"{path}: name does not match N.tif (numeric id)")
    if not images and not masks:
        problems.append(f"{raw_dir / 'train'}: no training images found")
    if not tests:
        problems.append(f"{raw_dir / 'test'}: no test images found")
    _fail(problems)
    keys = sorted(images)
    train = pd.DataFrame({
        "id": [f"{s}_{i}" for s, i in keys], "subject": [s for s, _ in keys], "frame": [i for _, i in keys],
        "path": [str(images[k]) for k in keys], "mask_path": [str(masks[k]) for k in keys]})
    ids = sorted(tests)
    test = pd.DataFrame({"id": [str(n) for n in ids], "path": [str(tests[n]) for n in ids]})
    return train, test


def _read_all(paths: list[str], desc: str, problems: list[str]) -> list[np.ndarray | None]:
    def read(p: str) -> np.ndarray | None:
        try:
            return read_gray(p)
        except InputError as exc:
            problems.append(str(exc))
            return None
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(tqdm(pool.map(read, paths), total=len(paths), desc=desc, unit="img", mininterval=1.0))


def _stack(arrays: list[np.ndarray | None], paths: list[str], shape: tuple[int, int], problems: list[str]) -> np.ndarray:
    out = np.zeros((len(arrays),) + shape, np.uint8)
    for k, (a, p) in enumerate(zip(arrays, paths)):
        if a is None:
            continue
        if a.shape != shape:
            problems.append(f"{p}: shape {a.shape[0]}x{a.shape[1]} differs from the dataset's {shape[0]}x{shape[1]}")
        else:
            out[k] = a
    return out


def run(raw_dir: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict[str, float]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir}: data folder not found (set data.raw_dir in params.yaml)")
    train, test = scan(raw_dir)
    problems: list[str] = []
    images = _read_all(train.path.tolist(), "load train images", problems)
    masks = _read_all(train.mask_path.tolist(), "load train masks", problems)
    tests = _read_all(test.path.tolist(), "load test images", problems)
    _fail(problems)
    shapes = pd.Series([a.shape for a in images]).value_counts()
    shape = shapes.index[0]
    train_images = _stack(images, train.path.tolist(), shape, problems)
    train_masks = _stack(masks, train.mask_path.tolist(), shape, problems)
    test_images = _stack(tests, test.path.tolist(), shape, problems)
    for m, p in zip(masks, train.mask_path):
        values = np.unique(m)
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            problems.append(f"{p}: mask values {values[:6].tolist()} are not binary 0/255 (or 0/1)")
    _fail(problems)
    train_masks = (train_masks > 0).astype(np.uint8)
    areas = train_masks.reshape(len(train), -1).sum(axis=1)
    train = train.assign(split="train", row=np.arange(len(train)), has_mask=areas > 0, mask_area=areas)
    test = test.assign(split="test", row=np.arange(len(test)), has_mask=pd.NA, mask_area=pd.NA,
                       subject=pd.NA, frame=pd.NA, mask_path="")
    manifest = pd.concat([train, test], ignore_index=True)[
        ["id", "split", "row", "subject", "frame", "has_mask", "mask_area", "path", "mask_path"]]
    with atomic_dir(out_dir) as tmp:
        write_npy(tmp / "train_images.npy", train_images)
        write_npy(tmp / "train_masks.npy", train_masks)
        write_npy(tmp / "test_images.npy", test_images)
        write_csv(tmp / "manifest.csv", manifest)
    summary = {
        "train_images": int(len(train)), "test_images": int(len(test)),
        "subjects": int(train.subject.nunique()), "height": int(shape[0]), "width": int(shape[1]),
        "empty_fraction": round(float(1 - train.has_mask.mean()), 4),
        "mean_mask_area": round(float(areas[areas > 0].mean()) if (areas > 0).any() else 0.0, 1),
    }
    write_json(metrics_path, summary)
    return summary


def read_manifest(interim_dir: str | Path) -> pd.DataFrame:
    """The load stage's manifest, with the test ids kept as strings."""
    return pd.read_csv(Path(interim_dir) / "manifest.csv", dtype={"id": str, "mask_path": str},
                       keep_default_na=False, na_values={"subject": [""], "frame": [""], "has_mask": [""],
                                                         "mask_area": [""]})


def open_arrays(interim_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped (images, masks) of one split; masks is None for the test split."""
    d = Path(interim_dir)
    images = np.load(d / f"{split}_images.npy", mmap_mode="r")
    masks = np.load(d / f"{split}_masks.npy", mmap_mode="r") if split == "train" else None
    return images, masks
