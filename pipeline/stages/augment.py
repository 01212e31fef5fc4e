"""Augment stage: the training-time augmentation pipeline, saved with albumentations' own serializer.

Training reads the saved file instead of params, so what the preview shows is exactly
what training applies (the transforms themselves are in `pipeline.model.transforms`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from pipeline.data.artifacts import open_arrays, read_manifest, read_plan, save_augmentation
from pipeline.data.io import InputError, save_figure
from pipeline.params import Params
from pipeline.model.transforms import apply, build, sample_seed, working_arrays

PREVIEW_VARIANTS = 3


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


def run(params: Params, *, interim: str | Path, plan: str | Path, out: str | Path, preview: str | Path
        ) -> dict[str, Any]:
    """Save the pipeline and a preview grid of training samples (half with a nerve) at the working size."""
    params = read_plan(plan).apply(params)
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
    sizes = train.set_index("row").loc[rows, ["height", "width"]].to_numpy()
    x, y = working_arrays(images[rows], masks[rows], size, sizes, params.train.resize)
    save_augmentation(transform, out)
    _preview(A.from_dict(A.to_dict(transform)), x, y, seed, Path(preview))  # as train will read it back
    return {"transforms": len(transform.transforms), "preview_samples": int(len(rows)),
            "working_size": f"{size[0]}x{size[1]}"}
