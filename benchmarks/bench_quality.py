"""What each stage is worth: Dice on the generator's true test masks, four configurations.

Runs the pipeline's own stage functions on a generated dataset larger than the
default, with the same training budget (epochs, working size, folds) for every row:

  1. plain U-Net: no cleaning, no presence head, untuned thresholds (0.5 / 0.5 / 0)
  2. + cleaning (clean.policy: drop_empty)
  3. + presence head (train.presence_head: true)
  4. + tuning (thresholds chosen on out-of-fold predictions by the tune stage)

and prints the all-empty baseline beside them. Rows 3 and 4 share one trained model.
Each seed generates its own dataset and trains afresh, so several seeds show how much
of a difference between rows is noise; the last table is the mean and range over seeds.

    python benchmarks/bench_quality.py [--seeds 42 43] [--subjects 16] [--frames 40] [--epochs 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pipeline.stages import augment, clean, dedup, load, predict, synth, train, tune
from pipeline.data.io import write_json
from pipeline.params import Params

ROWS = ("1. plain U-Net (no cleaning, no presence head, 0.5/0.5/0)", "2. + cleaning (drop_empty)",
        "3. + presence head", "4. + tuned thresholds")


def _stage_chain(p: Params, raw: Path, interim: Path, dedup_dir: Path, out: Path) -> dict[str, dict]:
    """clean -> augment -> train -> (tune) -> predict under `out`; returns the scores per threshold set."""
    clean.run(p.clean, interim, dedup_dir, raw, out / "processed", out / "clean.json")
    augment.run(p.augment, p.seed, (p.train.height, p.train.width), interim, out / "augment.json", out / "preview.png")
    trained = train.run(p.train, p.seed, interim, out / "processed" / "manifest.csv", out / "augment.json",
                        out / "models", out / "oof", out / "train_reports")
    variants = {"untuned": out / "untuned.json"}
    write_json(variants["untuned"], {"pixel": 0.5, "presence": 0.5, "min_area": 0})
    if p.train.presence_head:
        tune.run(out / "oof", interim, out / "tuned.json", out / "tune_reports", p.tune)
        variants["tuned"] = out / "tuned.json"
    kept = json.loads((out / "clean.json").read_text())["kept"]
    rows = {}
    for label, path in variants.items():
        scores = predict.run(interim, out / "models", path, raw, out / f"submission_{label}.csv",
                             out / f"predict_{label}.json", p.predict, p.data)
        rows[label] = {"test_dice": scores["synthetic_test_dice"], "all_empty": scores["synthetic_test_all_empty_dice"],
                       "oof_dice": trained["dice"] if label == "untuned" else None,  # train's Dice is at 0.5 gates
                       "kept": kept}
    return rows


def one_seed(base: Params, seed: int, root: Path) -> list[tuple[str, float, float | None, int | str]]:
    """The four rows and the all-empty baseline for one generated dataset and training seed."""
    p = dataclasses.replace(base, seed=seed)
    raw, interim, dedup_dir = root / "raw", root / "interim", root / "dedup"
    synth.run(p.synth, p.seed, raw)
    load.run(raw, p.data, interim, root / "load.json")
    dedup.run(p.dedup, interim, dedup_dir, root / "dedup_reports")

    def chain(policy: str, presence: bool, name: str) -> dict[str, dict]:
        q = dataclasses.replace(p, clean=dataclasses.replace(p.clean, policy=policy),
                                train=dataclasses.replace(p.train, presence_head=presence))
        return _stage_chain(q, raw, interim, dedup_dir, root / name)

    plain = chain("none", False, "plain")
    cleaned = chain("drop_empty", False, "clean")
    presence = chain("drop_empty", True, "presence")
    tuned = json.loads((root / "presence" / "tuned.json").read_text())
    print(f"seed {seed}: tuned thresholds {tuned}", flush=True)
    return [("all-empty prediction", plain["untuned"]["all_empty"], None, "-"),
            *((name, r["test_dice"], r["oof_dice"], r["kept"])
              for name, r in zip(ROWS, (plain["untuned"], cleaned["untuned"], presence["untuned"],
                                        presence["tuned"])))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_quality"))
    args = ap.parse_args()

    base = Params()
    base = dataclasses.replace(
        base,
        synth=dataclasses.replace(base.synth, subjects=args.subjects, frames_per_subject=args.frames,
                                  test_images=args.test_images),
        train=dataclasses.replace(base.train, epochs=args.epochs, folds=args.folds, train_folds=args.folds))
    print(f"{args.subjects} subjects x {args.frames} frames, {args.test_images} test images, "
          f"{args.folds} folds x {args.epochs} epochs at {base.train.height}x{base.train.width}", flush=True)
    tables = {}
    for seed in args.seeds:  # each seed's table as soon as it is done: a long run may be cut short
        began = time.perf_counter()
        tables[seed] = table = one_seed(base, seed, args.out / f"seed_{seed}")
        print(f"\nseed {seed} ({time.perf_counter() - began:.0f} s)\n\n"
              "| configuration | synthetic test Dice | OOF Dice (0.5 gates) | training images |\n|---|---|---|---|")
        for name, dice, oof, kept in table:
            print(f"| {name} | {dice:.4f} | {'-' if oof is None else f'{oof:.4f}'} | {kept} |")
        print(flush=True)
    if len(tables) > 1:
        dice = np.array([[row[1] for row in table] for table in tables.values()])
        print(f"mean over {len(tables)} seeds (min-max)\n\n| configuration | synthetic test Dice |\n|---|---|")
        for k, (name, *_) in enumerate(next(iter(tables.values()))):
            print(f"| {name} | {dice[:, k].mean():.4f} ({dice[:, k].min():.4f}-{dice[:, k].max():.4f}) |")


if __name__ == "__main__":
    main()
