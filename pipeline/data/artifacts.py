"""Every file format passed between stages, with its one writer and its one reader.

Why: a format written in one stage and parsed in another drifts unless one module owns it;
and a stage must never import another stage's module. Who writes and who reads each:

| artifact | writer | readers |
|---|---|---|
| interim arrays + `manifest.csv` | load | dedup, clean, augment, train, tune, predict, report |
| `pairs.csv`, `groups.csv` | dedup | clean |
| cleaned `manifest.csv` (kept train rows) | clean | train |
| augmentation pipeline (albumentations JSON) | augment | train |
| `oof.npz` (out-of-fold probabilities) | train | tune, report |
| `folds.json` in the models folder (this run's folds) | train | predict |
| `thresholds.json` | tune | predict, report |
| `oof_scores.csv` (per-image OOF scores) | tune | report |
| synthetic truth (`truth/*.csv`) | synth | clean, predict |
| `fingerprint.json` (what the dataset is like) | load | plan, report |
| `plan.json` (every `auto` knob resolved) | plan | dedup, augment, train, tune, predict, report |
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.data.io import atomic_dir, atomic_path, read_json, write_csv, write_json, write_npy

# ---------------------------------------------------------------- interim arrays + manifest (load)

MANIFEST_COLUMNS = ["id", "split", "row", "subject", "frame", "has_mask", "mask_area", "height", "width",
                    "path", "mask_path"]


def write_interim(folder: str | Path, *, train_images: np.ndarray, train_masks: np.ndarray,
                  test_images: np.ndarray, manifest: pd.DataFrame) -> None:
    """`train_images.npy`, `train_masks.npy` (0/1), `test_images.npy` and `manifest.csv`, as one folder."""
    with atomic_dir(folder) as tmp:
        write_npy(tmp / "train_images.npy", train_images)
        write_npy(tmp / "train_masks.npy", train_masks)
        write_npy(tmp / "test_images.npy", test_images)
        write_csv(tmp / "manifest.csv", manifest[MANIFEST_COLUMNS])


def read_manifest(interim_dir: str | Path) -> pd.DataFrame:
    """The load stage's manifest, with the test ids kept as strings."""
    path = Path(interim_dir) / "manifest.csv"
    try:
        manifest = pd.read_csv(path, dtype={"id": str, "mask_path": str}, keep_default_na=False,
                               na_values={"subject": [""], "frame": [""], "has_mask": [""], "mask_area": [""]})
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run the load stage first)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable manifest ({exc})") from None
    missing = [c for c in ("id", "split", "row", "height", "width") if c not in manifest.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (not written by the load stage?)")
    _whole_numbers(manifest, path, {"row": 0, "height": 1, "width": 1})
    return manifest


def _whole_numbers(table: pd.DataFrame, path: Path, minimum: dict[str, int]) -> None:
    """Each column of `minimum` holds whole numbers >= its minimum in every row; else one InputError naming
    the column and the first bad row's CSV line (the header is line 1)."""
    for column, least in minimum.items():
        values = pd.to_numeric(table[column], errors="coerce")
        whole = values.notna() & np.isfinite(values) & (values == values.round()) & (values >= least)
        if not whole.all():
            k = int(np.flatnonzero(~whole.to_numpy())[0])
            raise InputError(f"{path}: column {column} must hold whole numbers >= {least}, got "
                             f"{_shown(_plain(table[column].iloc[k]))} on line {k + 2}")
        table[column] = values.astype(np.int64)


def _open_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run the load stage first)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: unreadable or truncated array ({exc or type(exc).__name__})") from None


def open_arrays(interim_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped (images, masks) of one split; masks is None for the test split."""
    d = Path(interim_dir)
    images = _open_array(d / f"{split}_images.npy")
    masks = _open_array(d / f"{split}_masks.npy") if split == "train" else None
    return images, masks


def size_groups(heights: Sequence[int], widths: Sequence[int]) -> list[tuple[tuple[int, int], np.ndarray]]:
    """((height, width), positions) of each native size, largest group first.

    Images of mixed sizes share one zero-padded array, each in its top-left corner: image k is
    `images[k, :h, :w]`; code that works on whole arrays does so one size at a time.
    """
    sizes = np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], axis=1).reshape(-1, 2)
    if len(sizes) == 0:
        return []
    unique, inverse, counts = np.unique(sizes, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [((int(unique[g][0]), int(unique[g][1])), np.flatnonzero(inverse.ravel() == g)) for g in order]


def size_chunks(heights: Sequence[int], widths: Sequence[int], chunk: int
                ) -> list[tuple[tuple[int, int], np.ndarray]]:
    """`size_groups` cut into batches of at most `chunk` images of one native size."""
    return [(size, positions[start:start + chunk]) for size, positions in size_groups(heights, widths)
            for start in range(0, len(positions), chunk)]


# ---------------------------------------------------------------- CSV tables of text cells

def read_text_csv(path: Path, columns: Sequence[str], hint: str) -> pd.DataFrame:
    """A CSV read as text (so rows written back stay byte-identical), checked for `columns`."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: not found ({hint})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def _flags(table: pd.DataFrame, path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Boolean columns written as True/False; anything else is a broken file, not a silent False."""
    for column in columns:
        values = table[column].astype(str)
        if not values.isin(["True", "False"]).all():
            raise InputError(f"{path}: column {column} must hold True/False, got {sorted(set(values))[:3]}")
        table[column] = values == "True"
    return table


# ---------------------------------------------------------------- near-duplicate pairs (dedup)

PAIR_COLUMNS = ["id_a", "id_b", "distance", "has_mask_a", "has_mask_b", "mask_dice", "contradictory"]


def write_pairs(folder: str | Path, pairs: pd.DataFrame, groups: pd.DataFrame) -> None:
    """`pairs.csv` (one row per near-duplicate pair) and `groups.csv` (id, group), as one folder."""
    with atomic_dir(folder) as tmp:
        write_csv(tmp / "pairs.csv", pairs[PAIR_COLUMNS])
        write_csv(tmp / "groups.csv", groups[["id", "group"]])


def read_pairs(folder: str | Path) -> pd.DataFrame:
    """The dedup stage's pairs: ids as text, the three flags as booleans."""
    path = Path(folder) / "pairs.csv"
    flags = ["has_mask_a", "has_mask_b", "contradictory"]
    return _flags(read_text_csv(path, ["id_a", "id_b", *flags], "run the dedup stage first"), path, flags)


# ---------------------------------------------------------------- cleaned manifest (clean)

def write_kept_manifest(folder: str | Path, kept: pd.DataFrame) -> None:
    """The kept train rows of the interim manifest, unchanged, as `manifest.csv` in one folder."""
    with atomic_dir(folder) as tmp:
        write_csv(tmp / "manifest.csv", kept)


def read_training_manifest(path: str | Path, n_rows: int) -> pd.DataFrame:
    """The cleaned manifest's train rows; checks the columns training needs and the row range."""
    path = Path(path)
    try:
        manifest = pd.read_csv(path, dtype={"id": str, "subject": str})
    except FileNotFoundError:
        raise InputError(f"{path}: manifest not found (run the clean stage)") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, not a manifest (run the clean stage again)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable manifest ({_shown(exc, 200)})") from None
    missing = {"id", "split", "row", "subject"} - set(manifest.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    _whole_numbers(manifest, path, {"row": 0})
    manifest = manifest[manifest.split == "train"].reset_index(drop=True)
    if manifest.empty:
        raise InputError(f"{path}: no training rows")
    bad = manifest[(manifest.row < 0) | (manifest.row >= n_rows)]
    if len(bad):
        raise InputError(f"{path}: row {int(bad.row.iloc[0])} (id {bad.id.iloc[0]}) is outside the "
                         f"{n_rows} training images of the load stage")
    return manifest


# ---------------------------------------------------------------- augmentation pipeline (augment)

def save_augmentation(transform: Any, path: str | Path) -> None:
    """An albumentations pipeline in albumentations' own JSON serialization."""
    import albumentations as A

    with atomic_path(path) as tmp:
        A.save(transform, str(tmp), data_format="json")


def load_augmentation(path: str | Path) -> Any:
    import albumentations as A

    path = Path(path)
    try:
        return A.load(str(path), data_format="json")
    except FileNotFoundError:
        raise InputError(f"{path}: augmentation pipeline not found (run the augment stage)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not an albumentations pipeline ({exc})") from None


# ---------------------------------------------------------------- out-of-fold predictions (train)

OOF_KEYS = ("ids", "mask_prob", "presence_prob")


def write_oof(folder: str | Path, *, ids: np.ndarray, mask_prob: np.ndarray, presence_prob: np.ndarray) -> None:
    """`oof.npz`: ids (str), mask_prob (N,h,w) at the working size, presence_prob (N,)."""
    with atomic_path(Path(folder) / "oof.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, ids=np.asarray(ids, dtype=str), mask_prob=mask_prob, presence_prob=presence_prob)


def read_oof(oof_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask_prob (N,h,w), presence_prob (N,) float32) from the train stage's oof.npz, checked."""
    path = Path(oof_dir) / "oof.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in OOF_KEYS if k not in data]
            if missing:
                raise InputError(f"{path}: missing key(s) {', '.join(missing)} (expected {', '.join(OOF_KEYS)})")
            ids, mask_prob, presence = (data[k] for k in OOF_KEYS)
    except FileNotFoundError:
        raise InputError(f"{path}: out-of-fold predictions not found (run the train stage)") from None
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file (click would say just "Aborted")
        hint = "; save ids as a str array, not objects" if "allow_pickle" in str(exc) else ""
        raise InputError(f"{path}: unreadable ({exc or type(exc).__name__}{hint})") from None
    n = len(ids)
    if n == 0 or mask_prob.ndim != 3 or mask_prob.shape[0] != n or presence.shape != (n,):
        raise InputError(f"{path}: inconsistent shapes: ids {ids.shape}, mask_prob {mask_prob.shape}, "
                         f"presence_prob {presence.shape}")
    ids = ids.astype(str)
    names, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = names[counts > 1]
        raise InputError(f"{path}: {len(dup)} id(s) appear more than once in the out-of-fold predictions, "
                         f"e.g. {', '.join(dup[:5])} (each train image must be predicted by exactly one fold)")
    for name, values in (("mask_prob", mask_prob), ("presence_prob", presence)):
        check_probabilities(values, f"{path}: {name}", ids)
    return ids, mask_prob, presence.astype(np.float32)


def read_oof_presence(oof_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, presence_prob float32) of oof.npz, without loading the mask probabilities."""
    path = Path(oof_dir) / "oof.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["ids"].astype(str), data["presence_prob"].astype(np.float32)
    except FileNotFoundError:
        raise InputError(f"{path}: out-of-fold predictions not found (run the train stage)") from None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise InputError(f"{path}: unreadable ({exc or type(exc).__name__})") from None


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


# ---------------------------------------------------------------- thresholds (tune)

@dataclass(frozen=True)
class Thresholds:
    """A pixel is foreground when its probability is above `pixel`; 8-connected components smaller than
    `min_component` x the image area are dropped and, with `keep_largest`, all but the largest; a mask
    is then kept only if its presence probability is at least `presence` and its area at least
    `min_area` native pixels (the order and details: `pipeline.model.postprocess`)."""
    pixel: float = 0.5
    presence: float = 0.5
    min_area: int = 0
    keep_largest: bool = False
    min_component: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def write_thresholds(path: str | Path, thresholds: Thresholds) -> None:
    write_json(path, thresholds.to_dict())


def read_thresholds(path: str | Path) -> Thresholds:
    """Load the tune stage's thresholds.json, refusing anything but sane values.

    `keep_largest` and `min_component` may be absent (a thresholds.json from before the component
    rules): they then default to off, so such a file gives the same masks as before.
    """
    path = Path(path)
    try:
        raw = read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: thresholds file not found (run the tune stage)") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({_shown(exc, 200)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    names = [f.name for f in dataclasses.fields(Thresholds)]
    required, optional = names[:3], names[3:]
    if not isinstance(raw, dict) or not set(required) <= set(raw) or not set(raw) <= set(names):
        raise InputError(f"{path}: expected exactly the keys {', '.join(required)} "
                         f"(and optionally {', '.join(optional)})")
    for name in ("pixel", "presence", "min_component"):
        v = raw.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"{path}: {name} must be a number in [0, 1], got {v!r}")
    v = raw["min_area"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InputError(f"{path}: min_area must be a non-negative integer, got {v!r}")
    if not isinstance(raw.get("keep_largest", False), bool):
        raise InputError(f"{path}: keep_largest must be true or false, got {raw['keep_largest']!r}")
    return Thresholds(pixel=float(raw["pixel"]), presence=float(raw["presence"]), min_area=v,
                      keep_largest=raw.get("keep_largest", False), min_component=float(raw.get("min_component", 0.0)))


# ---------------------------------------------------------------- the trained folds (train)

TRAINED_FOLDS = "folds.json"


@dataclass(frozen=True)
class TrainedFolds:
    """The folds the last train run produced (`fold_K/` in the models folder) and its run hash:
    exactly the models predict may average (older folds of other settings are never used)."""
    run_hash: str
    folds: tuple[int, ...]


def write_trained_folds(models: str | Path, *, run_hash: str, folds: Sequence[int]) -> None:
    """Published with the stage's commit, though the models folder is otherwise written in place."""
    text = json.dumps({"run_hash": run_hash, "folds": [int(k) for k in folds]}, indent=1) + "\n"
    with atomic_path(Path(models) / TRAINED_FOLDS, with_commit=True) as tmp:
        tmp.write_text(text)


def read_trained_folds(models: str | Path) -> TrainedFolds:
    """The models folder's `folds.json`; one InputError naming the file for anything else. The
    folders it names are built from integers, so they always lie inside the models folder."""
    path = Path(models) / TRAINED_FOLDS
    raw = _read_json(path, missing=f"not found: {models} holds no list of the trained folds (run the train stage)",
                     unreadable="not valid JSON")
    folds = raw.get("folds") if isinstance(raw, dict) else None
    run_hash = raw.get("run_hash") if isinstance(raw, dict) else None
    if (not isinstance(run_hash, str) or not run_hash or not isinstance(folds, list) or not folds
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 1000 for k in folds)
            or len(set(folds)) != len(folds)):
        raise InputError(f"{path}: expected {{\"run_hash\": \"...\", \"folds\": [distinct fold numbers 0-999]}}")
    return TrainedFolds(run_hash, tuple(folds))


# ---------------------------------------------------------------- per-image OOF scores (tune)

SCORE_COLUMNS = ("id", "presence_prob", "truth_area", "predicted_area", "dice", "truth_empty", "predicted_empty",
                 "rle")


def write_oof_scores(path: str | Path, scores: pd.DataFrame) -> None:
    write_csv(path, scores[list(SCORE_COLUMNS)])


def read_oof_scores(path: Path) -> pd.DataFrame:
    """The tune stage's per-image scores: ids and RLE as text, numbers as float64, flags as bool."""
    try:
        table = pd.read_csv(path, dtype={"id": str, "rle": str}, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run the tune stage)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (run the tune stage)")
    try:
        table["presence_prob"] = table["presence_prob"].to_numpy(np.float32)  # float32 round-trips its text
        for column in ("truth_area", "predicted_area", "dice"):
            table[column] = table[column].to_numpy(np.float64)
        for column in ("truth_empty", "predicted_empty"):
            table[column] = table[column].astype(str).str.lower().map({"true": True, "false": False})
        if table[["truth_empty", "predicted_empty"]].isna().any().any() or \
                table[["truth_area", "predicted_area", "dice"]].isna().any().any():
            raise ValueError("empty or non-boolean cells")
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable values ({exc})") from None
    return table


# ---------------------------------------------------------------- the plan (plan)

@dataclass(frozen=True)
class Plan:
    """Resolved values of the `auto` knobs (dotted key -> value) and which of them were automatic."""
    values: dict[str, Any]
    automatic: tuple[str, ...]
    source: str = "the plan"   # the file it was read from, for error messages
    estimate: dict[str, Any] | None = None   # the training-time estimate (`write_plan`); None in older plans

    def apply(self, params: Any) -> Any:
        """`params` with each key that is still `auto` set to its resolved value (validated again);
        a key `auto` in `params` but not in the plan is an error (a plan of other params)."""
        for section in ("train", "dedup", "tune"):
            for name, value in dataclasses.asdict(getattr(params, section)).items():
                key = f"{section}.{name}"
                if value != "auto":
                    continue
                if key not in self.values:
                    raise InputError(f"{key} is auto, but the plan has no value for it (run the plan stage again)")
                planned = self.values[key]
                planned = tuple(planned) if isinstance(planned, list) else planned
                try:
                    params = dataclasses.replace(params, **{section: dataclasses.replace(getattr(params, section),
                                                                                         **{name: planned})})
                except ValueError as exc:   # pydantic's ValidationError: a hand-edited or corrupt plan
                    problem = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
                    raise InputError(f"{self.source}: {key}: planned value {_shown(planned)} is not valid "
                                     f"({_shown(problem, 200)}; run the plan stage again)") from None
        return params


def write_plan(path: str | Path, plan: Plan, basis: dict[str, Any], estimate: dict[str, Any]) -> None:
    """`plan.json`: the values (flat dotted keys, so `dvc exp show` lists them), the automatic keys,
    the facts they were resolved from, and the estimated training time (`estimate`: train_seconds,
    image_steps, optimizer_steps_per_fold, the measured `probe` rates it came from, and
    `budget_capped_from` when `train.max_minutes` cut the auto budget, `probe_rechecks` when the
    probe was timed again before a cap)."""
    write_json(path, {"values": plan.values, "automatic": list(plan.automatic), "basis": basis,
                      "estimate": estimate})


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        raw = read_json(path)
        plan = Plan(dict(raw["values"]), tuple(raw["automatic"]), str(path), raw.get("estimate"))
    except FileNotFoundError:
        raise InputError(f"{path}: plan not found (run the plan stage)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a plan written by the plan stage ({_shown(exc, 200)})") from None
    return plan  # its estimate is informative only (the report checks it before showing it)


# ---------------------------------------------------------------- dataset fingerprint (load)

def _positive(value: Any, integer: bool) -> bool:
    """A finite number > 0 (an int when `integer`); never a bool."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value) and value > 0


def read_fingerprint(path: str | Path) -> dict[str, Any]:
    """The load stage's fingerprint (`pipeline.data.fingerprint`), with the facts the plan sizes things from
    checked: images, groups and every size's height, width and count positive integers, the median height
    and width finite and positive, one_image_per_group true or false. A NaN or 0 there would plan
    `train.height: 0`."""
    path = Path(path)
    fp = _read_json(path, missing="fingerprint not found (run the load stage)",
                    unreadable="not a fingerprint written by the load stage")
    if not isinstance(fp, dict):
        raise InputError(f"{path}: not a fingerprint written by the load stage (not a JSON object)")
    checks = [(key, _positive(fp.get(key), integer)) for key, integer in
              (("images", True), ("groups", True), ("median_height", False), ("median_width", False))]
    checks.append(("one_image_per_group", isinstance(fp.get("one_image_per_group"), bool)))
    sizes = fp.get("sizes")
    checks.append(("sizes", isinstance(sizes, list) and all(
        isinstance(s, dict) and all(_positive(s.get(k), True) for k in ("height", "width", "count")) for s in sizes)))
    bad = [key for key, ok in checks if not ok]
    if bad:
        key = bad[0]
        raise InputError(f"{path}: {key} is {_shown(fp.get(key))}, not what the load stage writes "
                         f"({'a list of positive height, width and count' if key == 'sizes' else 'true or false' if key == 'one_image_per_group' else 'a positive number'}); "
                         "run the load stage again")
    return fp


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (its repr is then `0`, not `np.int64(0)`)."""
    return value.item() if isinstance(value, np.generic) else value


def _read_json(path: Path, *, missing: str, unreadable: str) -> Any:
    """`read_json(path)`, with a missing or unreadable file as one InputError: "{path}: {missing}" or
    "{path}: {unreadable} (why)"."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {unreadable} ({_shown(exc, 200)})") from None


def _shown(value: Any, most: int = 80) -> str:
    """A value's repr for an error message, at most `most` characters."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} characters)"


# ---------------------------------------------------------------- synthetic truth (synth)

TRAIN_TRUTH = Path("truth") / "train_truth.csv"   # id, corrupted, visible, twin_of, ...
TEST_TRUTH = Path("truth") / "test_masks.csv"     # a submission of the true test masks (Kaggle encoding)


def read_train_truth(raw_dir: str | Path) -> pd.DataFrame | None:
    """The generator's per-frame truth (which frames it corrupted); None for real data."""
    path = Path(raw_dir) / TRAIN_TRUTH
    if not path.is_file():
        return None
    return _flags(read_text_csv(path, ["id", "corrupted"], "generator truth"), path, ["corrupted"])
