"""What each stage is worth: Dice on the generator's true test masks, four configurations.

Runs the pipeline's own stage functions (load, plan, dedup, clean, augment, train, tune, predict,
called as `bench_peer.py`'s `run_ours` calls them) on a generated dataset larger than the default,
with one plan per seed shared by every row, so the same training budget (`train.budget` image-steps,
spent by the plan on folds, epochs and batch size) and working size:

  1. plain U-Net: no cleaning, no presence head, untuned thresholds (0.5 / 0.5 / 0)
  2. + cleaning (clean.policy: drop_empty)
  3. + presence head (train.presence_head: true)
  4. + tuning (thresholds chosen on out-of-fold predictions by the tune stage)

and prints the all-empty baseline beside them. Rows 3 and 4 share one trained model. Everything not
set on the command line is at the `params.yaml` defaults (`train.budget`, `train.epochs`,
`train.train_folds`, `train.batch_size`: auto, resolved by the plan stage); `--budget`, `--epochs`
and `--train-folds` override them for all rows alike. Cleaning trains the same epochs on fewer
images, so rows 2-4 take fewer image-steps than row 1 (as in a real run of the pipeline).
Each seed generates its own dataset and trains afresh, so several seeds show how much
of a difference between rows is noise; the last table is the mean and range over seeds.

    python benchmarks/bench_quality.py [--seeds 42 43] [--subjects 16] [--frames 40] [--test-images 200]
                                       [--budget N] [--epochs N] [--train-folds N] [--out /tmp/bench_quality]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.artifacts import read_plan  # noqa: E402
from pipeline.data.io import write_json  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.stages import augment, clean, dedup, load, plan, predict, synth, train, tune  # noqa: E402

ROWS = ("1. plain U-Net (no cleaning, no presence head, 0.5/0.5/0)", "2. + cleaning (drop_empty)",
        "3. + presence head", "4. + tuned thresholds")


def _stage_chain(p: Params, raw: Path, interim: Path, plan_json: Path, dedup_dir: Path, out: Path
                 ) -> dict[str, dict]:
    """clean -> augment -> train -> (tune) -> predict under `out`; returns the scores per threshold set."""
    clean.run(p, interim=interim, dedup=dedup_dir, raw=raw, out=out / "processed", metrics=out / "clean.json")
    augment.run(p, interim=interim, plan=plan_json, out=out / "augment.json", preview=out / "preview.png")
    trained = train.run(p, interim=interim, manifest=out / "processed" / "manifest.csv", augment=out / "augment.json",
                        plan=plan_json, models=out / "models", oof=out / "oof", reports=out / "train_reports")
    variants = {"untuned": out / "untuned.json"}
    write_json(variants["untuned"], {"pixel": 0.5, "presence": 0.5, "min_area": 0})
    if p.train.presence_head:
        tune.run(p, oof=out / "oof", interim=interim, plan=plan_json, out=out / "tuned.json",
                 reports=out / "tune_reports")
        variants["tuned"] = out / "tuned.json"
    kept = json.loads((out / "clean.json").read_text())["kept"]
    rows = {}
    for label, path in variants.items():
        scores = predict.run(p, interim=interim, models=out / "models", thresholds=path, raw=raw,
                             out=out / f"submission_{label}.csv", metrics=out / f"predict_{label}.json")
        rows[label] = {"test_dice": scores["synthetic_test_dice"], "all_empty": scores["synthetic_test_all_empty_dice"],
                       "oof_dice": trained["dice"] if label == "untuned" else None,  # train's Dice is at 0.5 gates
                       "kept": kept}
    return rows


def one_seed(base: Params, seed: int, root: Path) -> list[tuple[str, float, float | None, int | str]]:
    """The four rows and the all-empty baseline for one generated dataset and training seed."""
    if root.exists():
        shutil.rmtree(root)  # train resumes a matching run hash: start clean
    root.mkdir(parents=True)
    raw, interim, dedup_dir, plan_json = root / "raw", root / "interim", root / "dedup", root / "plan.json"
    p = dataclasses.replace(base, seed=seed, data=dataclasses.replace(base.data, raw_dir=str(raw)))
    synth.run(p, out=raw)
    load.run(p, raw=raw, out=interim, metrics=root / "load.json", fingerprint=root / "fingerprint.json")
    plan.run(p, fingerprint=root / "fingerprint.json", out=plan_json)  # one plan: every row's budget
    t = read_plan(plan_json).apply(p).train
    print(f"seed {seed}: plan: budget {t.budget} image-steps, {t.train_folds} of {t.folds} folds x {t.epochs} "
          f"epochs, batch {t.batch_size}, {t.height}x{t.width}", flush=True)
    dedup.run(p, interim=interim, plan=plan_json, out=dedup_dir, reports=root / "dedup_reports", progress=False)

    def chain(policy: str, presence: bool, name: str) -> dict[str, dict]:
        q = dataclasses.replace(p, clean=dataclasses.replace(p.clean, policy=policy),
                                train=dataclasses.replace(p.train, presence_head=presence))
        return _stage_chain(q, raw, interim, plan_json, dedup_dir, root / name)

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
    ap.add_argument("--budget", type=int, help="train.budget: training image-steps over all trained folds "
                                               "(default: params.yaml's auto, 24 x the training images)")
    ap.add_argument("--epochs", type=int, help="train.epochs per trained fold (default: the plan's)")
    ap.add_argument("--train-folds", type=int, help="train.train_folds (default: the plan's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_quality"))
    args = ap.parse_args()

    base = Params()
    overrides = {k: v for k, v in (("budget", args.budget), ("epochs", args.epochs),
                                   ("train_folds", args.train_folds)) if v is not None}
    try:  # pydantic dataclasses validate on replace
        base = dataclasses.replace(
            base,
            synth=dataclasses.replace(base.synth, subjects=args.subjects, frames_per_subject=args.frames,
                                      test_images=args.test_images),
            train=dataclasses.replace(base.train, **overrides))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.subjects} subjects x {args.frames} frames, {args.test_images} test images; train "
          f"{', '.join(f'{k} {v}' for k, v in overrides.items()) or 'budget, folds, epochs and batch'} "
          f"{'set' if overrides else 'from the plan'}", flush=True)
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
