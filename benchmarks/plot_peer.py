"""Test Dice against training budget, this pipeline vs nnU-Net v2, from `bench_peer.py`'s result files.

    python benchmarks/plot_peer.py /tmp/bp/*/results_*.json --out docs/bench_peer.png

One panel per variant; each seed is a dot, each method's mean per budget a line; the all-empty
baseline (what an empty submission scores) is dashed. Runs whose `--set` overrides change the
recipe are left out (`peer_table.recipe_changes`): they belong to the technique table.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_table import join  # noqa: E402

CREDIT = "USGRA-seg dataset, tmkand/usgra-seg, CC-BY 4.0"


def collect(paths: list[Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """variant -> method -> [(budget, Dice)], plus `all-empty` -> [(0, baseline)].

    The budget is this pipeline's image-steps in that run; nnU-Net's equal share differs from it
    only by the rounding to its batch size (separate `--ours-only` / `--nnunet-only` files are
    joined first by `peer_table.join`, so nnU-Net is plotted at our image-steps)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in join(paths):
        for method, row in run["rows"].items():
            out[run["variant"]][method].append((run["steps"], row["dice"]))
        ours = run["rows"].get("this pipeline")
        if ours:
            out[run["variant"]]["all-empty"].append((0, ours["empty_truths"] / ours["images"]))
    return out


def plot(data: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    variants = sorted(data)
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        ax.set_xscale("log")
        for method, points in sorted(data[variant].items()):
            if method == "all-empty":
                ax.axhline(points[0][1], ls="--", c="grey", lw=1, label="all-empty submission")
                continue
            steps, dice = np.array(points).T
            line = ax.scatter(steps, dice, s=18, alpha=0.6)
            budgets = np.unique(steps)
            ax.plot(budgets, [dice[steps == b].mean() for b in budgets], c=line.get_facecolor()[0], marker="_",
                    ms=14, label=f"{method} (mean; dots: seeds)")
        budgets = sorted({b for m, points in data[variant].items() if m != "all-empty" for b, _ in points})
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training image-steps, both methods (log)")
        ax.set_ylabel("test Dice (empty vs empty = 1)")
        ax.set_title(variant)
        ax.legend(fontsize=8)
    fig.suptitle(f"Data: {CREDIT}", fontsize=8, y=0.02)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results_*.json files written by bench_peer.py")
    ap.add_argument("--out", type=Path, default=Path("bench_peer.png"))
    args = ap.parse_args()
    plot(collect(args.results), args.out)


if __name__ == "__main__":
    main()
