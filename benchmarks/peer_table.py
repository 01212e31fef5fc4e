"""One table per variant from `bench_peer.py`'s result files: this pipeline vs nnU-Net v2, seeds side by side.

    python benchmarks/peer_table.py /tmp/bp/*/results_*.json

Joins the files by variant, scale and seed, so a run of both methods and separate `--ours-only` /
`--nnunet-only` runs of the same budget combine; files whose `--set` overrides change the recipe
are left out (they belong to the technique table): speed knobs (`train.threads`, `train.workers`)
and settings equal to today's `params.yaml` defaults do not count as changes. Prints each
method's test Dice per seed, the mean with its range, the ratio of the means (and its range over seeds), the margin over the all-empty
submission, image-steps and training CPU seconds, and the plan's time estimate against the
actual training time.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.params import Params, with_settings  # noqa: E402

SPEED_KNOBS = {"train.threads", "train.workers"}  # change how fast, not what is trained
CREDIT = "USGRA-seg dataset, tmkand/usgra-seg, CC-BY 4.0"
OURS, PEER = "this pipeline", "nnU-Net v2 2d"


def recipe_changes(overrides: list[str]) -> list[str]:
    """The `section.key=value` overrides that change what is trained against today's defaults."""
    defaults = Params()

    def changes(item: str) -> bool:
        try:
            return with_settings(defaults, [item]) != defaults
        except ValueError:
            return True

    return [item for item in overrides if item.partition("=")[0] not in SPEED_KNOBS and changes(item)]


def join(paths: list[Path]) -> list[dict]:
    """One entry per run: {variant, scale, seed, steps (ours, else the nnU-Net file's budget), rows}.

    A file of both methods is one run; an `--nnunet-only` file joins the `--ours-only` run of the same
    variant, scale and seed whose image-steps are within 5% of its budget (nnU-Net rounds to its
    batch). Files with recipe changes (`recipe_changes`) are left out: they belong to the technique table."""
    runs, peers = [], []
    for path in sorted(paths):
        result = json.loads(path.read_text())
        if recipe_changes(result.get("overrides", [])):
            continue
        rows = result["rows"]
        run = {"variant": result["variant"], "scale": float(result.get("scale", 1.0)), "seed": result.get("seed"),
               "steps": rows[OURS]["image_steps"] if OURS in rows else result.get("budget"), "rows": dict(rows),
               "files": {method: path for method in rows}}
        (runs if OURS in rows else peers).append(run)
    for peer in peers:
        match = next((r for r in runs if PEER not in r["rows"] and peer["seed"] is not None
                      and (r["variant"], r["scale"], r["seed"]) == (peer["variant"], peer["scale"], peer["seed"])
                      and abs(r["steps"] - peer["steps"]) <= 0.05 * r["steps"]), None)
        if match is None:
            runs.append(peer)
        else:
            match["rows"].update(peer["rows"])
            match["files"].update(peer["files"])
    return runs


def collect(paths: list[Path]) -> dict[tuple[str, float, int], dict[int, dict[str, dict]]]:
    """(variant, scale, budget) -> seed -> method -> row; the budget is our image-steps rounded to
    the nearest 5% step so the seeds of one budget share a table. Two files of one method for the
    same cell (a re-run) are not merged silently: the later path wins, and stderr says which."""
    out: dict[tuple[str, float, int], dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    sources: dict[tuple, Path] = {}
    groups: list[int] = []
    for run in join(paths):
        budget = next((g for g in groups if abs(g - run["steps"]) <= 0.05 * g), None)
        if budget is None:
            groups.append(budget := int(run["steps"]))
        cell = (run["variant"], run["scale"], budget)
        for method, path in run["files"].items():
            earlier = sources.get((*cell, run["seed"], method))
            if earlier is not None:
                print(f"warning: {run['variant']} seed {run['seed']}, about {budget:,} image-steps: two {method} "
                      f"runs ({earlier}, {path}); the table shows {path}", file=sys.stderr)
            sources[(*cell, run["seed"], method)] = path
        out[cell][run["seed"]].update(run["rows"])
    return out


def _spread(values: list[float], fmt: str) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})" if len(v) > 1 else f"{v.mean():{fmt}}"


def table(variant: str, scale: float, budget: int, seeds: dict[int, dict[str, dict]]) -> str:
    """The Markdown table of one variant and budget; seeds missing a method are shown but left out of the ratio."""
    lines = [f"### {variant}, scale {scale:g}, about {budget:,} image-steps", "",
             "| seed | ours: test Dice | nnU-Net: test Dice | ratio | ours over all-empty | image-steps, ours / nnU-Net "
             "| train CPU s, ours / nnU-Net | ours: plan's estimate / actual train s |",
             "|---|---|---|---|---|---|---|---|"]
    paired, ours_all, peer_all, margins = [], [], [], []
    for seed in sorted(seeds):
        rows = seeds[seed]
        ours, peer = rows.get(OURS), rows.get(PEER)
        cells = [str(seed)]
        cells.append(f"{ours['dice']:.4f}" if ours else "-")
        cells.append(f"{peer['dice']:.4f}" if peer else "-")
        if ours and peer and peer["dice"]:
            paired.append((ours["dice"], peer["dice"]))
            cells.append(f"{ours['dice'] / peer['dice']:.3f}")
        else:
            cells.append("-")
        if ours:
            ours_all.append(ours["dice"])
            margin = ours["dice"] - ours["empty_truths"] / ours["images"]
            margins.append(margin)
            cells.append(f"{margin:+.4f}")
        else:
            cells.append("-")
        if peer:
            peer_all.append(peer["dice"])
        cells.append(f"{ours['image_steps'] if ours else '-'} / {peer['image_steps'] if peer else '-'}")
        cells.append(f"{ours['train_cpu']:.0f}" if ours else "-")
        cells[-1] += f" / {peer['train_cpu']:.0f}" if peer else " / -"
        estimate = ours.get("estimated_train_seconds") if ours else None
        cells.append(f"{estimate:.0f} / {ours['train_wall']:.0f} ({estimate / ours['train_wall']:.2f})"
                     if estimate and ours["train_wall"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if ours_all or peer_all:
        ratio = "-"
        if paired:
            o, p = np.array(paired).T
            per_seed = o / p
            ratio = f"{o.mean() / p.mean():.3f} (per seed {per_seed.min():.3f}-{per_seed.max():.3f})"
        lines.append(f"| mean (min-max) | {_spread(ours_all, '.4f') if ours_all else '-'} | "
                     f"{_spread(peer_all, '.4f') if peer_all else '-'} | {ratio} | "
                     f"{_spread(margins, '+.4f') if margins else '-'} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results_*.json files written by bench_peer.py")
    args = ap.parse_args()
    for (variant, scale, budget), seeds in sorted(collect(args.results).items()):
        print(table(variant, scale, budget, seeds), end="\n\n")
    print(f"Data: {CREDIT}.")


if __name__ == "__main__":
    main()
