"""Report stage: the current run on one self-contained page.

The daily loop is "change params, run, compare Dice", so one file should answer: how good
is this run, and why (thresholds, presence gate, example predictions, training curves).
`reports/index.html` embeds every image as a base64 data URI (no external files or scripts,
opens offline); `reports/summary.md` has the same numbers as text. A stage whose outputs are
missing gets a note in its section instead of failing the page.

It only reads what the stages wrote: the per-image out-of-fold scores and final masks come
from the tune stage (`reports/tune/oof_scores.csv`), so this module needs neither torch nor
the tune stage's code. The page layout lives in `pipeline/pages/render.py` and its templates. The
ranking of DVC experiments is not part of this stage (experiments are git refs, which no DVC
stage can depend on): `python -m pipeline compare` writes it.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.artifacts import (Thresholds, open_arrays, read_manifest, read_oof_presence, read_oof_scores,
                                read_thresholds)
from pipeline.data.io import InputError, read_json, write_text
from pipeline.params import Params
from pipeline.model.postprocess import keep
from pipeline.pages.render import Section, flatten, render_html, render_md
from pipeline.data.rle import RLEError, decode, parse_runs

STAGES = (  # (stage, what its metrics mean)
    ("load", "dataset size and how many masks are empty"),
    ("dedup", "near-duplicate frames and contradictory label pairs"),
    ("clean", "training rows kept and dropped by the cleaning policy (synthetic: precision/recall of the drops)"),
    ("train", "out-of-fold validation Dice at the default 0.5 gates, presence accuracy/AUC, per fold"),
    ("tune", "out-of-fold Dice at native size: tuned, at default thresholds, without presence gate, all-empty"),
    ("predict", "test predictions (with test truth, test/masks/ or the generator's: Dice against the true masks)"),
)


def _plural(noun: str) -> str:
    """English plural of the last word: nerve -> nerves, salt deposit -> salt deposits, polyp -> polyps,
    lesion mass -> lesion masses, artery -> arteries."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def headings(object_name: str) -> tuple[str, str]:
    """The page title and heading for what the masks outline (data.object_name)."""
    return f"{object_name} segmentation report", f"{object_name[:1].upper()}{object_name[1:]} segmentation: run report"


def group_words(load: dict[str, Any] | None) -> str:
    """What load's `subjects` count is: "subjects", or "groups (one image each)" when each image is its own
    group (load's `group_kind: image`)."""
    return "groups (one image each)" if (load or {}).get("group_kind") == "image" else "subjects"


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _png_file(path: Path) -> bytes | None:
    """A stage's PNG, or None when it is missing or not a PNG (an <img> must never be broken)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- current run

def component_rules(thresholds: dict[str, Any]) -> str:
    """The chosen component rules in words; a thresholds.json without them means off."""
    rules = (["keep largest"] if thresholds.get("keep_largest") else []) + \
        ([f"drop < {thresholds['min_component']:g} of the image"] if thresholds.get("min_component") else [])
    return ", ".join(rules) or "off"


def headline(metrics: dict[str, dict[str, Any] | None], thresholds: dict[str, Any] | None) -> Section:
    s = Section("At a glance", "glance")
    tune, predict, train = (metrics.get(k) or {} for k in ("tune", "predict", "train"))
    test = ("test Dice (true test masks)", predict["test_dice"]) if "test_dice" in predict \
        else ("test Dice (synthetic truth)", predict.get("synthetic_test_dice"))
    cards = [("OOF Dice, tuned thresholds", tune.get("dice_best")),
             ("OOF all-empty baseline", tune.get("dice_all_empty")),
             test,
             ("val Dice at 0.5 gates (train)", train.get("dice"))]
    if thresholds:
        cards.append(("thresholds pixel / presence / min_area",
                      f"{thresholds['pixel']:g} / {thresholds['presence']:g} / {thresholds['min_area']}"))
        cards.append(("connected components (chosen on OOF)", component_rules(thresholds)))
    s.cards(cards)
    if not tune:
        s.note("No tune metrics yet: the Dice numbers appear once the train and tune stages have run.")
    return s


def stage_metrics(reports: Path, metrics: dict[str, dict[str, Any] | None]) -> Section:
    s = Section("Metrics of every stage", "metrics")
    labels = {"load": {"subjects": group_words(metrics.get("load"))}}   # stage -> metric -> shown as
    s.html.append('<div class="stages">')
    for stage, meaning in STAGES:
        path = reports / stage / "metrics.json"
        s.html.append("<div>")
        s.heading(stage)
        data = metrics[stage]
        if data is None:
            s.note(f"{path}: missing or unreadable (run the {stage} stage).")
        else:
            s.text(meaning)
            scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
            groups = {k: flatten(v) for k, v in data.items() if isinstance(v, dict)}  # e.g. fold_0..fold_K
            names = labels.get(stage, {})
            s.table(["metric", "value"], ((names.get(k, k), v) for k, v in scalars.items()))
            if groups:  # one column per group reads better than fold_0.dice, fold_1.dice, ... rows
                keys = list(dict.fromkeys(k for g in groups.values() for k in g))
                s.table(["metric", *groups], ([k, *(g.get(k) for g in groups.values())] for k in keys))
        s.html.append("</div>")
    s.html.append("</div>")
    return s


def dice_vs_threshold(reports: Path, thresholds: dict[str, Any] | None, all_empty: float | None) -> Section:
    """Best Dice at each value of one threshold (the others free), from tune's grid of every candidate."""
    s = Section("Dice vs thresholds", "thresholds")
    grid_path = reports / "tune" / "grid.csv"
    try:
        grid = pd.read_csv(grid_path)
    except (OSError, ValueError):
        s.note(f"{grid_path}: missing or unreadable (run the tune stage).")
        return s
    names = [n for n in ("pixel", "presence", "min_area", "min_component") if n in grid.columns]
    if "dice" not in grid.columns or not names:
        s.note(f"{grid_path}: expected columns pixel, presence, min_area, dice.")
        return s
    import matplotlib.pyplot as plt

    profiles = {name: grid.groupby(name)["dice"].max() for name in names}
    lo = min(p.min() for p in profiles.values())
    hi = max(p.max() for p in profiles.values())
    pad = max(0.01, 0.1 * (hi - lo))
    # The y axis fits the curves, so differences of a few points stay visible; the all-empty
    # baseline is drawn only when it falls inside, and always named in the title.
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False, sharey=True)
    for ax, (name, best) in zip(axes[0], profiles.items()):
        ax.plot(best.index, best.values, "o-", color="#2c5cc5", label="best Dice at this value")
        if thresholds and name in thresholds:
            ax.axvline(thresholds[name], color="#d2452f", ls="--", label=f"chosen {thresholds[name]:g}")
        if all_empty is not None and lo - pad <= all_empty <= hi + pad:
            ax.axhline(all_empty, color="gray", ls=":", label="all-empty")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel({"min_area": "min_area (pixels)", "min_component": "min_component (fraction of the image)"}
                      .get(name, f"{name} threshold"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("OOF mean Dice")
    baseline = f"; all-empty baseline {all_empty:.3f}" if all_empty is not None else ""
    fig.suptitle(f"OOF Dice vs each threshold ({len(grid)} candidates; the other two at their best{baseline})")
    s.text("Each panel: the best mean Dice over all candidates with that threshold value. "
           "A flat curve means the threshold hardly matters; the dashed line is the chosen value.")
    s.image(_figure_png(fig), "Dice vs thresholds")
    if "keep_largest" in grid.columns:  # tune's component rules: kept only where they beat the best without them
        tune = _read_metrics(reports / "tune" / "metrics.json") or {}
        by = grid.groupby("keep_largest")["dice"].max()
        s.text(f"Connected components (8-connected, after the pixel threshold, before the gates): chosen "
               f"{component_rules(thresholds or {})}. Best OOF Dice with the component rules off "
               f"{tune.get('dice_no_components', '?')}, with them free {tune.get('dice_best', '?')}; best with "
               f"keep_largest off {by.get(False, float('nan')):.4f}, on {by.get(True, float('nan')):.4f}. "
               f"A rule is kept only where it beats off (ties: off).")
    top = grid.sort_values("dice", ascending=False, kind="stable").head(5)
    s.text("Best five candidates:")
    s.table(list(top.columns), top.itertuples(index=False))
    heatmap = _png_file(reports / "tune" / "heatmap.png")
    if heatmap:
        s.image(heatmap, "tune heatmap: presence x min_area at the chosen pixel threshold", "tune/heatmap.png")
    return s


@dataclass
class OofResult:
    """Per OOF image, from the tune stage's oof_scores.csv: ids, rows of the train arrays, presence
    probability, true/predicted presence and area, Dice, and the final mask (RLE)."""
    ids: np.ndarray
    rows: np.ndarray
    presence_prob: np.ndarray
    truth_any: np.ndarray
    truth_area: np.ndarray
    pred_any: np.ndarray
    dice: np.ndarray
    rle: np.ndarray


def read_scores(path: Path, oof: Path, interim: Path, shape: tuple[int, int]) -> OofResult:
    """The tune stage's per-image scores, checked against the train stage's oof.npz (same images, same
    presence probabilities: a stale file is named, not drawn) and placed in the load stage's arrays."""
    table = read_oof_scores(path)
    ids, presence = table["id"].to_numpy(str), table["presence_prob"].to_numpy(np.float32)
    numbers = {c: table[c].to_numpy(np.float64) for c in ("truth_area", "predicted_area", "dice")}
    flags = {c: table[c] for c in ("truth_empty", "predicted_empty")}
    npz = oof / "oof.npz"
    oof_ids, oof_presence = read_oof_presence(oof)
    if not (np.array_equal(ids, oof_ids) and np.array_equal(presence, oof_presence)):
        raise InputError(f"{path} does not describe the out-of-fold predictions in {npz} (other images or presence "
                         f"probabilities): run the tune stage again")
    train = read_manifest(interim).query("split == 'train'").set_index("id")["row"]
    unknown = [i for i in ids if i not in train.index]
    if unknown:
        raise InputError(f"{path}: {len(unknown)} id(s) not among the train images of {interim}, "
                         f"e.g. {', '.join(unknown[:5])}")
    runs = table["rle"].to_numpy(str)
    for k, (rle, area) in enumerate(zip(runs, numbers["predicted_area"])):
        try:
            _, lengths = parse_runs(rle, shape[0] * shape[1])
        except RLEError as exc:
            raise InputError(f"{path}: line {k + 2}: rle: {exc}") from None
        if lengths.sum() != area:
            raise InputError(f"{path}: line {k + 2}: rle covers {lengths.sum()} pixels, predicted_area says {area:g}")
    return OofResult(ids, train.loc[ids].to_numpy(), presence, ~flags["truth_empty"].to_numpy(bool),
                     numbers["truth_area"].astype(np.int64), ~flags["predicted_empty"].to_numpy(bool),
                     numbers["dice"], runs)


def confusion(r: OofResult, presence: float, object_name: str = "nerve") -> Section:
    """At the tuned presence gate; when tuning switched the gate off (0), also at the default 0.5,
    since "everything passes" says nothing about the classifier itself."""
    import matplotlib.pyplot as plt

    s = Section("Presence classifier", "presence")
    gates = [(presence, "the tuned presence gate")]
    if presence <= 0:
        gates.append((Thresholds().presence, "the default gate; tuning switched the gate off"))
    s.text(f"Out-of-fold presence probability vs whether the true mask is non-empty, over {len(r.ids)} images.")
    fig, axes = plt.subplots(1, len(gates), figsize=(4.2 * len(gates), 3.4), squeeze=False)
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    for ax, (gate, meaning) in zip(axes[0], gates):
        said = keep(r.presence_prob, 0, gate, 0)  # the presence gate alone (an area of 0 passes min_area 0)
        tp, fn = int((said & r.truth_any).sum()), int((~said & r.truth_any).sum())
        fp, tn = int((said & ~r.truth_any).sum()), int((~said & ~r.truth_any).sum())
        s.heading(f"presence >= {gate:g} ({meaning})")
        s.table(["", f"predicted: {object_name}", "predicted: empty"],
                [[f"truth: {object_name}", tp, fn], ["truth: empty", fp, tn]])
        s.table(["accuracy", "precision", "recall (sensitivity)", "specificity"],
                [[ratio(tp + tn, len(r.ids)), ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(tn, tn + fp)]])
        counts = np.array([[tp, fn], [fp, tn]])
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, f"{c}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=13,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks([0, 1], [object_name, "empty"])
        ax.set_yticks([0, 1], [object_name, "empty"])
        ax.set_xlabel("predicted (presence head)")
        ax.set_ylabel("truth")
        ax.set_title(f"presence >= {gate:g}: row shares")
    fig.tight_layout()
    s.image(_figure_png(fig), "presence confusion matrix")
    return s


def _pick(order: np.ndarray, n: int, spread: bool) -> np.ndarray:
    """The first n of `order`, or n spread evenly over it (best to worst) when `spread`."""
    if len(order) <= n or not spread:
        return order[:n]
    return order[np.linspace(0, len(order) - 1, n).round().astype(int)]


def _outline(ax: Any, mask: np.ndarray, color: str, width: float) -> None:
    """A mask's outline; skipped on images under 2x2 pixels, where matplotlib cannot contour
    (the prediction's fill still shows there)."""
    if mask.ndim == 2 and min(mask.shape) >= 2:
        ax.contour(mask, levels=[0.5], colors=color, linewidths=width)


def gallery(r: OofResult, images: np.ndarray, truth: np.ndarray, n: int, object_name: str = "nerve") -> Section:
    """The final masks tune made (its RLE column) over the images: found, false positives, missed."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    s = Section("Out-of-fold predictions", "gallery")
    tp = np.flatnonzero(r.truth_any & r.pred_any)
    fp = np.flatnonzero(~r.truth_any & r.pred_any)
    fn = np.flatnonzero(r.truth_any & ~r.pred_any)
    tn = int((~r.truth_any & ~r.pred_any).sum())
    things = _plural(object_name)
    s.text(f"Final masks (tuned thresholds, native size) on {len(r.ids)} out-of-fold images: {len(tp)} {things} found "
           f"(mean Dice {r.dice[tp].mean() if len(tp) else float('nan'):.3f}), {len(fp)} false positives on empty "
           f"images, {len(fn)} {things} missed, {tn} empty images correctly left empty. "
           f"Green outline: true {object_name}; red: prediction.")
    groups = ((f"{things[:1].upper()}{things[1:]} found: from best to worst Dice",
               tp[np.argsort(-r.dice[tp], kind="stable")], True),
              ("False positives on empty images: most confident first", fp[np.argsort(-r.presence_prob[fp], kind="stable")], False),
              (f"Missed {things}: largest first", fn[np.argsort(-r.truth_area[fn], kind="stable")], False))
    shape = truth.shape[1:3]
    for title, order, spread in groups:
        s.heading(f"{title} ({len(order)})")
        chosen = _pick(order, n, spread)
        if not len(chosen):
            s.text("None.")
            continue
        pred = [decode(r.rle[k], shape) for k in chosen]
        cols = min(len(chosen), 3)
        rows = math.ceil(len(chosen) / cols)
        tile = 3.6
        fig, axes = plt.subplots(rows, cols, figsize=(cols * tile, rows * (tile * shape[0] / shape[1] + 0.45)),
                                 squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        for ax, k, p in zip(axes.ravel(), chosen, pred):
            image = images[r.rows[k]]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            true = np.asarray(truth[r.rows[k]], bool)
            if p.any():
                ax.imshow(np.ma.masked_where(~p, p), cmap=ListedColormap(["red"]), alpha=0.3)
                _outline(ax, p, "red", 1.2)
            if true.any():
                _outline(ax, true, "lime", 1.4)
            ax.set_title(f"{r.ids[k]}  Dice {r.dice[k]:.2f}  p({object_name}) {r.presence_prob[k]:.2f}", fontsize=9)
        fig.tight_layout()
        s.image(_figure_png(fig), title)
    return s


def oof_sections(reports: Path, interim: Path, oof: Path, thresholds_path: Path, n: int,
                 object_name: str = "nerve") -> list[Section]:
    """Presence confusion matrix and prediction gallery; one note when their inputs are missing."""
    try:
        t = read_thresholds(thresholds_path)
        images, truth = open_arrays(interim, "train")
        result = read_scores(reports / "tune" / "oof_scores.csv", oof, interim, truth.shape[1:3])
    except (InputError, OSError) as exc:
        s = Section("Presence classifier and predictions", "presence")
        s.note(f"Not available: {exc}")
        return [s]
    return [confusion(result, t.presence, object_name), gallery(result, images, truth, n, object_name)]


def dataset_and_plan(reports: Path) -> Section:
    """The load stage's fingerprint and the plan resolved from it (which values were automatic)."""
    s = Section("Dataset fingerprint and plan", "plan")
    fp, plan = _read_metrics(reports / "load" / "fingerprint.json"), _read_metrics(reports / "plan" / "plan.json")
    if fp is None:
        s.note("No fingerprint (run the load stage).")
    else:
        sizes = ", ".join(f"{z['height']}x{z['width']} ({z['count']})" for z in fp.get("sizes", [])[:5])
        area = fp.get("mask_area_fraction") or {}
        letterbox = fp.get("letterbox") or {}
        s.table(["fact", "value"], [
            ["training images", fp.get("images")], ["sizes (h x w, count)", sizes],
            ["channels", fp.get("channels")], ["source modes", fp.get("modes")],
            ["intensity percentiles", fp.get("intensity")],
            ["empty masks", fp.get("empty_fraction")],
            ["mask area / image (quantiles)", area],
            ["components per mask (quantiles)", fp.get("components")],
            ["groups", f"{fp.get('groups')} ({fp.get('group_kind')})"],
            ["letterboxed images", letterbox.get("fraction")]])
    if plan is None:
        s.note("No plan (run the plan stage).")
    else:
        automatic = set(plan.get("automatic", []))
        s.text("Every `auto` knob in params.yaml resolved from the fingerprint and the device "
               f"({(plan.get('basis') or {}).get('device', {}).get('device', '?')}); explicit values win.")
        s.table(["knob", "value", "how"], [[key, value, "auto" if key in automatic else "params.yaml"]
                                           for key, value in plan.get("values", {}).items()])
        s.text(training_time(plan.get("estimate"), _read_metrics(reports / "train" / "metrics.json")))
    return s


def training_time(estimate: dict[str, Any] | None, train: dict[str, Any] | None) -> str:
    """The plan's training-time estimate (from its measured probe) against the train stage's actual time."""
    if not isinstance(estimate, dict) or not isinstance(estimate.get("train_seconds"), (int, float)):
        return "Training time: the plan made no estimate (a plan from before estimates; run the plan stage again)."
    probe = estimate.get("probe") or {}
    rate = probe.get("train_seconds_per_image")
    steps = estimate.get("image_steps")
    line = (f"Training time: the plan estimated {estimate['train_seconds'] / 60:.1f} min"
            + (f" for {steps:,} image-steps" if isinstance(steps, int) else "")
            + (f" (its probe trained {1 / rate:.1f} images/s on {probe.get('device', '?')}, "
               f"{probe.get('threads', '?')} threads)" if isinstance(rate, (int, float)) and rate > 0 else "")
            + (f", the auto budget capped at train.max_minutes ({estimate['budget_capped_from']:,} image-steps "
               f"uncapped)" if isinstance(estimate.get("budget_capped_from"), int) else "")
            + (f" (the probe timed {estimate['probe_rechecks'] + 1} times before a cap, the fastest kept)"
               if isinstance(estimate.get("probe_rechecks"), int) else ""))
    actual = (train or {}).get("train_seconds")
    if not isinstance(actual, (int, float)) or actual <= 0:
        return line + "; no actual time yet (run the train stage)."
    return line + (f"; the train stage took {actual / 60:.1f} min "
                   f"(estimate / actual {estimate['train_seconds'] / actual:.2f}).")


def stage_image(title: str, anchor: str, path: Path, reports: Path, stage: str, caption: str) -> Section:
    s = Section(title, anchor)
    png = _png_file(path)
    if png is None:
        s.note(f"{path}: missing or not a PNG (run the {stage} stage).")
    else:
        s.text(caption)
        s.image(png, title, os.path.relpath(path, reports))
    return s


def training_curves(train_dir: Path) -> Section:
    """dvclive's per-epoch TSVs, one panel per quantity (train_ and val_ of it together), one line per fold."""
    s = Section("Training curves", "training")
    files = sorted((train_dir / "plots" / "metrics").rglob("*.tsv"))
    if not files:
        s.note(f"{train_dir / 'plots' / 'metrics'}: no per-epoch curves (run the train stage).")
        return s
    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for path in files:
        try:
            data = pd.read_csv(path, sep="\t")
        except (OSError, ValueError):
            continue
        if data.empty or not {"step", path.stem} <= set(data.columns):
            continue
        prefix, _, rest = path.stem.partition("_")
        quantity, split = (rest, prefix) if prefix in ("train", "val") and rest else (path.stem, "")
        fold = path.parent.relative_to(train_dir / "plots" / "metrics").as_posix()
        label = " ".join(p for p in (fold if fold != "." else "", split) if p)
        panels.setdefault(quantity, []).append((label, data.set_index("step")[path.stem]))
    if not panels:
        s.note(f"{train_dir / 'plots' / 'metrics'}: no readable curves.")
        return s
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first = ("loss", "dice", "presence_acc", "presence_auc", "lr")
    names = sorted(panels, key=lambda q: (first.index(q) if q in first else len(first), q))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes.ravel(), names):
        for label, series in panels[name]:
            ax.plot(series.index, series.values, marker="o", ms=3, ls="--" if label.endswith("train") else "-",
                    label=label or name)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    s.text("Per-epoch values logged by dvclive (dashed: training, solid: validation).")
    s.image(_figure_png(fig), "training curves")
    return s


def diagnostics_section(train_dir: Path) -> Section:
    """The train stage's diagnostics: warnings, PCA and attribution summaries, and each fold's figures."""
    s = Section("Training diagnostics", "diagnostics")
    folder = train_dir / "diagnostics"
    results = [r for r in map(_read_metrics, sorted(folder.glob("fold_*.json"))) if r]
    if not results:
        s.note(f"{folder}: no diagnostics (run the train stage).")
        return s
    warnings = [w for r in results for w in r.get("warnings", [])]
    if warnings:
        s.note(f"{len(warnings)} warning(s) during training (also in the training log):")
        s.table(["fold", "epoch", "kind", "message"],
                [[w.get(k) for k in ("fold", "epoch", "kind", "message")] for w in warnings])
    else:
        s.text("No warnings: the losses kept improving within diagnostics.patience epochs, gradients stayed "
               "within the thresholds and the presence head never said one class for every validation image.")
    for r in results:
        s.heading(f"fold {r.get('fold')}")
        pca = r.get("pca")
        if pca:
            s.text(f"Bottleneck PCA over {pca['samples']} positions of {len(r.get('subset', []))} validation "
                   f"images: {pca['components_90']} of {pca['channels']} components explain 90% of the variance, "
                   f"{pca['components_99']} explain 99% (numerical rank {pca['rank']}).")
        if r.get("attribution"):
            s.table(["bottleneck channel", "mean |change of presence logit|", "mean on nerve images",
                     "mean on empty images"],
                    [[a["channel"], a["mean_abs"], a["mean_nerve"], a["mean_empty"]] for a in r["attribution"][:8]])
        if not r.get("figures"):
            s.note("Figures are off (diagnostics.enabled: false).")
        for figure in r.get("figures", []):  # {"file", "caption"}, as the train stage drew them
            figure = {"file": figure} if isinstance(figure, str) else figure  # an older run's: no caption
            name, caption = figure.get("file", ""), figure.get("caption")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                # a path from inside a file stays inside its folder: never ../ or an absolute path
                s.note(f"{folder}: figure {str(name)[:200]!r} named in fold {r.get('fold')}'s JSON is not a file of "
                       f"that folder; skipped.")
                continue
            png = _png_file(folder / name)
            if png is None:
                s.note(f"{folder / name}: missing or not a PNG.")
                continue
            if caption:
                s.text(caption)
            s.image(png, name, os.path.relpath(folder / name, train_dir.parent))
    return s


# ---------------------------------------------------------------- page

def experiments_pointer() -> Section:
    s = Section("Experiments", "experiments")
    s.text("To rank this run against every DVC experiment, run `python -m pipeline compare` "
           "(writes `reports/experiments.html`).")
    return s


def run(params: Params, *, reports: str | Path, interim: str | Path, oof: str | Path, thresholds: str | Path,
        html: str | Path, summary: str | Path) -> dict[str, Any]:
    """Write the HTML page and the Markdown summary; returns what each section found."""
    import matplotlib

    matplotlib.use("Agg")
    reports, thresholds = Path(reports), Path(thresholds)
    metrics = {stage: _read_metrics(reports / stage / "metrics.json") for stage, _ in STAGES}
    # Read by its one reader: a thresholds.json without a key or with a string value is one error line, as
    # in predict; a missing one leaves its sections out.
    chosen = read_thresholds(thresholds).to_dict() if thresholds.exists() else None
    all_empty = (metrics["tune"] or {}).get("dice_all_empty")
    sections = [headline(metrics, chosen), dataset_and_plan(reports), stage_metrics(reports, metrics),
                dice_vs_threshold(reports, chosen, all_empty),
                *oof_sections(reports, Path(interim), Path(oof), thresholds, params.report.gallery_images,
                              params.data.object_name),
                stage_image("Contradictory near-duplicates (dedup audit)", "dedup", reports / "dedup" / "gallery.png",
                            reports, "dedup", "Near-identical frames whose masks disagree: the label noise that "
                            "the clean stage removes."),
                stage_image("Augmentation preview", "augment", reports / "augment" / "preview.png", reports,
                            "augment", "Training samples at the working size and augmented variants of each."),
                training_curves(reports / "train"),
                diagnostics_section(reports / "train"),
                experiments_pointer()]
    subtitle = (f"From `{reports}/` (stage metrics, plots and tune's per-image scores), `{oof}` (out-of-fold "
                f"predictions) and `{thresholds}`. Regenerate with `dvc repro` or `python -m pipeline report`.")
    title, heading = headings(params.data.object_name)
    write_text(html, render_html(sections, title=title, heading=heading, subtitle=subtitle))
    write_text(summary, render_md(sections, heading=heading, subtitle=subtitle))
    missing = sorted(stage for stage, data in metrics.items() if data is None)
    return {"sections": len(sections), "missing_stage_metrics": ", ".join(missing) or "none",
            "html": str(html), "summary": str(summary)}
