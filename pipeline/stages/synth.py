"""Synthetic ultrasound in the Kaggle layout: the embedded default dataset.

Each subject has a base anatomy (speckled tissue layers, dark vessels, a bright
oval nerve with dark fascicles). Its frames are small perturbations of that base,
like video: a random-walk shift, a smooth deformation and fresh speckle. Some
frames are near-identical twins of the previous one. The nerve drifts in and out
of view, so most masks are empty; and a fraction of visible twins get their
mask erased (label noise), so near-duplicate pairs carry contradictory labels.

The truth (which frames were corrupted, the true test masks) goes to `truth/`
beside `train/` and `test/`; training never reads it, later stages score with it.

Only when the pipeline reads it: with `data.raw_dir` pointing at another dataset, the stage
writes just a note (`NOT_GENERATED.txt`) into its output folder, so `dvc repro` on a user's
data spends no time here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from pipeline.data import rle
from pipeline.data.io import atomic_dir, write_csv, write_json, write_png, write_text, write_tiff
from pipeline.params import Params

TWIN_PROBABILITY = 0.35   # chance a frame is a near-identical repeat of the previous one
VISIBILITY_SWITCH = 0.4   # sum of the two switching rates of the visible/hidden Markov chain
SYNTH_DIR = "data/raw/synthetic"   # the synth stage's output in dvc.yaml, and data.raw_dir's default
NOTE = "NOT_GENERATED.txt"         # all the stage writes when data.raw_dir is another dataset


@dataclass(frozen=True)
class Anatomy:
    """A subject's base scene at native resolution, before per-frame changes."""
    tissue: np.ndarray        # float32 echo intensity without the nerve
    nerve_echo: np.ndarray    # float32 intensity inside the nerve
    nerve_mask: np.ndarray    # bool, the nerve's extent


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return u * u + v * v


def make_anatomy(rng: np.random.Generator, shape: tuple[int, int]) -> Anatomy:
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    # Tissue: tilted, wavy horizontal layers of different echogenicity, darker with depth.
    tissue = np.full(shape, 70.0, np.float32)
    for _ in range(rng.integers(4, 7)):
        depth = rng.uniform(0.05, 0.95) * h
        tilt = rng.uniform(-0.15, 0.15)
        wave = rng.uniform(3, 12) * np.sin(xx / rng.uniform(40, 120) + rng.uniform(0, 6))
        thickness = rng.uniform(6, 30)
        tissue += rng.uniform(-35, 60) * np.exp(-((yy - depth - tilt * xx - wave) / thickness) ** 2)
    tissue *= np.linspace(1.15, 0.7, h, dtype=np.float32)[:, None]
    # Vessels: dark round lumens with a bright wall.
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(12, 30)
        d = _ellipse(shape, rng.uniform(0.2, 0.85) * h, rng.uniform(0.1, 0.9) * w, r, r * rng.uniform(0.9, 1.3), 0.0)
        tissue = np.where(d < 1, 18.0, tissue) + 50.0 * np.exp(-((np.sqrt(d) - 1.05) / 0.08) ** 2)
    # Decoys: bright ovals without fascicles (fat lobules), so presence needs texture, not brightness.
    for _ in range(rng.integers(1, 3)):
        d = _ellipse(shape, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.9) * w, rng.uniform(15, 30),
                     rng.uniform(25, 50), rng.uniform(-0.6, 0.6))
        tissue = tissue + 30.0 * np.exp(-d**2)
    # Nerve: a bright oval (epineurium) filled with dark fascicles: the "honeycomb".
    ry, rx = rng.uniform(22, 36) * h / 420, rng.uniform(38, 62) * w / 580
    cy, cx = rng.uniform(0.35, 0.6) * h, rng.uniform(0.3, 0.7) * w
    d = _ellipse(shape, cy, cx, ry, rx, rng.uniform(-0.5, 0.5))
    mask = d < 1.0
    echo = tissue + 35.0
    for _ in range(rng.integers(6, 12)):
        fy, fx = cy + rng.uniform(-0.6, 0.6) * ry, cx + rng.uniform(-0.6, 0.6) * rx
        fr = rng.uniform(0.15, 0.3) * ry
        echo -= 40.0 * np.exp(-(((yy - fy) ** 2 + (xx - fx) ** 2) / (fr * fr)) ** 2)
    echo += 35.0 * np.exp(-((np.sqrt(d) - 1.0) / 0.1) ** 2)
    return Anatomy(tissue=tissue, nerve_echo=echo, nerve_mask=mask)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    coarse = rng.normal(0, amplitude, (max(2, shape[0] // 60), max(2, shape[1] // 60)))
    return ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=3)[
        : shape[0], : shape[1]]


def _warp(image: np.ndarray, dy: np.ndarray, dx: np.ndarray, order: int) -> np.ndarray:
    h, w = image.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return ndimage.map_coordinates(image, [yy + dy, xx + dx], order=order, mode="reflect")


def _speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative, spatially correlated speckle with mean 1."""
    grain = ndimage.gaussian_filter(rng.gamma(2.0, 0.5, shape).astype(np.float32), 0.8)
    return grain / grain.mean()


def render(anatomy: Anatomy, rng: np.random.Generator, shift: tuple[float, float], visible: bool,
           speckle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame: the anatomy shifted and gently deformed, with speckle; returns (image, mask)."""
    shape = anatomy.tissue.shape
    dy = shift[0] + _smooth_field(rng, shape, 2.0)
    dx = shift[1] + _smooth_field(rng, shape, 2.0)
    scene = anatomy.tissue
    if visible:
        scene = np.where(anatomy.nerve_mask, anatomy.nerve_echo, anatomy.tissue)
    image = _warp(scene, dy, dx, order=1) * speckle * rng.uniform(0.92, 1.08)
    mask = _warp(anatomy.nerve_mask.astype(np.float32), dy, dx, order=1) > 0.5 if visible \
        else np.zeros(shape, bool)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def subject_frames(anatomy: Anatomy, rng: np.random.Generator, n_frames: int, p_visible: float,
                   twins: bool) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Frames of one subject as (image, mask, is_twin_of_previous)."""
    shape = anatomy.tissue.shape
    a, b = VISIBILITY_SWITCH * (1 - p_visible), VISIBILITY_SWITCH * p_visible
    visible = rng.random() < p_visible
    shift = np.zeros(2)
    frames: list[tuple[np.ndarray, np.ndarray, bool]] = []
    for i in range(n_frames):
        if twins and i > 0 and rng.random() < TWIN_PROBABILITY:
            prev_image, prev_mask, _ = frames[-1]
            noise = rng.normal(0, 1.5, shape)
            image = np.clip(prev_image + noise, 0, 255).astype(np.uint8)
            frames.append((image, prev_mask.copy(), True))
            continue
        visible = (rng.random() >= a) if visible else (rng.random() < b)
        shift = np.clip(shift + rng.normal(0, 6, 2), -40, 40)
        image, mask = render(anatomy, rng, (shift[0], shift[1]), visible, _speckle(rng, shape))
        frames.append((image, mask, False))
    return frames


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(os.path.abspath(a)).resolve() == Path(os.path.abspath(b)).resolve()


def generates(params: Params, out: str | Path) -> bool:
    """Whether the pipeline reads the synthetic data: `data.raw_dir` is the synthetic folder
    (`data/raw/synthetic`, its default and the stage's output in dvc.yaml) or `out` itself."""
    return _same_folder(params.data.raw_dir, SYNTH_DIR) or _same_folder(params.data.raw_dir, out)


def run(params: Params, *, out: str | Path) -> dict[str, float | str]:
    """Write train/, test/ and truth/ under `out` (atomically, as one directory); when `data.raw_dir` is
    another dataset (`generates`), only a note saying why nothing was generated."""
    if not generates(params, out):
        where = SYNTH_DIR if _same_folder(out, SYNTH_DIR) else f"{out} (or {SYNTH_DIR})"
        reason = (f"data.raw_dir is {params.data.raw_dir}, not {where}: the pipeline reads that dataset, "
                  "so no synthetic data was generated")
        with atomic_dir(out) as tmp:
            write_text(tmp / NOTE, f"{reason}.\nSet data.raw_dir: {SYNTH_DIR} in params.yaml to generate it.\n")
        return {"skipped": reason, "note": str(Path(out) / NOTE)}
    seed, params = params.seed, params.synth
    shape = (params.height, params.width)
    p_visible = (1 - params.empty_fraction) / (1 - params.label_noise) if params.label_noise < 1 else 1.0
    p_visible = min(p_visible, 1.0)
    root_rng = np.random.default_rng(seed)
    n_test_subjects = max(2, params.subjects // 4)
    subject_seeds = root_rng.integers(0, 2**63, params.subjects + n_test_subjects)

    train_rows: list[dict] = []
    with atomic_dir(out) as tmp:
        writer = LayoutWriter(tmp, params.layout)
        for s in tqdm(range(params.subjects), desc="synth train subjects", unit="subject"):
            rng = np.random.default_rng(subject_seeds[s])
            frames = subject_frames(make_anatomy(rng, shape), rng, params.frames_per_subject, p_visible, twins=True)
            for i, (image, mask, twin) in enumerate(frames, start=1):
                train_rows.append(dict(id=f"{s + 1}_{i}", subject=s + 1, frame=i, visible=bool(mask.any()),
                                       twin_of=f"{s + 1}_{i - 1}" if twin else "", image=image, mask=mask))
        _corrupt(train_rows, params.label_noise, root_rng)
        for row in train_rows:
            mask = row.pop("mask")
            writer.train(row["id"], row["subject"], row.pop("image"), mask & (not row["corrupted"]))

        # Test ids are shuffled across subjects, as on Kaggle.
        test_ids = np.random.default_rng(subject_seeds[params.subjects]).permutation(params.test_images) + 1
        test_masks: list[tuple[int, str]] = []
        for k, ids in enumerate(tqdm(np.array_split(test_ids, n_test_subjects), desc="synth test subjects",
                                     unit="subject")):
            rng = np.random.default_rng(subject_seeds[params.subjects + k])
            frames = subject_frames(make_anatomy(rng, shape), rng, len(ids), p_visible, twins=False)
            for n, (image, mask, _) in zip(ids, frames):
                writer.test(str(n), image)
                test_masks.append((int(n), rle.encode(mask)))
        writer.finish()
        truth_test = pd.DataFrame(test_masks, columns=["img", "pixels"]).sort_values("img")
        truth_train = pd.DataFrame(train_rows)
        write_csv(tmp / "truth" / "train_truth.csv", truth_train)
        write_csv(tmp / "truth" / "test_masks.csv", truth_test)
        summary = {
            "train_images": len(truth_train),
            "test_images": len(truth_test),
            "train_empty_fraction": round(float((~truth_train.visible | truth_train.corrupted).mean()), 4),
            "corrupted": int(truth_train.corrupted.sum()),
            "twins": int((truth_train.twin_of != "").sum()),
        }
        write_json(tmp / "truth" / "summary.json", summary)
    return summary


class LayoutWriter:
    """Writes samples in one of the layouts the load stage reads (see pipeline.data.layouts)."""

    def __init__(self, root: Path, layout: str) -> None:
        self.root, self.layout, self.rows = root, layout, []

    def train(self, image_id: str, subject: int, image: np.ndarray, mask: np.ndarray) -> None:
        if self.layout == "ultrasound":
            write_tiff(self.root / "train" / f"{image_id}.tif", image)
            write_tiff(self.root / "train" / f"{image_id}_mask.tif", mask.astype(np.uint8) * 255)
            return
        write_png(self.root / "train" / "images" / f"{image_id}.png", image)
        if self.layout == "folders":
            write_png(self.root / "train" / "masks" / f"{image_id}.png", mask.astype(np.uint8) * 255)
        self.rows.append({"id": image_id, "rle_mask": rle.encode(mask), "group": f"patient{subject}"})

    def test(self, image_id: str, image: np.ndarray) -> None:
        if self.layout == "ultrasound":
            write_tiff(self.root / "test" / f"{image_id}.tif", image)
        else:
            write_png(self.root / "test" / "images" / f"{image_id}.png", image)

    def finish(self) -> None:
        """Folders and csv layouts get train.csv (id, rle_mask, group): labels for csv, groups for both."""
        if self.rows:
            write_csv(self.root / "train.csv", pd.DataFrame(self.rows))


def _corrupt(rows: list[dict], label_noise: float, rng: np.random.Generator) -> None:
    """Erase the mask of visible twins (near-identical to a masked frame): contradictory pairs."""
    visible = [r for r in rows if r["visible"]]
    candidates = [r for r in visible if r["twin_of"]]
    n = min(len(candidates), int(round(label_noise * len(visible))))
    chosen = {id(candidates[i]) for i in rng.choice(len(candidates), n, replace=False)} if n else set()
    for r in rows:
        r["corrupted"] = id(r) in chosen
