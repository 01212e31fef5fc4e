"""Report stage: the current run and every DVC experiment on one self-contained page.

The daily loop is "change params, run, compare Dice", so one file should answer: how good
is this run, why (thresholds, presence gate, example predictions, training curves), and how
does it rank against the other experiments. `reports/index.html` embeds every image as a
base64 data URI (no external files or scripts, opens offline); `reports/summary.md` has the
same numbers as text. A stage whose outputs are missing gets a note in its section instead
of failing the page.

Experiments are read from git (refs/exps/... and `git cat-file`), not `dvc exp show`: this
stage runs inside `dvc repro` / `dvc exp run`, and git needs no DVC lock. Their metrics are
the git-tracked (`cache: false`) metrics files committed in each experiment.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.io import InputError, read_json, write_text
from pipeline.params import ReportParams

STAGES = (  # (stage, what its metrics mean)
    ("load", "dataset size and how many masks are empty"),
    ("dedup", "near-duplicate frames and contradictory label pairs"),
    ("clean", "training rows kept and dropped by the cleaning policy (synthetic: precision/recall of the drops)"),
    ("train", "out-of-fold validation Dice at the default 0.5 gates, presence accuracy/AUC, per fold"),
    ("tune", "out-of-fold Dice at native size: tuned, at default thresholds, without presence gate, all-empty"),
    ("predict", "test predictions (synthetic data: Dice against the generator's true test masks)"),
)
KEY_METRICS = (  # (stage, key, column label): the experiments table's metric columns, ranked by the first two
    ("predict", "synthetic_test_dice", "test Dice (synthetic)"),
    ("tune", "dice_best", "OOF Dice (tuned)"),
    ("train", "dice", "val Dice (0.5 gates)"),
    ("tune", "dice_default", "OOF Dice (defaults)"),
    ("tune", "dice_all_empty", "all-empty Dice"),
)
EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/([^/]+)$")
CHUNK = 32  # OOF images upsampled to native size at once
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{margin:8px 0 2px;font-size:26px} h2{margin:34px 0 8px;padding-top:8px;border-top:2px solid #d8dbe2;font-size:20px}
h3{margin:18px 0 6px;font-size:16px} p.sub{margin:0 0 14px;color:#5a6172}
nav{margin:10px 0 4px;line-height:1.9} nav a{margin-right:14px;color:#2c5cc5;text-decoration:none;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #d8dbe2;border-radius:8px;padding:10px 16px;min-width:150px}
.card .v{font-size:26px;font-weight:600} .card .k{color:#5a6172;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:14px}
th,td{border:1px solid #d8dbe2;padding:4px 10px;text-align:left} th{background:#eef0f4}
td.n{text-align:right;font-variant-numeric:tabular-nums} tr.current td{background:#fff7d6;font-weight:600}
.note{background:#fff4e5;border-left:4px solid #e8a33d;padding:8px 12px;margin:8px 0}
img{max-width:100%;height:auto;background:#fff;border:1px solid #d8dbe2;margin:6px 0}
.stages{display:flex;flex-wrap:wrap;gap:6px 28px;align-items:flex-start} .stages>div{max-width:560px}
.stages p{font-size:13px;color:#5a6172;margin:0 0 4px} .tw{overflow-x:auto} code{background:#eef0f4;padding:1px 4px}
"""


@dataclass
class Section:
    """One part of the page, rendered both as HTML and as Markdown."""
    title: str
    anchor: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def text(self, line: str) -> None:
        self.html.append(f"<p>{_inline(line)}</p>")
        self.md.append(line + "\n")

    def note(self, line: str) -> None:
        self.html.append(f'<div class="note">{_inline(line)}</div>')
        self.md.append(f"> {line}\n")

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], current: int | None = None) -> None:
        rows = [[fmt(v) for v in row] for row in rows]
        numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            f"<tr{' class=current' if k == current else ''}>"
            + "".join(f"<td{' class=n' if numeric[i] else ''}>{html.escape(v)}</td>" for i, v in enumerate(row))
            + "</tr>" for k, row in enumerate(rows))
        self.html.append(f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        esc = lambda v: v.replace("|", "\\|")  # noqa: E731
        self.md.append("| " + " | ".join(map(esc, header)) + " |\n|" + "---|" * len(header) + "\n"
                       + "".join("| " + " | ".join(map(esc, row)) + " |\n" for row in rows))

    def image(self, png: bytes, alt: str, md_link: str | None = None) -> None:
        """Embed a PNG; the Markdown links to the stage's own file when there is one."""
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        self.md.append(f"![{alt}]({md_link})\n" if md_link else f"*{alt}: see index.html*\n")


def _inline(line: str) -> str:
    """Escaped text with Markdown `code` spans as <code>, so one string serves both formats."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(line))


def fmt(value: Any) -> str:
    """Numbers for tables: 4 decimals for small floats, so Dice values line up."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text == "—"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested metrics and params as dotted keys."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


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

def headline(metrics: dict[str, dict[str, Any] | None], thresholds: dict[str, Any] | None) -> Section:
    s = Section("At a glance", "glance")
    tune, predict, train = (metrics.get(k) or {} for k in ("tune", "predict", "train"))
    cards = [("OOF Dice, tuned thresholds", tune.get("dice_best")),
             ("OOF all-empty baseline", tune.get("dice_all_empty")),
             ("test Dice (synthetic truth)", predict.get("synthetic_test_dice")),
             ("val Dice at 0.5 gates (train)", train.get("dice"))]
    if thresholds:
        cards.append(("thresholds pixel / presence / min_area",
                      f"{thresholds['pixel']:g} / {thresholds['presence']:g} / {thresholds['min_area']}"))
    s.html.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(fmt(v))}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards) + "</div>")
    s.md.append("".join(f"- **{k}**: {fmt(v)}\n" for k, v in cards))
    if not tune:
        s.note("No tune metrics yet: the Dice numbers appear once the train and tune stages have run.")
    return s


def stage_metrics(reports: Path, metrics: dict[str, dict[str, Any] | None]) -> Section:
    s = Section("Metrics of every stage", "metrics")
    s.html.append('<div class="stages">')
    for stage, meaning in STAGES:
        path = reports / stage / "metrics.json"
        s.html.append(f"<div><h3>{stage}</h3>")
        s.md.append(f"### {stage}\n")
        data = metrics[stage]
        if data is None:
            s.note(f"{path}: missing or unreadable (run the {stage} stage).")
        else:
            s.text(meaning)
            scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
            groups = {k: flatten(v) for k, v in data.items() if isinstance(v, dict)}  # e.g. fold_0..fold_K
            s.table(["metric", "value"], scalars.items())
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
    names = [n for n in ("pixel", "presence", "min_area") if n in grid.columns]
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
        ax.set_xlabel(f"{name} threshold" if name != "min_area" else "min_area (pixels)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("OOF mean Dice")
    baseline = f"; all-empty baseline {all_empty:.3f}" if all_empty is not None else ""
    fig.suptitle(f"OOF Dice vs each threshold ({len(grid)} candidates; the other two at their best{baseline})")
    s.text("Each panel: the best mean Dice over all candidates with that threshold value. "
           "A flat curve means the threshold hardly matters; the dashed line is the chosen value.")
    s.image(_figure_png(fig), "Dice vs thresholds")
    top = grid.sort_values("dice", ascending=False, kind="stable").head(5)
    s.text("Best five candidates:")
    s.table(list(top.columns), top.itertuples(index=False))
    heatmap = _png_file(reports / "tune" / "heatmap.png")
    if heatmap:
        s.image(heatmap, "tune heatmap: presence x min_area at the chosen pixel threshold", "tune/heatmap.png")
    return s


@dataclass
class OofResult:
    """Per OOF image: ids, true/predicted presence, Dice, and what a gallery needs."""
    ids: np.ndarray
    rows: np.ndarray
    presence_prob: np.ndarray
    truth_any: np.ndarray
    truth_area: np.ndarray
    pred_any: np.ndarray
    dice: np.ndarray


def score_oof(mask_prob: np.ndarray, presence_prob: np.ndarray, ids: np.ndarray, rows: np.ndarray,
              truth: np.ndarray, thresholds: Any) -> OofResult:
    """Final masks at native size, exactly as predict makes them, scored per image."""
    import torch

    from pipeline.metrics import dice_per_image
    from pipeline.model import to_native
    from pipeline.postprocess import apply

    shape = truth.shape[1:3]
    truth_area, pred_any, dice = (np.zeros(len(ids), t) for t in (np.int64, bool, np.float64))
    for start in range(0, len(ids), CHUNK):
        stop = min(start + CHUNK, len(ids))
        prob = to_native(torch.from_numpy(np.asarray(mask_prob[start:stop], np.float32))[:, None], shape).numpy()
        pred = apply(prob, presence_prob[start:stop], thresholds)
        true = np.asarray(truth[rows[start:stop]], bool)
        truth_area[start:stop] = true.reshape(stop - start, -1).sum(axis=1)
        pred_any[start:stop] = pred.reshape(stop - start, -1).any(axis=1)
        dice[start:stop] = dice_per_image(pred, true)
    return OofResult(ids, rows, presence_prob, truth_area > 0, truth_area, pred_any, dice)


def confusion(r: OofResult, presence: float) -> Section:
    """At the tuned presence gate; when tuning switched the gate off (0), also at the default 0.5,
    since "everything passes" says nothing about the classifier itself."""
    import matplotlib.pyplot as plt

    from pipeline.postprocess import Thresholds, keep

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
        s.html.append(f"<h3>presence &gt;= {gate:g} ({html.escape(meaning)})</h3>")
        s.md.append(f"### presence >= {gate:g} ({meaning})\n")
        s.table(["", "predicted: nerve", "predicted: empty"], [["truth: nerve", tp, fn], ["truth: empty", fp, tn]])
        s.table(["accuracy", "precision", "recall (sensitivity)", "specificity"],
                [[ratio(tp + tn, len(r.ids)), ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(tn, tn + fp)]])
        counts = np.array([[tp, fn], [fp, tn]])
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, f"{c}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=13,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks([0, 1], ["nerve", "empty"])
        ax.set_yticks([0, 1], ["nerve", "empty"])
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


def gallery(r: OofResult, mask_prob: np.ndarray, images: np.ndarray, truth: np.ndarray, thresholds: Any,
            n: int) -> Section:
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import ListedColormap

    from pipeline.model import to_native
    from pipeline.postprocess import apply

    s = Section("Out-of-fold predictions", "gallery")
    tp = np.flatnonzero(r.truth_any & r.pred_any)
    fp = np.flatnonzero(~r.truth_any & r.pred_any)
    fn = np.flatnonzero(r.truth_any & ~r.pred_any)
    tn = int((~r.truth_any & ~r.pred_any).sum())
    s.text(f"Final masks (tuned thresholds, native size) on {len(r.ids)} out-of-fold images: {len(tp)} nerves found "
           f"(mean Dice {r.dice[tp].mean() if len(tp) else float('nan'):.3f}), {len(fp)} false positives on empty "
           f"images, {len(fn)} nerves missed, {tn} empty images correctly left empty. "
           f"Green outline: true nerve; red: prediction.")
    groups = (("Nerves found: from best to worst Dice", tp[np.argsort(-r.dice[tp], kind="stable")], True),
              ("False positives on empty images: most confident first", fp[np.argsort(-r.presence_prob[fp], kind="stable")], False),
              ("Missed nerves: largest first", fn[np.argsort(-r.truth_area[fn], kind="stable")], False))
    shape = truth.shape[1:3]
    for title, order, spread in groups:
        s.html.append(f"<h3>{html.escape(title)} ({len(order)})</h3>")
        s.md.append(f"### {title} ({len(order)})\n")
        chosen = _pick(order, n, spread)
        if not len(chosen):
            s.text("None.")
            continue
        prob = to_native(torch.from_numpy(np.asarray(mask_prob[chosen], np.float32))[:, None], shape).numpy()
        pred = apply(prob, r.presence_prob[chosen], thresholds)
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
            ax.set_title(f"{r.ids[k]}  Dice {r.dice[k]:.2f}  p(nerve) {r.presence_prob[k]:.2f}", fontsize=9)
        fig.tight_layout()
        s.image(_figure_png(fig), title)
    return s


def oof_sections(interim: Path, oof: Path, thresholds_path: Path, n: int) -> list[Section]:
    """Presence confusion matrix and prediction gallery; one note when their inputs are missing."""
    from pipeline.postprocess import read_thresholds
    from pipeline.tune import load_oof, train_rows
    from pipeline.load import open_arrays

    try:
        t = read_thresholds(thresholds_path)
        ids, mask_prob, presence_prob = load_oof(oof)
        rows = train_rows(interim, ids)
        images, truth = open_arrays(interim, "train")
    except (InputError, OSError) as exc:
        s = Section("Presence classifier and predictions", "presence")
        s.note(f"Not available: {exc}")
        return [s]
    result = score_oof(mask_prob, presence_prob, ids, rows, truth, t)
    return [confusion(result, t.presence), gallery(result, mask_prob, images, truth, t, n)]


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
    captions = {  # figure name suffix -> caption (pipeline/diagnostics.py draws them)
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
        s.html.append(f"<h3>fold {r.get('fold')}</h3>")
        s.md.append(f"### fold {r.get('fold')}\n")
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
        for name in r.get("figures", []):
            png = _png_file(folder / name)
            caption = next((c for key, c in captions.items() if name.endswith(f"_{key}.png")), None)
            if png is None:
                s.note(f"{folder / name}: missing or not a PNG.")
                continue
            if caption:
                s.text(caption)
            s.image(png, name, os.path.relpath(folder / name, train_dir.parent))
    return s


# ---------------------------------------------------------------- experiments

def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _cat_files(repo: Path, specs: list[str]) -> list[bytes | None]:
    """Contents of many `rev:path` blobs through one `git cat-file --batch`; None where absent."""
    out = _git(repo, "cat-file", "--batch", stdin="".join(f"{s}\n" for s in specs).encode())
    if out is None:
        return [None] * len(specs)
    result: list[bytes | None] = []
    pos = 0
    for _ in specs:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            result.append(out[pos:pos + size])
            pos += size + 1
        else:
            result.append(None)
    return result


def _load(blob: bytes | None, parse: Callable[[bytes], Any]) -> dict[str, Any]:
    if blob is None:
        return {}
    try:
        data = parse(blob)
    except (ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_experiments(repo: Path, reports: Path, params_path: Path) -> list[dict[str, Any]] | None:
    """Every experiment under refs/exps plus their baseline commits, with params and key metrics.

    None when `repo` is not a git work tree; [] when it has no experiments.
    Each row: name, rev, baseline, params (flat), metrics.
    """
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    root = Path(top.decode().strip()).resolve()
    refs = (_git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps") or b"").decode()
    found = []
    for line in refs.splitlines():
        ref, _, sha = line.partition(" ")
        m = EXP_REF.match(ref)
        if m:
            found.append((m.group(3), sha, m.group(1) + m.group(2)))
    if not found:
        return []
    revs = [(f"baseline {b[:7]}", b, "") for b in dict.fromkeys(base for *_, base in found)] + found
    try:
        rel_params = params_path.resolve().relative_to(root).as_posix()
        rel_reports = reports.resolve().relative_to(root).as_posix()
    except ValueError:
        return []
    stages = list(dict.fromkeys(stage for stage, _, _ in KEY_METRICS))
    specs = [f"{sha}:{rel_params}" for _, sha, _ in revs]
    specs += [f"{sha}:{rel_reports}/{stage}/metrics.json" for stage in stages for _, sha, _ in revs]
    blobs = _cat_files(root, specs)
    rows = []
    for i, (name, sha, base) in enumerate(revs):
        stage_metrics = {st: _load(blobs[len(revs) * (1 + j) + i], json.loads) for j, st in enumerate(stages)}
        rows.append({"name": name, "rev": sha[:7], "baseline": base[:7],
                     "params": flatten(_load(blobs[i], yaml.safe_load)),
                     "metrics": {label: stage_metrics[st].get(key) for st, key, label in KEY_METRICS}})
    return rows


def experiments(repo: Path, reports: Path, params_path: Path, current: dict[str, dict[str, Any] | None]) -> Section:
    s = Section("Experiments ranked by Dice", "experiments")
    rows = read_experiments(repo, reports, params_path)
    if rows is None:
        s.note(f"{repo}: not a git repository, so there are no DVC experiments to compare.")
        return s
    if not rows:
        s.note("No DVC experiments in this repository yet. Run some with `dvc exp run -S key=value` "
               "(README, \"Comparing runs\"), then regenerate this report with `dvc repro -f -s report`.")
        return s
    try:
        params = flatten(yaml.safe_load(params_path.read_text()))
    except (OSError, ValueError):
        params = {}
    rows.insert(0, {"name": "current run (workspace)", "rev": "workspace", "baseline": "", "params": params,
                    "metrics": {label: (current.get(st) or {}).get(key) for st, key, label in KEY_METRICS}})
    keys = sorted(set().union(*(r["params"] for r in rows)))
    differ = [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]
    labels = [label for _, _, label in KEY_METRICS]
    # The test images are the same in every run, while cleaning changes which images the OOF Dice averages
    # over: test Dice (synthetic data only) ranks first, OOF Dice breaks ties and ranks real-data runs.
    rows.sort(key=lambda r: tuple(x for lb in labels[:2] for x in (not isinstance(r["metrics"][lb], (int, float)),
                                                                    -(r["metrics"][lb] or 0))))
    s.text(f"{len(rows) - 1} runs from git (refs/exps and their baseline commits) plus the current run, ranked by "
           f"{labels[0]} (the same test images in every run), then {labels[1]} (its images change with "
           f"`clean.policy`: compare it with the all-empty Dice of the same run). Only params that differ are "
           f"shown. Metrics are read from each run's committed metrics files; regenerate after new experiments "
           f"with `dvc repro -f -s report`.")
    s.table(["#", "experiment", "rev", "baseline", *labels, *differ],
            [[k + 1, r["name"], r["rev"], r["baseline"], *(r["metrics"][lb] for lb in labels),
              *(r["params"].get(d) for d in differ)] for k, r in enumerate(rows)],
            current=next(k for k, r in enumerate(rows) if r["rev"] == "workspace"))
    if not differ:
        s.text("All runs have the same params.")
    return s


# ---------------------------------------------------------------- page

def render_html(sections: list[Section], subtitle: str) -> str:
    nav = "\n".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(s.html)}</section>'
                   for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>nerveseg report</title><style>{CSS}</style></head><body><main>"
            f"<h1>Nerve segmentation: run report</h1><p class=\"sub\">{_inline(subtitle)}</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


def render_md(sections: list[Section], subtitle: str) -> str:
    return f"# Nerve segmentation: run report\n\n{subtitle}\n\n" + "".join(
        f"## {s.title}\n\n" + "\n".join(s.md) + "\n" for s in sections)


def run(p: ReportParams, reports_dir: str | Path, interim_dir: str | Path, oof_dir: str | Path,
        thresholds_path: str | Path, params_path: str | Path, html_path: str | Path,
        summary_path: str | Path) -> dict[str, Any]:
    """Write the HTML page and the Markdown summary; returns what each section found."""
    import matplotlib

    matplotlib.use("Agg")
    reports, thresholds_path, params_path = Path(reports_dir), Path(thresholds_path), Path(params_path)
    metrics = {stage: _read_metrics(reports / stage / "metrics.json") for stage, _ in STAGES}
    thresholds = _read_metrics(thresholds_path)
    all_empty = (metrics["tune"] or {}).get("dice_all_empty")
    sections = [headline(metrics, thresholds), stage_metrics(reports, metrics),
                dice_vs_threshold(reports, thresholds, all_empty),
                *oof_sections(Path(interim_dir), Path(oof_dir), thresholds_path, p.gallery_images),
                stage_image("Contradictory near-duplicates (dedup audit)", "dedup", reports / "dedup" / "gallery.png",
                            reports, "dedup", "Near-identical frames whose masks disagree: the label noise that "
                            "the clean stage removes."),
                stage_image("Augmentation preview", "augment", reports / "augment" / "preview.png", reports,
                            "augment", "Training samples at the working size and augmented variants of each."),
                training_curves(reports / "train"),
                diagnostics_section(reports / "train"),
                experiments(params_path.resolve().parent, reports, params_path, metrics)]
    subtitle = (f"From `{reports}/` (stage metrics and plots), `{oof_dir}` (out-of-fold predictions) and "
                f"`{thresholds_path}`. Regenerate with `dvc repro` or `python -m pipeline report`.")
    write_text(html_path, render_html(sections, subtitle))
    write_text(summary_path, render_md(sections, subtitle))
    missing = sorted(stage for stage, data in metrics.items() if data is None)
    return {"sections": len(sections), "missing_stage_metrics": ", ".join(missing) or "none",
            "html": str(html_path), "summary": str(summary_path)}
