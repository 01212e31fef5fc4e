"""Against a peer: this pipeline and nnU-Net v2 (2d) on real ultrasound, same images, equal budget.

Trains this pipeline with its own stage functions (load, plan, dedup, clean, augment, train,
tune, predict, as `bench_quality.py` calls them) and nnU-Net v2's 2d configuration with its
own commands (`nnUNetv2_plan_and_preprocess`, `nnUNetv2_train -device cpu`, `nnUNetv2_predict`)
on the same training images of USGRA-seg, with an equal training budget in image-steps
(images per optimizer step x steps; our validation passes and nnU-Net's few validation
iterations are forward-only and not counted), predicts the same held-out images
(the publisher's `test/`), and scores both with this project's metric (`pipeline.model.metrics`:
per-image Dice, empty prediction on empty truth = 1, averaged) and IoU (same empty rule).

nnU-Net's budget is set by a trainer subclass, `nnUNetTrainer_BenchPeer`, which this script
writes into nnU-Net's own trainer package at run time (nnU-Net finds trainers by class name
there); it reads epochs, iterations per epoch and a seed from the environment and skips the
final validation (fold `all` would validate on its own training images).

Variants (`--variant`):
  full        the images as published (every mask has a nerve; 204 train / 40 test)
  empty-rich  fixed-size windows cut from each image, some holding the whole nerve and some
              none of it (about 60% empty); train windows come only from train images and test
              windows only from test images, so no source image is on both sides, and our
              folds group the windows of one source image (`data.group_column`)

    python benchmarks/bench_peer.py [--variant full|empty-rich] [--budget N] [--seeds 42 43]
                                    [--work /tmp/bench_peer] [--install]

Data: "USGRA-seg dataset, tmkand/usgra-seg, CC-BY 4.0" (read from ../shared/datasets/usgra-seg,
never copied into the repository; converted copies go under --work).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stages import augment, clean, dedup, load, plan, predict, train, tune  # noqa: E402
from pipeline.data import rle
from pipeline.data.artifacts import read_plan, read_training_manifest  # noqa: E402
from pipeline.data.io import read_image, read_mask, write_json  # noqa: E402
from pipeline.model.metrics import dice_per_image  # noqa: E402
from pipeline.params import Params, with_settings  # noqa: E402

CREDIT = "USGRA-seg dataset, tmkand/usgra-seg, CC-BY 4.0"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "usgra-seg"
DATASET_ID, DATASET_NAME = 987, "Dataset987_BenchPeer"
TRAINER = "nnUNetTrainer_BenchPeer"
TRAINER_SOURCE = '''"""Written by nerveseg's benchmarks/bench_peer.py: nnU-Net's own trainer, budget from the environment."""
import os
import random

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_BenchPeer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records the constructor's named arguments (no *args / **kwargs)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("BENCH_PEER_EPOCHS", "1"))
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_PEER_ITERATIONS", "250"))
        self.num_val_iterations_per_epoch = int(os.environ.get("BENCH_PEER_VAL_ITERATIONS", "1"))
        seed = int(os.environ.get("BENCH_PEER_SEED", "0"))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("bench_peer: final validation skipped")
'''


# ----------------------------------------------------------------------------- timing and scoring

class Clock:
    """Wall seconds and CPU seconds (this process and its waited-for children, user + system)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def iou_per_image(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of one pair; both empty -> 1.0 (the Dice rule of `pipeline.model.metrics`)."""
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def score(preds: dict[str, np.ndarray], truths: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean Dice (this project's metric) and mean IoU over the truth's images; a missing prediction is an error."""
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise RuntimeError(f"no prediction for {len(missing)} test image(s), e.g. {missing[:3]}")
    dice = [float(dice_per_image(preds[i], truths[i])) for i in truths]
    iou = [iou_per_image(preds[i], truths[i]) for i in truths]
    return {"dice": float(np.mean(dice)), "iou": float(np.mean(iou)), "images": len(truths),
            "empty_truths": int(sum(not t.any() for t in truths.values()))}


# ----------------------------------------------------------------------------- datasets

@dataclasses.dataclass(frozen=True)
class Variant:
    """One dataset in the `folders` layout (`images/`, `masks/`, `test/images/`, `test/masks/`)."""
    raw: Path
    foreground: tuple[int, ...] | None  # palette indices of the nerve; None: 0/255 masks
    group_csv: str | None = None  # id,group table in `raw` (windows of one source image share a group)

    def pairs(self, split: str) -> list[tuple[str, Path, Path]]:
        base = split_root(self.raw, split)
        return [(p.stem, p, base / "masks" / p.name) for p in sorted((base / "images").glob("*.png"))]

    def truth(self, path: Path) -> np.ndarray:
        return read_mask(path, list(self.foreground) if self.foreground else None)


def full_variant(src: Path) -> Variant:
    """The published images, read in place."""
    return Variant(src, (1,))


def _gray(path: Path) -> np.ndarray:
    return read_image(path, "gray")[0]


def split_root(root: Path, split: str) -> Path:
    """Where a split's `images/` and `masks/` lie in the `folders` layout."""
    return root if split == "train" else root / "test"


def _fresh_layout(dst: Path) -> tuple[str, ...]:
    """Empty `images/` and `masks/` folders for both splits under `dst` (a scratch folder under --work)."""
    if dst.exists():
        shutil.rmtree(dst)
    splits = ("train", "test")
    for split in splits:
        (split_root(dst, split) / "images").mkdir(parents=True)
        (split_root(dst, split) / "masks").mkdir(parents=True)
    return splits


def scaled_variant(source: Variant, dst: Path, scale: float) -> Variant:
    """Every image of `source` resized by `scale` into `dst` (area-averaged image, nearest-neighbour 0/255 mask).

    Both methods then train on and predict the same smaller images and are scored at that size, so
    CPU runs of nnU-Net (which otherwise plans full-resolution patches) fit in minutes."""
    for split in _fresh_layout(dst):
        base = split_root(dst, split)
        for stem, image_path, mask_path in source.pairs(split):
            image = Image.fromarray(_gray(image_path))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image.resize(size, Image.Resampling.BOX).save(base / "images" / f"{stem}.png")
            mask = Image.fromarray((source.truth(mask_path) * 255).astype(np.uint8))
            mask.resize(size, Image.Resampling.NEAREST).save(base / "masks" / f"{stem}.png")
    return Variant(dst, None)


def _windows(image: np.ndarray, mask: np.ndarray, size: int, positives: int, negatives: int,
             rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """Top-left corners of windows: `positives` holding the whole nerve, `negatives` holding none of it.

    A positive needs the nerve's bounding box (every component) to fit; a negative needs no nerve
    pixel and at least half its pixels above 0 (not the letterbox band)."""
    h, w = mask.shape
    if h < size or w < size:
        return []
    out: list[tuple[str, int, int]] = []
    ys, xs = np.nonzero(mask)
    if len(ys) and ys.max() - ys.min() < size and xs.max() - xs.min() < size:
        y_lo, y_hi = max(0, ys.max() - size + 1), min(ys.min(), h - size)
        x_lo, x_hi = max(0, xs.max() - size + 1), min(xs.min(), w - size)
        for _ in range(positives):
            out.append(("p", int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))))
    found = 0
    for _ in range(200):
        if found == negatives:
            break
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if not mask[y:y + size, x:x + size].any() and (image[y:y + size, x:x + size] > 0).mean() >= 0.5:
            out.append(("n", y, x))
            found += 1
    return out


def empty_rich_variant(source: Variant, dst: Path, seed: int = 0, size: int = 256, positives: int = 2,
                       negatives: int = 3) -> Variant:
    """Cut windows from every image of `source` into `dst` (0/255 masks): about negatives/(positives+negatives)
    empty. Train windows only from `images/`, test windows only from `test/images/`, so no source image is
    on both sides; `groups.csv` gives each train window its source image as group."""
    rng = np.random.default_rng(seed)
    groups = []
    for split in _fresh_layout(dst):
        base = split_root(dst, split)
        for stem, image_path, mask_path in source.pairs(split):
            image, mask = _gray(image_path), source.truth(mask_path)
            for k, (kind, y, x) in enumerate(_windows(image, mask, size, positives, negatives, rng)):
                wid = f"{stem}_{kind}{k}"
                Image.fromarray(image[y:y + size, x:x + size]).save(base / "images" / f"{wid}.png")
                Image.fromarray((mask[y:y + size, x:x + size] * 255).astype(np.uint8)).save(
                    base / "masks" / f"{wid}.png")
                if split == "train":
                    groups.append({"id": wid, "group": stem})
    pd.DataFrame(groups).to_csv(dst / "groups.csv", index=False)
    return Variant(dst, None, "groups.csv")


def describe(variant: Variant) -> str:
    parts = []
    for split in ("train", "test"):
        pairs = variant.pairs(split)
        empty = sum(not variant.truth(m).any() for _, _, m in pairs)
        parts.append(f"{split} {len(pairs)} images ({empty / max(len(pairs), 1):.0%} empty)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- this pipeline

def with_overrides(p: Params, overrides: list[str]) -> Params:
    """`section.key=value` settings (`params.with_settings`: parsed as params.yaml is, validated together) applied to `p`."""
    try:
        return with_settings(p, overrides)
    except ValueError as exc:
        sys.exit(f"error: --set: {exc}")


def our_params(variant: Variant, seed: int, overrides: list[str] = ()) -> Params:
    base = Params()
    data = dataclasses.replace(base.data, raw_dir=str(variant.raw), layout="folders", foreground=variant.foreground,
                               group_column="group" if variant.group_csv else None,
                               csv_file=variant.group_csv or base.data.csv_file, id_column="id")
    p = dataclasses.replace(base, seed=seed, data=data)
    return with_overrides(p, list(overrides))


def _fold_steps(manifest: Path, n_rows: int, folds: int, trained: int, batch: int, seed: int) -> int:
    """Images per epoch summed over the `trained` folds: floor(n / batch) x batch (drop_last), n when n <= batch."""
    table = read_training_manifest(manifest, n_rows)
    assign = train.subject_folds(table.subject.to_numpy(), folds, seed)
    total = 0
    for k in range(trained):
        n = int((assign != k).sum())
        total += n if n <= batch else (n // batch) * batch
    return total


def tune_and_score(variant: Variant, p: Params, root: Path) -> tuple[dict, dict]:
    """Tune and predict on the trained run under `root`, then score the submission as nnU-Net's
    masks are scored: (scores, predict's summary)."""
    interim, plan_json = root / "interim", root / "plan.json"
    tune.run(p, oof=root / "oof", interim=interim, plan=plan_json, out=root / "thresholds.json",
             reports=root / "tune_reports")
    summary = predict.run(p, interim=interim, models=root / "models", thresholds=root / "thresholds.json",
                          raw=variant.raw, out=root / "submission.csv", metrics=root / "predict.json")
    # decode our own submission at each test image's native size, then score as for nnU-Net
    sub = pd.read_csv(root / "submission.csv", dtype=str, keep_default_na=False)
    id_col, rle_col = p.data.submission_columns
    order = "F" if p.data.rle_order == "column" else "C"
    truths, preds = {}, {}
    encoded = dict(zip(sub[id_col], sub[rle_col]))
    for stem, _, mask_path in variant.pairs("test"):
        truths[stem] = variant.truth(mask_path)
        preds[stem] = rle.decode(encoded.get(stem, ""), truths[stem].shape, order, p.data.rle_start)
    return score(preds, truths), summary


def rescore(variant: Variant, work: Path, name: str, seed: int) -> dict:
    """Re-run tune and predict on a finished `--ours-only` run (its trained models kept under `work`),
    with the code as it is now, and rewrite its result file: a change to tune or predict needs no
    retraining to be measured."""
    path = work / f"results_{name}_seed_{seed}.json"
    result = json.loads(path.read_text())
    p = our_params(variant, seed, result.get("overrides", []))
    if result.get("budget") is not None:
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, budget=result["budget"]))
    scores, _ = tune_and_score(variant, p, work / "ours" / f"seed_{seed}")
    ours = result["rows"]["this pipeline"]
    before = ours["dice"]
    ours.update(scores)
    ours["detail"] += f"; re-scored (tune, predict) with later code: test Dice {before:.4f} -> {scores['dice']:.4f}"
    write_json(path, result)
    return ours


def run_ours(variant: Variant, seed: int, budget: int | None, root: Path,
             epochs: int | None, overrides: list[str] = ()) -> dict:
    """The stage chain under `root`; returns scores, image-steps and seconds. `budget` (image-steps)
    is spent by the plan (None: its default, `train.budget: auto`); `epochs` overrides the plan's."""
    if root.exists():
        shutil.rmtree(root)  # train resumes a matching run hash: start clean
    root.mkdir(parents=True)
    p = our_params(variant, seed, overrides)
    if budget is not None:
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, budget=budget))
    if epochs is not None:
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, epochs=epochs))
    clock = Clock()
    interim, plan_json = root / "interim", root / "plan.json"
    load.run(p, raw=variant.raw, out=interim, metrics=root / "load.json", fingerprint=root / "fingerprint.json")
    plan.run(p, fingerprint=root / "fingerprint.json", out=plan_json)
    dedup.run(p, interim=interim, plan=plan_json, out=root / "dedup", reports=root / "dedup_reports", progress=False)
    clean.run(p, interim=interim, dedup=root / "dedup", raw=variant.raw, out=root / "processed",
              metrics=root / "clean.json")
    the_plan = read_plan(plan_json)
    planned = the_plan.apply(p).train
    batch, epochs, trained_folds, folds = planned.batch_size, planned.epochs, planned.train_folds, planned.folds
    n_rows = len(pd.read_csv(interim / "manifest.csv").query("split == 'train'"))
    per_epoch = _fold_steps(root / "processed" / "manifest.csv", n_rows, folds, trained_folds, batch, seed)
    estimate = the_plan.estimate
    augment.run(p, interim=interim, plan=plan_json, out=root / "augment.json", preview=root / "preview.png")
    train_clock = Clock()
    trained = train.run(p, interim=interim, manifest=root / "processed" / "manifest.csv",
                        augment=root / "augment.json", plan=plan_json, models=root / "models", oof=root / "oof",
                        reports=root / "train_reports")
    train_wall, train_cpu = train_clock.read()
    scores, summary = tune_and_score(variant, p, root)
    wall, cpu = clock.read()
    return {**scores, "image_steps": per_epoch * epochs, "train_wall": train_wall,
            "train_cpu": train_cpu, "wall": wall, "cpu": cpu, "estimated_train_seconds": estimate["train_seconds"],
            "detail": f"{trained_folds} of {folds} folds x {epochs} epochs, batch {batch}, "
                      f"plan's estimate {estimate['train_seconds']:.0f} s vs {train_wall:.0f} s, "
                      f"{per_epoch} image-steps/epoch (trained folds); OOF Dice {trained.get('dice')}, predict's own test Dice {summary.get('test_dice')}"}


# ----------------------------------------------------------------------------- nnU-Net v2

def ensure_nnunet(install: bool) -> Path:
    """nnU-Net's trainer package folder; pip installs the `peer` extra's nnunetv2 when asked."""
    if importlib.util.find_spec("nnunetv2") is None:
        if not install:
            sys.exit("nnunetv2 is not installed: pip install -e '.[peer]' (or rerun with --install)")
        subprocess.run([sys.executable, "-m", "pip", "install", "nnunetv2"], check=True)
    spec = importlib.util.find_spec("nnunetv2.training.nnUNetTrainer")
    folder = Path(next(iter(spec.submodule_search_locations)))
    target = folder / f"{TRAINER}.py"
    if not target.exists() or target.read_text() != TRAINER_SOURCE:
        target.write_text(TRAINER_SOURCE)
    return folder


def _nnunet_cmd(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else name


def _sh(args: list[str], env: dict, log: Path) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{args[0]} failed ({done.returncode}); last lines of {log}:\n{tail}")


def nnunet_raw(variant: Variant, work: Path) -> tuple[Path, Path]:
    """nnU-Net's raw layout (gray PNG `_0000` channel, 0/1 label PNG) under `work`; returns (raw root, test images)."""
    raw = work / "nnUNet_raw"
    ds = raw / DATASET_NAME
    if ds.exists():
        shutil.rmtree(ds)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (ds / sub).mkdir(parents=True)
    train_pairs = variant.pairs("train")
    for stem, image_path, mask_path in train_pairs:
        Image.fromarray(_gray(image_path)).save(ds / "imagesTr" / f"{stem}_0000.png")
        Image.fromarray(variant.truth(mask_path).astype(np.uint8)).save(ds / "labelsTr" / f"{stem}.png")
    for stem, image_path, _ in variant.pairs("test"):
        Image.fromarray(_gray(image_path)).save(ds / "imagesTs" / f"{stem}_0000.png")
    write_json(ds / "dataset.json", {"channel_names": {"0": "ultrasound"}, "labels": {"background": 0, "nerve": 1},
                                     "numTraining": len(train_pairs), "file_ending": ".png",
                                     "name": "bench_peer", "reference": CREDIT})
    return raw, ds / "imagesTs"


def run_nnunet(variant: Variant, seed: int, budget: int, work: Path, epochs: int | None,
               iterations: int | None, tta: bool, preprocessed_once: dict) -> dict:
    """Plan and preprocess (once per variant), train fold `all` on CPU for the budget, predict the test images."""
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results" / f"seed_{seed}"), "nnUNet_compile": "f"}
    env.setdefault("nnUNet_n_proc_DA", str(max(1, (os.cpu_count() or 2) - 1)))
    log = work / f"nnunet_seed_{seed}.log"
    clock = Clock()
    if not preprocessed_once:
        prep = Clock()
        _sh([_nnunet_cmd("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
             "--verify_dataset_integrity", "-np", str(os.cpu_count() or 2)], env, log)
        preprocessed_once["wall"], preprocessed_once["cpu"] = prep.read()
    plans = json.loads((work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["2d"]
    batch, patch = int(cfg["batch_size"]), cfg["patch_size"]
    total_iterations = max(1, round(budget / batch))
    if epochs is None:  # about 25 iterations an epoch, so the poly learning-rate schedule has steps to decay over
        epochs = max(1, min(total_iterations, round(total_iterations / 25)))
    if iterations is None:
        iterations = max(1, math.ceil(total_iterations / epochs))
    env.update(BENCH_PEER_EPOCHS=str(epochs), BENCH_PEER_ITERATIONS=str(iterations), BENCH_PEER_SEED=str(seed))
    results = work / "nnUNet_results" / f"seed_{seed}"
    if results.exists():
        shutil.rmtree(results)
    train_clock = Clock()
    _sh([_nnunet_cmd("nnUNetv2_train"), str(DATASET_ID), "2d", "all", "-tr", TRAINER, "-device", "cpu"], env, log)
    train_wall, train_cpu = train_clock.read()
    out = work / f"nnunet_pred_seed_{seed}"
    if out.exists():
        shutil.rmtree(out)
    args = [_nnunet_cmd("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / DATASET_NAME / "imagesTs"), "-o", str(out),
            "-d", str(DATASET_ID), "-c", "2d", "-f", "all", "-tr", TRAINER, "-chk", "checkpoint_final.pth",
            "-device", "cpu", "-npp", "1", "-nps", "1"]
    _sh(args + ([] if tta else ["--disable_tta"]), env, log)
    wall, cpu = clock.read()
    truths, preds = {}, {}
    for stem, _, mask_path in variant.pairs("test"):
        truths[stem] = variant.truth(mask_path)
        pred_path = out / f"{stem}.png"
        if pred_path.exists():
            preds[stem] = np.asarray(Image.open(pred_path)) == 1
    return {**score(preds, truths), "image_steps": epochs * iterations * batch, "train_wall": train_wall,
            "train_cpu": train_cpu, "wall": wall, "cpu": cpu,
            "detail": f"fold all, {epochs} epochs x {iterations} iterations, batch {batch}, patch {patch}, "
                      f"TTA {'on' if tta else 'off'}; plan+preprocess (once, not in seconds) "
                      f"{preprocessed_once['wall']:.0f} s wall / {preprocessed_once['cpu']:.0f} s CPU"}


# ----------------------------------------------------------------------------- main

def _table(rows: dict[str, dict]) -> str:
    ours, peer = rows["this pipeline"], rows.get("nnU-Net v2 2d")
    lines = ["| method | test Dice | test IoU | image-steps | train s (wall) | train s (CPU) | total s (wall) "
             "| total s (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['dice']:.4f} | {r['iou']:.4f} | {r['image_steps']} | {r['train_wall']:.0f} | "
                     f"{r['train_cpu']:.0f} | {r['wall']:.0f} | {r['cpu']:.0f} |")

    empty = ours["empty_truths"] / ours["images"]  # an all-empty prediction scores 1 on these, 0 elsewhere
    lines.append(f"| all-empty prediction (baseline) | {empty:.4f} | {empty:.4f} | 0 | - | - | - | - |")

    if peer is None:
        return "\n".join(lines)

    def ratio(key: str, fmt: str) -> str:
        return format(ours[key] / peer[key], fmt) if peer[key] else "-"
    lines.append(f"| ratio ours / nnU-Net | {ratio('dice', '.3f')} | {ratio('iou', '.3f')} | "
                 f"{ratio('image_steps', '.2f')} | {ratio('train_wall', '.2f')} | {ratio('train_cpu', '.2f')} | "
                 f"{ratio('wall', '.2f')} | {ratio('cpu', '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=("full", "empty-rich"), default="full")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="USGRA-seg folder (read only)")
    ap.add_argument("--budget", type=int,
                    help="training image-steps (images per step x steps), both methods (default: our plan's "
                         "train.budget: auto, 24 x the training images)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_peer"), help="scratch folder outside the repo")
    ap.add_argument("--install", action="store_true", help="pip install nnunetv2 (the `peer` extra) when missing")
    ap.add_argument("--our-epochs", type=int, help="our epochs instead of --budget (nnU-Net still gets the image-steps ours took)")
    ap.add_argument("--nnunet-epochs", type=int, help="override: nnU-Net epochs")
    ap.add_argument("--nnunet-iterations", type=int, help="override: nnU-Net iterations per epoch "
                                                          "(with --nnunet-epochs it breaks the equal budget)")
    ap.add_argument("--no-nnunet-tta", action="store_true", help="predict without nnU-Net's mirroring TTA")
    ap.add_argument("--window", type=int, help="empty-rich: window side in pixels of the scaled images "
                                                 "(default 256 x --scale)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="resize every image by this factor first, for both methods (0.25 fits a CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a params.yaml setting for this pipeline only, e.g. train.loss=lovasz (repeatable)")
    ap.add_argument("--ours-only", action="store_true", help="skip nnU-Net (technique comparisons)")
    ap.add_argument("--rescore", action="store_true",
                    help="re-run only tune and predict on the finished --ours-only runs in --work (same seeds) "
                         "with the current code, rewriting their result files")
    ap.add_argument("--nnunet-only", action="store_true",
                    help="only nnU-Net, for exactly --budget image-steps (pair with an --ours-only run of that "
                         "budget: benchmarks/peer_table.py joins the result files by variant, scale and seed)")
    args = ap.parse_args()
    if args.ours_only and args.nnunet_only:
        sys.exit("error: --ours-only and --nnunet-only exclude each other")
    if args.nnunet_only and args.budget is None:
        sys.exit("error: --nnunet-only needs --budget (the image-steps of the --ours-only run to match)")

    work = args.work.resolve()
    if work == REPO or REPO in work.parents:
        sys.exit(f"--work {work} is inside the repository: use a folder outside it")
    if not 0 < args.scale <= 1:
        sys.exit(f"error: --scale {args.scale}: expected a factor in (0, 1]")
    work.mkdir(parents=True, exist_ok=True)
    if not (args.ours_only or args.rescore):
        ensure_nnunet(args.install)
    variant = full_variant(args.data.resolve())
    if args.scale != 1:
        variant = scaled_variant(variant, work / "scaled", args.scale)
    if args.variant == "empty-rich":
        window = args.window or round(256 * args.scale)
        variant = empty_rich_variant(variant, work / "empty_rich", seed=0, size=window)
    print(f"Data: {CREDIT}. Variant {args.variant}, scale {args.scale}: {describe(variant)}", flush=True)
    if not (args.ours_only or args.rescore):
        nnunet_raw(variant, work)
    preprocessed: dict = {}
    tables: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        began = time.perf_counter()
        if args.rescore:
            ours = rescore(variant, work, args.variant, seed)
            print(f"seed {seed}: {ours['detail']}", flush=True)
            continue
        if args.nnunet_only:
            peer = run_nnunet(variant, seed, args.budget, work, args.nnunet_epochs, args.nnunet_iterations,
                              not args.no_nnunet_tta, preprocessed)
            print(f"seed {seed} ({time.perf_counter() - began:.0f} s), {args.variant}, scale {args.scale}: nnU-Net test "
                  f"Dice {peer['dice']:.4f}, IoU {peer['iou']:.4f}, {peer['image_steps']} image-steps, train CPU "
                  f"{peer['train_cpu']:.0f} s; {peer['detail']}", flush=True)
            write_json(work / f"results_{args.variant}_nnunet_seed_{seed}.json",
                       {"variant": args.variant, "scale": args.scale, "budget": args.budget, "seed": seed,
                        "overrides": [], "rows": {"nnU-Net v2 2d": peer}})
            continue
        ours = run_ours(variant, seed, args.budget, work / "ours" / f"seed_{seed}", args.our_epochs,
                        args.overrides)
        rows = {"this pipeline": ours}
        if not args.ours_only:  # equal budget: nnU-Net gets the image-steps ours actually took, unless overridden
            rows["nnU-Net v2 2d"] = run_nnunet(variant, seed, ours["image_steps"], work, args.nnunet_epochs,
                                               args.nnunet_iterations, not args.no_nnunet_tta, preprocessed)
        tables[seed] = rows
        print(f"\nseed {seed} ({time.perf_counter() - began:.0f} s), {args.variant}, scale {args.scale}, "
              f"{ours['images']} test images ({ours['empty_truths']} empty), "
              f"ours with {args.overrides or 'defaults'}\n\n{_table(rows)}\n")
        for name, r in rows.items():
            print(f"- {name}: {r['detail']}")
        print(flush=True)
        write_json(work / f"results_{args.variant}_seed_{seed}.json",
                   {"variant": args.variant, "scale": args.scale, "budget": args.budget, "seed": seed,
                    "overrides": args.overrides, "rows": rows})
    if len(tables) > 1:
        print(f"mean over {len(tables)} seeds (min-max)\n\n| method | test Dice | test IoU | train s (CPU) |\n"
              "|---|---|---|---|")
        for name in rows:
            cells = []
            for key, fmt in (("dice", ".4f"), ("iou", ".4f"), ("train_cpu", ".0f")):
                v = np.array([t[name][key] for t in tables.values()])
                cells.append(f"{v.mean():{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})")
            print(f"| {name} | {' | '.join(cells)} |")
        if not args.ours_only:
            ratio = np.array([t["this pipeline"]["dice"] / t["nnU-Net v2 2d"]["dice"] for t in tables.values()
                              if t["nnU-Net v2 2d"]["dice"]])
            if len(ratio):
                print(f"| Dice ratio ours / nnU-Net | {ratio.mean():.3f} ({ratio.min():.3f}-{ratio.max():.3f}) | | |")
    print(f"\nData: {CREDIT}.")


if __name__ == "__main__":
    main()
