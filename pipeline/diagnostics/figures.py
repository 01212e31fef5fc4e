"""Diagnostic figures, each with the caption that explains how to read it.

The captions travel with the figures: `Monitor` lists each figure's file and caption in
fold_K.json, and the report prints them from there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.diagnostics.measures import top_channels

SHOWN_CHANNELS = 3  # feature-map channels drawn per layer and image
CAPTIONS = {
    "health": "Per layer and epoch: mean gradient norm of the training steps and weight norm (log10), the "
              "fraction of each ReLU's channels that never fired on the validation images, and each layer's "
              "output std at step 0 (an exploding or collapsing initialisation shows here).",
    "filters": "The first convolution's filters, each scaled to its own largest weight (gray = 0): smooth "
               "edge and blob detectors mean it learned; salt-and-pepper noise means it barely moved from init.",
    "features": "Feature maps of a few layers (the most active channels) for one validation image with a nerve "
                "and one without.",
    "bottleneck": "Left: how many principal components of the encoder's bottleneck features explain the "
                  "variance. Right: the channels whose removal changes the presence logit most (gradient x "
                  "activation, exact for the presence head), separately for images with and without a nerve.",
}


def filter_grid(weight: torch.Tensor, pad: int = 1) -> np.ndarray:
    """First-layer filters tiled in a square-ish grid, each scaled by its own largest |weight|
    so 0.5 is zero: (H, W) for one or many input channels (averaged), (H, W, 3) for three."""
    w = weight.detach().float().cpu()
    w = w if w.shape[1] == 3 else w.mean(dim=1, keepdim=True)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    tiles = (0.5 + 0.5 * w / scale).permute(0, 2, 3, 1).numpy()  # (O, k, k, c)
    n, kh, kw, c = tiles.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, c), np.float32)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        grid[pad + r * (kh + pad):pad + r * (kh + pad) + kh, pad + q * (kw + pad):pad + q * (kw + pad) + kw] = tile
    return grid[..., 0] if c == 1 else grid


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def filters_figure(weight: torch.Tensor) -> Any:
    plt = _plt()
    grid = filter_grid(weight)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"first convolution: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]} "
                 f"(each scaled to its own max; gray = 0)", fontsize=9)
    return fig


def features_figure(images: np.ndarray, masks: np.ndarray, maps: dict[str, torch.Tensor], titles: Sequence[str]) -> Any:
    """Rows: the input, then each layer; columns: for each image, the layer's most active channels."""
    plt = _plt()
    k = SHOWN_CHANNELS
    fig, axes = plt.subplots(1 + len(maps), k * len(images), figsize=(1.9 * k * len(images), 1.6 * (1 + len(maps))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, (image, mask, title) in enumerate(zip(images, masks, titles)):
        ax = axes[0, j * k]
        ax.imshow(image, cmap="gray")
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(title, fontsize=8, loc="left")
    for r, (name, fmap) in enumerate(maps.items(), start=1):
        fmap = fmap.float().cpu()
        top = fmap.abs().mean(dim=(0, 2, 3)).argsort(descending=True)[:k].tolist()
        for j in range(len(images)):
            for q, c in enumerate(top):
                ax = axes[r, j * k + q]
                ax.imshow(fmap[j, c].numpy(), cmap="viridis")
                ax.set_title(f"{name} ch {c}" if q == 0 else f"ch {c}", fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def health_figure(epochs: list[dict[str, Any]], init: dict[str, float]) -> Any:
    """Per-layer gradient and weight norms and per-site dead fractions over epochs, and the step-0 stds."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 11))
    panels = (("grad_norm", "log10 mean gradient norm per layer (training steps)", True, axes[0, 0]),
              ("weight_norm", "log10 weight norm per layer", True, axes[0, 1]),
              ("dead", "dead fraction per ReLU site (validation pass)", False, axes[1, 0]))
    for key, title, log, ax in panels:
        names = list(dict.fromkeys(n for e in epochs for n in e.get(key, {})))
        if not names:
            ax.set_axis_off()
            continue
        table = np.array([[e.get(key, {}).get(n, np.nan) for e in epochs] for n in names], np.float64)
        if log:
            table = np.log10(np.maximum(table, 1e-30))
        im = ax.imshow(table, aspect="auto", cmap="magma" if log else "Reds", vmin=None if log else 0,
                       vmax=None if log else 1, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=max(3, 9 - len(names) // 12))
        ax.set_xticks(range(len(epochs)), [e["epoch"] for e in epochs], fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[1, 1]
    if init:
        ax.barh(range(len(init)), list(init.values()), color="#2c5cc5")
        ax.set_xscale("log")
        ax.set_yticks(range(len(init)), list(init), fontsize=max(3, 9 - len(init) // 12))
        ax.invert_yaxis()
        ax.set_title("step 0: output std per layer (training mode, one batch)", fontsize=9)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def bottleneck_figure(pca: dict[str, Any], contrib: np.ndarray, present: np.ndarray) -> Any:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    cum = np.cumsum(pca["explained"])
    a.plot(np.arange(1, len(cum) + 1), cum, color="#2c5cc5")
    for level, key, color in ((0.9, "components_90", "#e8a33d"), (0.99, "components_99", "#d2452f")):
        a.axvline(pca[key], color=color, ls="--", label=f"{level:.0%}: {pca[key]} components")
    a.set_xscale("log")
    a.set_xlabel("principal components")
    a.set_ylabel("cumulative explained variance")
    a.set_title(f"bottleneck PCA: {pca['channels']} channels, {pca['samples']} positions", fontsize=9)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    order = top_channels(contrib)
    xs = np.arange(len(order))
    for offset, rows, label, color in ((-0.2, present, "images with a nerve", "#d2452f"),
                                       (0.2, ~present, "empty images", "#2c5cc5")):
        if rows.any():
            b.bar(xs + offset, contrib[rows][:, order].mean(axis=0), width=0.4, label=label, color=color)
    b.axhline(0, color="black", lw=0.6)
    b.set_xticks(xs, [str(c) for c in order], fontsize=7, rotation=90)
    b.set_xlabel("bottleneck channel")
    b.set_ylabel("mean change of the presence logit")
    b.set_title("channels that move the presence logit most (gradient x activation = ablation)", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig
