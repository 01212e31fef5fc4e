"""Dedup stage: near-duplicate frames by block histograms and cosine distance.

Each image becomes one vector: the image is cut into a `grid` of rows x cols blocks and
each block gets its own `bins`-bin intensity histogram over 0..255, concatenated
block by block. Two frames are near-duplicates when the cosine distance of their
vectors is below `threshold`. Pairs whose masks disagree (one empty and one not,
or both non-empty with a Dice below `min_pair_dice`) are contradictory labels;
the clean stage decides what to drop.

Built to scale to ~100,000 images on two cores: histograms are one `bincount`
per image (no loop over blocks); distances come from normalised float32 matrix
products tile by tile, keeping only pairs near the threshold, so memory grows
with the number of pairs, not N^2. Each kept candidate's distance is then
recomputed exactly in float64 from the integer counts (the same formula as
`scipy.spatial.distance.cdist(..., "cosine")`), so the float32 shortcut never
changes which pairs are found.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.data.artifacts import open_arrays, read_manifest, read_plan, size_groups, write_pairs
from pipeline.data.io import InputError, save_figure, write_json
from pipeline.model.metrics import dice_per_image
from pipeline.params import Params

EXACT_BATCH = 1024   # candidate pairs re-checked in float64 at once (two 1024 x D float64 buffers)
DICE_BATCH = 32      # mask pairs compared at once (2 x 32 full-size masks in memory)


def block_ids(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """(height, width) block index of each pixel, row-major, for a rows x cols grid whose edges
    come from linspace: any size fits (blocks differ by at most a pixel); at 420x580 with
    [21, 29] every block is exactly 20x20."""
    rows, cols = grid
    row_of = np.searchsorted(np.linspace(0, height, rows + 1).round()[1:-1], np.arange(height), side="right")
    col_of = np.searchsorted(np.linspace(0, width, cols + 1).round()[1:-1], np.arange(width), side="right")
    return row_of[:, None] * cols + col_of[None, :]


def block_histograms(images: np.ndarray, grid: tuple[int, int], bins: int, sizes: np.ndarray | None = None,
                     progress: bool = True) -> np.ndarray:
    """Per-block intensity histograms of uint8 images (N, H, W[, C]) -> counts (N, blocks * bins).

    Feature k * bins + j counts the values v of block k (blocks in row-major order; all channels
    of a colour block together) with bin j = floor(v * bins / 256), i.e. exactly
    `np.histogram(block, bins, range=(0, 256))`. Each value's (block, bin) pair becomes one
    integer, counted with a single `bincount` per image. `sizes` gives each image's native
    (height, width) when images of mixed sizes share one padded array: each gets its own grid.
    """
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise InputError(f"images: expected uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}")
    n = len(images)
    sizes = np.tile(images.shape[1:3], (n, 1)) if sizes is None else np.asarray(sizes).reshape(n, 2)
    n_features = grid[0] * grid[1] * bins
    # uint16 holds v * bins (<= 255 * 256) and, for the default sizes, every feature index.
    index_dtype = np.uint16 if n_features <= 2**16 else np.uint32
    channels = int(np.prod(images.shape[3:]))
    largest = max((math.ceil(h / grid[0]) + 1) * (math.ceil(w / grid[1]) + 1) for h, w in sizes) if n else 1
    features = np.empty((n, n_features), np.min_scalar_type(largest * channels))
    bar = tqdm(total=n, desc="dedup histograms", unit="img", mininterval=1.0, disable=not progress)
    for (height, width), positions in size_groups(sizes[:, 0], sizes[:, 1]):
        block_offset = (block_ids(height, width, grid) * bins).astype(index_dtype)
        block_offset = block_offset.reshape((height, width) + (1,) * (images.ndim - 3))
        index = np.empty((height, width) + images.shape[3:], index_dtype)
        for k in positions:
            np.multiply(images[k, :height, :width], bins, out=index, dtype=index_dtype)
            index >>= 8
            index += block_offset
            features[k] = np.bincount(index.ravel(), minlength=n_features)
            bar.update()
    bar.close()
    return features


def exact_cosine_distance(counts: np.ndarray, norms: np.ndarray, rows_a: np.ndarray,
                          rows_b: np.ndarray) -> np.ndarray:
    """float64 cosine distance of row pairs, computed as scipy does (cosine clipped to [-1, 1])."""
    out = np.empty(len(rows_a))
    for s in range(0, len(rows_a), EXACT_BATCH):
        a, b = rows_a[s:s + EXACT_BATCH], rows_b[s:s + EXACT_BATCH]
        dot = np.einsum("ij,ij->i", counts[a].astype(np.float64), counts[b].astype(np.float64))
        out[s:s + EXACT_BATCH] = 1.0 - np.clip(dot / (norms[a] * norms[b]), -1.0, 1.0)
    return out


def _single_threaded_blas() -> threadpool_limits:
    """OpenBLAS's worker threads stall when other processes keep the cores busy: on 2 shared cores
    a 100 x 5481 Gram product took 89 ms with 2 threads and 3 ms with one (2048 rows: 1.17 s vs
    0.63 s), so the tile products run on one thread."""
    return threadpool_limits(limits=1, user_api="blas")


def _scope_runs(scope_labels: np.ndarray | None, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A row order in which each group of rows to compare is one contiguous run, and the runs' bounds."""
    if scope_labels is None:
        return np.arange(n), [(0, n)]
    order = np.argsort(scope_labels, kind="stable")
    edges = [0, *(np.flatnonzero(np.diff(scope_labels[order])) + 1).tolist(), n]
    return order, list(zip(edges[:-1], edges[1:]))


def near_duplicate_pairs(features: np.ndarray, threshold: float, scope_labels: np.ndarray | None = None,
                         chunk_size: int = 2048, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All row pairs (a < b) with cosine distance < threshold -> (rows_a, rows_b, distance), sorted.

    With `scope_labels`, only rows sharing a label are compared. Unit vectors (float32, rows
    grouped by label) are multiplied chunk_size x chunk_size tiles at a time; a tile entry is a
    candidate when it is within float32's rounding error (|error| <= D * eps for unit vectors of
    dimension D) of the threshold, and candidates are confirmed in float64 from the counts.
    """
    counts = np.asarray(features)
    if counts.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {counts.shape}")
    n, dim = counts.shape
    order, runs = _scope_runs(None if scope_labels is None else np.asarray(scope_labels), n)
    norms = np.empty(n)
    unit = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk_size):
        rows = order[s:s + chunk_size]
        block = counts[rows].astype(np.float32)
        norms[rows] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        unit[s:s + chunk_size] = block / np.maximum(norms[rows], np.finfo(np.float32).tiny).astype(np.float32)[:, None]
    cutoff = np.float32(1.0 - threshold - (dim + 8) * np.finfo(np.float32).eps)
    n_tiles = sum(math.ceil((hi - lo) / chunk_size) * (math.ceil((hi - lo) / chunk_size) + 1) // 2 for lo, hi in runs)
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    with (tqdm(total=n_tiles, desc="dedup cosine tiles", unit="tile", mininterval=1.0, disable=not progress) as bar,
          _single_threaded_blas()):
        for lo, hi in runs:
            for start_a in range(lo, hi, chunk_size):
                tile_a = unit[start_a:min(start_a + chunk_size, hi)]
                for start_b in range(start_a, hi, chunk_size):
                    ia, ib = np.nonzero(tile_a @ unit[start_b:min(start_b + chunk_size, hi)].T >= cutoff)
                    if start_b == start_a:
                        ia, ib = ia[ia < ib], ib[ia < ib]
                    found_a.append(order[ia + start_a])
                    found_b.append(order[ib + start_b])
                    bar.update()
    del unit
    first, second = (np.concatenate(found or [np.zeros(0, np.intp)]) for found in (found_a, found_b))
    rows_a, rows_b = np.minimum(first, second), np.maximum(first, second)
    distance = exact_cosine_distance(counts, norms, rows_a, rows_b)
    keep = distance < threshold
    rows_a, rows_b, distance = rows_a[keep], rows_b[keep], distance[keep]
    by_rows = np.lexsort((rows_b, rows_a))
    return rows_a[by_rows], rows_b[by_rows], distance[by_rows]


def pair_mask_dice(masks: np.ndarray, has_mask: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray,
                   progress: bool = True) -> np.ndarray:
    """Dice between the two masks of each pair; only pairs with two non-empty masks are read."""
    dice = np.where(has_mask[rows_a] == has_mask[rows_b], 1.0, 0.0)
    both = np.flatnonzero(has_mask[rows_a] & has_mask[rows_b])
    for s in tqdm(range(0, len(both), DICE_BATCH), desc="dedup mask dice", unit="batch", mininterval=1.0,
                  disable=not progress):
        k = both[s:s + DICE_BATCH]
        dice[k] = dice_per_image(masks[rows_a[k]], masks[rows_b[k]])
    return dice


def contradictory(has_mask_a: np.ndarray, has_mask_b: np.ndarray, mask_dice: np.ndarray,
                  min_pair_dice: float) -> np.ndarray:
    """One mask empty and the other not, or both non-empty and overlapping less than min_pair_dice."""
    return (has_mask_a != has_mask_b) | (has_mask_a & has_mask_b & (mask_dice < min_pair_dice))


def group_labels(n: int, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph; every image gets a group, singletons included."""
    graph = coo_matrix((np.ones(len(rows_a), np.int8), (rows_a, rows_b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def save_gallery(path: str | Path, images: np.ndarray, masks: np.ndarray, pairs: pd.DataFrame,
                 rows_a: np.ndarray, rows_b: np.ndarray, message: str) -> None:
    """Contradictory pairs side by side: own mask outlined red, the partner's mask dashed yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(pairs):
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
        ax.axis("off")
        save_figure(fig, path)
        return
    height, width = images.shape[1:3]
    panel_w = 5.0
    fig, axes = plt.subplots(len(pairs), 2, figsize=(2 * panel_w, 0.6 + len(pairs) * (panel_w * height / width + 0.5)),
                             squeeze=False, layout="constrained")
    fig.suptitle(f"{message}\nred: the frame's own mask; dashed yellow: its near-duplicate's mask", fontsize=12)
    for axes_row, pair, a, b in zip(axes, pairs.itertuples(index=False), rows_a, rows_b):
        for ax, own, other, image_id in ((axes_row[0], a, b, pair.id_a), (axes_row[1], b, a, pair.id_b)):
            ax.imshow(images[own], cmap="gray", vmin=0, vmax=255)
            area = int(masks[own].sum())
            drawable = min(masks[own].shape) >= 2   # matplotlib cannot contour under 2x2 pixels (the title says the area)
            if area and drawable:
                ax.contour(masks[own], levels=[0.5], colors="red", linewidths=1.5)
            if masks[other].any() and drawable:
                ax.contour(masks[other], levels=[0.5], colors="yellow", linewidths=1.0, linestyles="dashed")
            label = f"mask {area} px" if area else "EMPTY mask"
            ax.set_title(f"{image_id}: {label}", fontsize=11, color="black" if area else "darkred")
            ax.set_xticks([])
            ax.set_yticks([])
        axes_row[0].set_ylabel(f"distance {pair.distance:.5f}\nmask Dice {pair.mask_dice:.2f}", fontsize=10)
    save_figure(fig, path, dpi=80)


def _train_table(interim_dir: Path, n_images: int) -> pd.DataFrame:
    manifest = read_manifest(interim_dir)
    train = manifest[manifest.split == "train"].sort_values("row").reset_index(drop=True)
    if not np.array_equal(train.row.to_numpy(), np.arange(n_images)):
        raise InputError(f"{interim_dir / 'manifest.csv'}: train rows do not match train_images.npy "
                         f"({len(train)} rows for {n_images} images)")
    return train


def run(params: Params, *, interim: str | Path, plan: str | Path, out: str | Path, reports: str | Path,
        progress: bool = True) -> dict[str, float]:
    """Write pairs.csv and groups.csv to `out`, metrics.json and gallery.png to `reports`."""
    started = time.perf_counter()
    params = read_plan(plan).apply(params).dedup
    interim_dir, reports_dir = Path(interim), Path(reports)
    for name in ("manifest.csv", "train_images.npy", "train_masks.npy"):
        if not (interim_dir / name).is_file():
            raise InputError(f"{interim_dir / name}: not found (run the load stage first)")
    images, masks = open_arrays(interim_dir, "train")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or masks.shape != images.shape[:3]:
        raise InputError(f"{interim_dir / 'train_images.npy'}: expected uint8 (N, H, W[, C]) images with (N, H, W) "
                         f"masks, got {images.dtype} {images.shape} and masks {masks.shape}")
    train = _train_table(interim_dir, len(images))
    features = block_histograms(images, params.grid, params.bins, train[["height", "width"]].to_numpy(), progress)
    scope = train.subject.to_numpy() if params.scope == "subject" else None
    rows_a, rows_b, distance = near_duplicate_pairs(features, params.threshold, scope, params.chunk_size, progress)
    has_mask = train.has_mask.to_numpy(dtype=bool)
    dice = pair_mask_dice(masks, has_mask, rows_a, rows_b, progress)
    ids = train.id.to_numpy()
    pairs = pd.DataFrame({"id_a": ids[rows_a], "id_b": ids[rows_b], "distance": distance,
                          "has_mask_a": has_mask[rows_a], "has_mask_b": has_mask[rows_b], "mask_dice": dice})
    pairs["contradictory"] = contradictory(pairs.has_mask_a.to_numpy(), pairs.has_mask_b.to_numpy(), dice,
                                           params.min_pair_dice)
    labels = group_labels(len(images), rows_a, rows_b)
    group_sizes = np.bincount(labels)
    write_pairs(out, pairs, pd.DataFrame({"id": ids, "group": labels}))
    shown = np.flatnonzero(pairs.contradictory.to_numpy())
    shown = shown[np.argsort(distance[shown], kind="stable")][: params.gallery_pairs]
    n_bad = int(pairs.contradictory.sum())
    message = (f"{n_bad} contradictory of {len(pairs)} near-duplicate pairs (distance < {params.threshold}); "
               f"showing {len(shown)}" if len(shown) else
               f"No contradictory pairs shown ({n_bad} found, {len(pairs)} near-duplicate pairs)")
    save_gallery(reports_dir / "gallery.png", images, masks, pairs.iloc[shown], rows_a[shown], rows_b[shown],
                 message)
    summary = {
        "images": int(len(images)),
        "pairs": int(len(pairs)),
        "contradictory_pairs": n_bad,
        "groups": int((group_sizes > 1).sum()),
        "grouped_images": int(group_sizes[group_sizes > 1].sum()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(reports_dir / "metrics.json", summary)
    return summary
