"""Augment stage: the training-time augmentation pipeline, saved with albumentations' own serializer.

Training reads the saved file instead of params, so what the preview shows is exactly
what training applies. Augmentation runs after resizing to the working size (float images
in [0, 1], 0/1 masks): about 5x cheaper than at 420x580 and the same geometry.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from pipeline.io import InputError, atomic_path, save_figure
from pipeline.load import open_arrays, read_manifest
from pipeline.model import preprocess
from pipeline.params import AugmentParams, Params

PREVIEW_VARIANTS = 3
CHUNK = 64


def build(a: AugmentParams, seed: int) -> A.Compose:
    """The pipeline from params; geometric transforms move image and mask together (mask: nearest)."""
    return A.Compose([
        A.HorizontalFlip(p=a.hflip_p),
        A.VerticalFlip(p=a.vflip_p),
        A.Affine(translate_percent=(-a.shift, a.shift), scale=(1 - a.scale, 1 + a.scale),
                 rotate=(-a.rotate, a.rotate), fill=0, fill_mask=0, p=a.affine_p),
        A.ElasticTransform(alpha=a.elastic_alpha, sigma=a.elastic_sigma, approximate=True, p=a.elastic_p),
        A.RandomBrightnessContrast(brightness_limit=a.brightness, contrast_limit=a.contrast,
                                   p=a.brightness_contrast_p),
        A.RandomGamma(gamma_limit=(a.gamma_low, a.gamma_high), p=a.gamma_p),
    ], seed=seed)


def reseed(transform: A.Compose, seed: int) -> None:
    """Give the whole pipeline one shared random stream.

    albumentations 2.0.8's `Compose(seed=...)` / `set_random_seed` hands every child its own
    generator with the same seed, so the children's draws coincide (both flips always fire
    together); one shared generator keeps them independent.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers, ranks and resumes."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def save(transform: A.Compose, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        A.save(transform, str(tmp), data_format="json")


def load(path: str | Path) -> A.Compose:
    path = Path(path)
    try:
        return A.load(str(path), data_format="json")
    except FileNotFoundError:
        raise InputError(f"{path}: augmentation pipeline not found (run the augment stage)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not an albumentations pipeline ({exc})") from None


def working_arrays(images: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Native uint8 images and 0/1 masks -> float32 images in [0, 1] and 0/1 uint8 masks at `size`.

    Images are resized exactly as `model.preprocess` does at prediction time; masks the same
    way, then thresholded at 0.5.
    """
    xs, ys = [], []
    for start in range(0, len(images), CHUNK):
        x = preprocess(images[start:start + CHUNK], size, 0.0, 1.0).permute(0, 2, 3, 1)  # channels last
        xs.append((x[..., 0] if x.shape[-1] == 1 else x).numpy())
        m = np.asarray(masks[start:start + CHUNK], dtype=np.uint8) * np.uint8(255)
        ys.append((preprocess(m, size, 0.0, 1.0)[:, 0] >= 0.5).numpy().astype(np.uint8))
    h, w = size
    if not xs:
        return np.zeros((0, h, w) + images.shape[3:], np.float32), np.zeros((0, h, w), np.uint8)
    return np.concatenate(xs), np.concatenate(ys)


def apply(transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, mask) pair, deterministic from `seed`."""
    reseed(transform, seed)
    out = transform(image=image, mask=mask)
    return out["image"], out["mask"]


def _preview(transform: A.Compose, images: np.ndarray, masks: np.ndarray, seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + PREVIEW_VARIANTS
    h, w = images.shape[1:3]  # gray (N,H,W) or RGB (N,H,W,3)
    fig, axes = plt.subplots(len(images), cols, figsize=(cols * 2.4, len(images) * 2.4 * h / w),
                             squeeze=False)
    for r, (image, mask) in enumerate(zip(images, masks)):
        pairs = [(image, mask)] + [apply(transform, image, mask, sample_seed(seed, v, r)) for v in range(PREVIEW_VARIANTS)]
        for c, (img, m) in enumerate(pairs):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
            if m.any():
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_axis_off()
            if r == 0:
                ax.set_title("working size (red: mask)" if c == 0 else f"augmented #{c}", fontsize=8)
    save_figure(fig, path)


def run(params: Params, *, interim: str | Path, out: str | Path, preview: str | Path) -> dict[str, Any]:
    """Save the pipeline and a preview grid of training samples (half with a nerve) at the working size."""
    a, seed, size, interim_dir = params.augment, params.seed, (params.train.height, params.train.width), interim
    transform = build(a, seed)
    manifest = read_manifest(interim_dir)
    train = manifest[manifest.split == "train"]
    if train.empty:
        raise InputError(f"{Path(interim_dir) / 'manifest.csv'}: no training rows to preview")
    rng = np.random.default_rng(seed)
    with_mask = train[train.has_mask.astype(bool)].row.to_numpy()
    without = train[~train.has_mask.astype(bool)].row.to_numpy()
    n = min(a.preview_samples, len(train))
    k = min(len(with_mask), (n + 1) // 2)
    rows = np.sort(np.concatenate([rng.choice(with_mask, k, replace=False),
                                   rng.choice(without, min(len(without), n - k), replace=False)]).astype(int))
    images, masks = open_arrays(interim_dir, "train")
    x, y = working_arrays(images[rows], masks[rows], size)
    save(transform, out)
    _preview(A.from_dict(A.to_dict(transform)), x, y, seed, Path(preview))  # as train will read it back
    return {"transforms": len(transform.transforms), "preview_samples": int(len(rows)),
            "working_size": f"{size[0]}x{size[1]}"}
