"""Tune stage: pick the pixel, presence and minimum-area thresholds and the connected-component
rules (keep the largest, drop small components) on out-of-fold predictions.

The score is the leaderboard's: mean per-image Dice at native resolution. Only the pixel
threshold and the component rules need the pixels, so one pass over the upsampled OOF
probabilities counts, per image and for every pixel threshold at once, the predicted area and
its overlap with the truth; per image and pixel threshold it also labels the components once
and derives every component option's area and overlap from the components' areas and overlaps.
Every presence x min-area combination is then arithmetic on those counts. A component option
is chosen only where it beats the best score with components off (ties: off), and the presence gate
is switched off only where that beats the best gated candidate by more than its standard error.
Of the candidates within the noise of the best, the one nearest the untuned defaults is chosen
(the one-standard-error rule).

At the chosen thresholds it also writes one row per OOF image (`oof_scores.csv`): its Dice, true
and predicted areas, presence probability and final mask (RLE), made exactly as predict makes
masks. The report reads that file, so it needs neither torch nor this module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.data.artifacts import (SCORE_COLUMNS, Thresholds, open_arrays, read_manifest, read_oof, read_plan,
                                size_chunks, write_oof_scores, write_thresholds)
from pipeline.data.io import InputError, save_figure, write_csv, write_json
from pipeline.model.metrics import dice_from_counts, dice_per_image
from pipeline.model.network import to_native
from pipeline.params import Params, TuneParams
from pipeline.model.postprocess import apply, components, keep, kept_components, min_component_pixels
from pipeline.data.rle import encode

CHUNK = 32  # images upsampled at once: 32 x 420 x 580 float32 is about 31 MB
OFF = (False, 0.0)  # component rules off: (keep_largest, min_component)


def train_rows(interim_dir: str | Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the train arrays for `ids` and their native (height, width); an unknown id is an error."""
    manifest = read_manifest(interim_dir)
    table = manifest[manifest.split == "train"].set_index("id")
    train = table["row"]
    unknown = [i for i in ids if i not in train.index]
    if unknown:
        raise InputError(f"{len(unknown)} OOF id(s) not among the train images of {interim_dir}, "
                         f"e.g. {', '.join(unknown[:5])}")
    names, counts = np.unique(np.asarray(ids, str), return_counts=True)
    if (counts > 1).any():
        dup = names[counts > 1]
        raise InputError(f"{len(dup)} OOF id(s) appear more than once, e.g. {', '.join(dup[:5])}")
    return train.loc[ids].to_numpy(), table.loc[ids, ["height", "width"]].to_numpy(np.int64)


def _native_chunks(sizes: np.ndarray | None, truth: np.ndarray, n: int, desc: str | None = None):
    """(native (h, w), positions) in chunks of at most CHUNK images of one size; `sizes` None: every
    image has the size of the truth arrays."""
    sizes = np.tile(truth.shape[1:3], (n, 1)) if sizes is None else sizes
    chunks = size_chunks(sizes[:, 0], sizes[:, 1], CHUNK)
    return tqdm(chunks, desc=desc, unit="chunk", mininterval=1.0) if desc else chunks


def component_options(p: TuneParams) -> list[tuple[bool, float]]:
    """(keep_largest, min_component) candidates, off first (always a candidate), mildest next."""
    options = [(bool(k), float(f)) for k in sorted(set(p.keep_largest)) for f in sorted(set(p.min_component_fractions))]
    return [OFF] + [o for o in options if o != OFF]


def count(mask_prob: np.ndarray, truth: np.ndarray, rows: np.ndarray, pixel: np.ndarray,
          sizes: np.ndarray | None = None, resize: str = "stretch",
          options: list[tuple[bool, float]] | tuple[tuple[bool, float], ...] = (OFF,),
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image overlap (T,O,N), predicted area (T,O,N) and true area (N,) at native size, for every
    pixel threshold (T) and component option (O; `options[0]` must be off).

    `pixel` must be sorted ascending. Each pixel gets the number of thresholds it beats
    (plus an offset when it is true foreground); one bincount per image then gives every
    threshold's counts. Matches `postprocess.binarize` exactly (same float32 comparison).
    The other options label each image's components once per pixel threshold and keep them
    with `postprocess.kept_components`, as `postprocess.apply` does.
    """
    assert tuple(options[0]) == OFF, options
    n_bins = len(pixel) + 1
    dtype = np.min_scalar_type(2 * n_bins)
    counts = np.empty((len(rows), 2, n_bins), np.int64)
    inter = np.zeros((len(pixel), len(options), len(rows)), np.int64)
    area = np.zeros_like(inter)
    largest = np.array([o[0] for o in options[1:]], bool)
    fractions = np.array([o[1] for o in options[1:]], np.float64)
    for (h, w), part in _native_chunks(sizes, truth, len(rows), "tune: count"):
        low = torch.from_numpy(np.asarray(mask_prob[part], np.float32))[:, None]
        prob = to_native(low, (h, w), resize).numpy()
        true = np.asarray(truth[rows[part]], bool)[:, :h, :w]
        bins = true.astype(dtype) * dtype.type(n_bins)
        for t in pixel:
            bins += prob > t
        counts[part] = [np.bincount(b.ravel(), minlength=2 * n_bins).reshape(2, n_bins) for b in bins]
        if len(options) == 1:
            continue
        limits = min_component_pixels(fractions, h, w)
        for j, t in enumerate(pixel):
            for k, i in enumerate(part):
                mask = prob[k] > t
                labels, box, areas = components(mask)
                if not len(areas):
                    continue
                overlap = np.bincount(labels[mask[box] & true[k][box]], minlength=len(areas) + 1)[1:]
                kept = kept_components(areas, largest, limits)
                inter[j, 1:, i], area[j, 1:, i] = kept @ overlap, kept @ areas
    above = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]  # above[..., j]: pixels beating j thresholds
    inter[:, 0] = above[:, 1, 1:].T
    area[:, 0] = above[:, :, 1:].sum(axis=1).T
    return inter, area, counts[:, 1].sum(axis=1)


def grid_dice(inter: np.ndarray, area: np.ndarray, truth_area: np.ndarray, presence_prob: np.ndarray,
              presence: np.ndarray | float, min_area: np.ndarray | int) -> np.ndarray:
    """Mean Dice over images (last axis) for broadcast presence / min-area gates.

    A gated-off image predicts empty: it scores 1 when its truth is empty, else 0.
    """
    return image_dice(inter, area, truth_area, presence_prob, presence, min_area).mean(axis=-1)


def image_dice(inter: np.ndarray, area: np.ndarray, truth_area: np.ndarray, presence_prob: np.ndarray,
               presence: np.ndarray | float, min_area: np.ndarray | int) -> np.ndarray:
    """Per-image Dice (last axis) for broadcast presence / min-area gates (see `grid_dice`)."""
    kept = keep(presence_prob, area, presence, min_area)
    return np.where(kept, dice_from_counts(inter, area, truth_area), truth_area == 0)


def clearly_beats(candidate: np.ndarray, baseline: np.ndarray, standard_errors: float) -> tuple[bool, float, float]:
    """(does the candidate's per-image Dice beat the baseline's by more than `standard_errors`
    standard errors of the paired difference, mean gain, standard error).

    The one-standard-error rule of model selection: on a small OOF set the grid's maximum is partly
    noise (the search picks the candidate that fits these images best), and a gain the data cannot
    tell from zero is not worth leaving the safer baseline for (the untuned defaults; the gate)."""
    beats, gain, se = beats_by(candidate, baseline, standard_errors)
    return bool(beats), float(gain), float(se)


def beats_by(candidate: np.ndarray, baseline: np.ndarray, standard_errors: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`clearly_beats` over the last axis (images), broadcast over the leading ones (candidates)."""
    diff = np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64)
    n = diff.shape[-1]
    gain = diff.mean(axis=-1) if n else np.zeros(diff.shape[:-1])
    if n < 2:  # one image proves nothing
        return np.zeros_like(gain, bool), gain, np.full_like(gain, np.inf)
    se = diff.std(axis=-1, ddof=1) / np.sqrt(n)
    return gain > standard_errors * se, gain, se


def _heatmap(grid: pd.DataFrame, chosen: Thresholds, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = (grid.pixel == chosen.pixel) & (grid.keep_largest == chosen.keep_largest) & \
        (grid.min_component == chosen.min_component)
    table = grid[at].pivot(index="presence", columns="min_area", values="dice")
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 2, 0.6 * table.shape[0] + 1.5))
    im = ax.imshow(table.to_numpy(), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [f"{r:g}" for r in table.index])
    for (r, c), v in np.ndenumerate(table.to_numpy()):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7, color="w" if v < table.values.mean() else "k")
    ax.set_xlabel("min_area (pixels)")
    ax.set_ylabel("presence threshold")
    ax.set_title(f"OOF mean Dice at pixel threshold {chosen.pixel:g}, keep_largest {chosen.keep_largest}, "
                 f"min_component {chosen.min_component:g}", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def search(mask_prob: np.ndarray, truth: np.ndarray, rows: np.ndarray, presence_prob: np.ndarray,
           p: TuneParams, sizes: np.ndarray | None = None, resize: str = "stretch") -> tuple[pd.DataFrame, Thresholds, dict[str, float]]:
    """Score every grid candidate; returns (one row per candidate, the best, metrics).

    A component option is chosen only when its best Dice beats the best with components off
    (`dice_no_components`); otherwise, and on ties, the rules stay off. The presence gate goes (presence
    0) only when that beats the best gated candidate by more than `tune.min_gain_se` standard errors of
    the per-image difference: without it every empty image rests on the pixel head alone, and on the
    synthetic data a gate-off choice that tied a 0.05 gate on the OOF images scored 0.827 test Dice
    against 0.990 (13 of 49 empty test images got a mask). Then the one-standard-error rule: of the
    candidates the grid's best does not beat by more than `tune.min_gain_se` standard errors of the
    per-image difference (`clearly_beats`), the one nearest the untuned 0.5 / 0.5 / 0 is chosen (the
    defaults themselves when the best does not clearly beat them: `tuned`: false), because the OOF
    images flatter the thresholds they were searched on (on the USGRA-seg windows the grid's best moved
    the presence gate to 0.3 and 0.05 and lost 0.017 and 0.032 test Dice against the nearest candidate
    within the noise). The metrics put the chosen candidate (`dice_best`) next to the grid's best
    (`dice_grid_best`) and the baselines: predicting all empty, tuning without the presence gate,
    without the component rules, and the untuned 0.5 / 0.5 / 0 defaults.
    """
    default = Thresholds()
    options = component_options(p)
    pixel = np.unique(np.array(p.pixel_thresholds + (default.pixel,), np.float32))
    inter, area, truth_area = count(mask_prob, truth, rows, pixel, sizes, resize, options)
    grid_pixel = np.unique(np.array(p.pixel_thresholds, np.float32))
    presence = np.unique(np.array(p.presence_thresholds, np.float32))
    min_area = np.unique(np.array(p.min_areas, np.int64))
    at = np.searchsorted(pixel, grid_pixel)
    scores = np.empty((len(grid_pixel), len(options), len(presence), len(min_area)))
    ungated = np.empty((len(grid_pixel), len(options), len(min_area)))
    for o in range(len(options)):  # one option at a time: the memory of the search without components
        scores[:, o] = grid_dice(inter[at, o, None, None], area[at, o, None, None], truth_area, presence_prob,
                                 presence[None, :, None, None], min_area[None, None, :, None])
        ungated[:, o] = grid_dice(inter[at, o, None], area[at, o, None], truth_area, presence_prob, 0.0,
                                  min_area[None, :, None])

    def distance_from_defaults(px: np.ndarray, pr: np.ndarray, ma: np.ndarray) -> tuple[np.ndarray, ...]:
        """`np.lexsort` keys (last = most significant) of the candidates at these pixel, presence and min-area
        indices: presence, then pixel, closest to the untuned 0.5, then the smallest min area."""
        return min_area[ma], np.abs(grid_pixel[px] - default.pixel), np.abs(presence[pr] - default.presence)

    def nearest_default_best(block: np.ndarray) -> tuple[int, ...]:
        """The best of `block` (pixel x [option x] presence x min area); ties go to the candidate nearest
        the untuned defaults: presence, then pixel, closest to 0.5, then the smallest min area. (The
        lowest thresholds used to win, so a tie switched the presence gate off: on one fold's OOF set
        of the synthetic data that cost 0.04 test Dice, 0.944 against 0.982 with the gate kept.)"""
        tied = np.argwhere(block >= block.max() - 1e-12)
        p_axis, pr_axis, ma_axis = 0, block.ndim - 2, block.ndim - 1
        key = np.lexsort(distance_from_defaults(tied[:, p_axis], tied[:, pr_axis], tied[:, ma_axis]))
        return tuple(int(i) for i in tied[key[0]])

    def best_of(block: np.ndarray) -> tuple[int, int, int, int]:
        """The best (pixel, option, presence, min area) of `block`; a component option only where it is
        strictly better than the best with components off (not float noise)."""
        off = nearest_default_best(block[:, 0])
        best = (off[0], 0, *off[1:])
        if len(options) > 1 and block[:, 1:].max() > block[best] + 1e-12:
            on = nearest_default_best(block[:, 1:])
            best = (on[0], on[1] + 1, *on[2:])
        return best

    def images_at(b: tuple[int, int, int, int]) -> np.ndarray:
        return image_dice(inter[at[b[0]], b[1]], area[at[b[0]], b[1]], truth_area, presence_prob, presence[b[2]],
                          min_area[b[3]])

    def nearest_within_noise(best: tuple[int, int, int, int], best_images: np.ndarray) -> tuple[int, int, int, int]:
        """The one-standard-error rule: of the candidates the best (per-image Dice `best_images`) does not
        clearly beat (`clearly_beats`), the one nearest the untuned defaults (`distance_from_defaults`, then
        components off); gated or not as the best is, except the untuned defaults themselves: they come first
        on either side, so a gate-off best that does not clearly beat them leaves them in place."""
        px, op, pr, ma = (a.ravel() for a in np.meshgrid(np.arange(len(grid_pixel)), np.arange(len(options)),
                                                         np.arange(len(presence)), np.arange(len(min_area)),
                                                         indexing="ij"))
        same_side = (presence[pr] > 0) == (presence[best[2]] > 0)
        untuned = (np.isclose(grid_pixel[px], default.pixel) & np.isclose(presence[pr], default.presence)
                   & (min_area[ma] == default.min_area) & (op == 0))
        eligible = same_side | untuned
        px, op, pr, ma = px[eligible], op[eligible], pr[eligible], ma[eligible]
        order = np.lexsort((op, *distance_from_defaults(px, pr, ma)))
        for start in range(0, len(order), 256):
            k = order[start:start + 256]
            images = image_dice(inter[at[px[k]], op[k]], area[at[px[k]], op[k]], truth_area, presence_prob,
                                presence[pr[k], None], min_area[ma[k], None])
            within = ~beats_by(best_images, images, p.min_gain_se)[0]
            if within.any():
                i = k[int(np.argmax(within))]
                return int(px[i]), int(op[i]), int(pr[i]), int(ma[i])
        return best

    best = best_of(scores)
    gated = presence > 0
    if presence[best[2]] == 0 and gated.any():  # the gate goes only on clear evidence: see `search`
        with_gate = best_of(np.where(gated[None, None, :, None], scores, -np.inf))
        if not clearly_beats(images_at(best), images_at(with_gate), p.min_gain_se)[0]:
            best = with_gate
    d = int(np.searchsorted(pixel, np.float32(default.pixel)))
    default_images = image_dice(inter[d, 0], area[d, 0], truth_area, presence_prob, np.float32(default.presence),
                                default.min_area)
    grid_best, grid_best_images = best, images_at(best)
    _, gain, se = clearly_beats(grid_best_images, default_images, p.min_gain_se)
    best = nearest_within_noise(grid_best, grid_best_images)
    keep_largest, min_component = options[best[1]]
    chosen = Thresholds(pixel=round(float(grid_pixel[best[0]]), 6), presence=round(float(presence[best[2]]), 6),
                        min_area=int(min_area[best[3]]), keep_largest=keep_largest,
                        min_component=round(min_component, 6))
    metrics = {
        "dice_best": float(scores[best]),
        "gain_over_default": gain,
        "gain_standard_error": se,
        "tuned": chosen != default,
        "dice_grid_best": float(scores[grid_best]),
        "dice_no_components": float(scores[:, 0].max()),
        "dice_default": float(default_images.mean()),
        "dice_no_presence_gate": float(ungated.max()),
        "dice_all_empty": float(np.mean(truth_area == 0)),
        "images": len(rows),
        "candidates": int(scores.size),
        **{f"best_{k}": v for k, v in chosen.to_dict().items()},
    }
    if gated.any():  # the best the gate can do, next to `dice_no_presence_gate`
        metrics["dice_presence_gate"] = float(scores[:, :, gated].max())
    pp, oo, pr, ma = np.meshgrid(grid_pixel, np.arange(len(options)), presence, min_area, indexing="ij")
    oo = oo.ravel()
    grid = pd.DataFrame({"pixel": pp.ravel().astype(float).round(6), "presence": pr.ravel().astype(float).round(6),
                         "min_area": ma.ravel(), "keep_largest": np.array([o[0] for o in options])[oo],
                         "min_component": np.array([o[1] for o in options], float).round(6)[oo],
                         "dice": scores.ravel()})
    return grid, chosen, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}


def oof_scores(ids: np.ndarray, mask_prob: np.ndarray, presence_prob: np.ndarray, truth: np.ndarray,
               rows: np.ndarray, t: Thresholds, sizes: np.ndarray | None = None,
               resize: str = "stretch") -> pd.DataFrame:
    """One row per OOF image at thresholds `t`: the final mask at native size, exactly as predict makes it
    (`to_native`, then `postprocess.apply`), scored against the truth.

    Columns: id, presence_prob (float32 as written by train), truth_area and predicted_area (pixels),
    dice (empty on empty scores 1), truth_empty, predicted_empty, and rle: the final mask in the
    competition's run-length encoding (1-indexed, column-major; empty when the mask is empty).
    """
    n = len(ids)
    truth_area, pred_area = np.zeros(n, np.int64), np.zeros(n, np.int64)
    dice = np.zeros(n, np.float64)
    runs = [""] * n
    for (h, w), part in _native_chunks(sizes, truth, n):
        low = torch.from_numpy(np.asarray(mask_prob[part], np.float32))[:, None]
        pred = apply(to_native(low, (h, w), resize).numpy(), presence_prob[part], t)
        true = np.asarray(truth[rows[part]], bool)[:, :h, :w]
        truth_area[part] = true.reshape(len(part), -1).sum(axis=1)
        pred_area[part] = pred.reshape(len(part), -1).sum(axis=1)
        dice[part] = dice_per_image(pred, true)
        for k, mask, area in zip(part, pred, pred_area[part]):
            runs[k] = encode(mask) if area else ""
    return pd.DataFrame({"id": np.asarray(ids, str), "presence_prob": np.asarray(presence_prob, np.float32),
                         "truth_area": truth_area, "predicted_area": pred_area, "dice": dice,
                         "truth_empty": truth_area == 0, "predicted_empty": pred_area == 0, "rle": runs},
                        columns=list(SCORE_COLUMNS))


def run(params: Params, *, oof: str | Path, interim: str | Path, plan: str | Path, out: str | Path,
        reports: str | Path) -> dict[str, float]:
    """Write the chosen thresholds and component rules to `out`; the grid, plots, per-image OOF scores and
    metrics to `reports`."""
    params = read_plan(plan).apply(params)
    ids, mask_prob, presence_prob = read_oof(oof)
    rows, sizes = train_rows(interim, ids)
    _, truth = open_arrays(interim, "train")
    resize = params.train.resize
    grid, chosen, metrics = search(mask_prob, truth, rows, presence_prob, params.tune, sizes, resize)
    reports = Path(reports)
    write_csv(reports / "grid.csv", grid.round({"dice": 6}))
    for name in ("pixel", "presence", "min_area"):  # profile: best Dice at each value of one threshold
        write_csv(reports / f"dice_vs_{name}.csv", grid.groupby(name, as_index=False)["dice"].max().round(6))
    _heatmap(grid, chosen, reports / "heatmap.png")
    write_oof_scores(reports / "oof_scores.csv",
                     oof_scores(ids, mask_prob, presence_prob, truth, rows, chosen, sizes, resize))
    write_json(reports / "metrics.json", metrics)
    write_thresholds(out, chosen)
    return metrics
