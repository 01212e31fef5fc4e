"""Clean stage: drop training frames whose labels contradict a near-duplicate.

Reads the dedup stage's contradictory pairs and applies `clean.policy`:
  - none: keep every frame;
  - drop_empty: in each empty-vs-masked pair drop the frame without a mask (the
    likely missed label); pairs where both masks exist but disagree are kept, as
    there is no telling which outline is right;
  - drop_both: drop both frames of every contradictory pair.
Writes the kept train rows of the interim manifest, unchanged, to `manifest.csv`.
On synthetic data (a `truth/train_truth.csv` beside the images) it also scores the
detected and the dropped frames against the generator's `corrupted` flag.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.artifacts import TRAIN_TRUTH, read_pairs, read_text_csv, read_train_truth, write_kept_manifest
from pipeline.data.io import InputError, write_json
from pipeline.params import Params

EMPTY_VS_MASKED = "empty_vs_masked"
MASK_DISAGREEMENT = "mask_disagreement"


def drop_reasons(pairs: pd.DataFrame, policy: str) -> pd.Series:
    """Frames to drop -> reason, from a pairs table (id_a, id_b, has_mask_a, has_mask_b, contradictory).

    A frame in several pairs gets one reason: empty-vs-masked wins over mask disagreement.
    """
    bad = pairs[pairs.contradictory]
    one_empty = bad[bad.has_mask_a != bad.has_mask_b]
    both_masked = bad[bad.has_mask_a & bad.has_mask_b]
    if policy == "none":
        groups: list[tuple[pd.Series, str]] = []
    elif policy == "drop_empty":
        groups = [(one_empty.id_b.where(one_empty.has_mask_a, one_empty.id_a), EMPTY_VS_MASKED)]
    elif policy == "drop_both":
        groups = [(pd.concat([one_empty.id_a, one_empty.id_b]), EMPTY_VS_MASKED),
                  (pd.concat([both_masked.id_a, both_masked.id_b]), MASK_DISAGREEMENT)]
    else:
        raise ValueError(f"unknown clean policy {policy!r}")
    reasons = pd.concat([pd.Series(reason, index=ids.to_numpy()) for ids, reason in groups] or [pd.Series(dtype=str)])
    return reasons[~reasons.index.duplicated(keep="first")].sort_index()


def empty_side(pairs: pd.DataFrame) -> set[str]:
    """Frames without a mask that have a masked near-duplicate: the suspected missed labels."""
    one_empty = pairs[pairs.contradictory & (pairs.has_mask_a != pairs.has_mask_b)]
    return set(one_empty.id_b.where(one_empty.has_mask_a, one_empty.id_a))


def precision_recall(flagged: set[str], truth: set[str]) -> tuple[float, float]:
    """Precision and recall of a flagged set; 0.0 where the denominator is empty."""
    hits = len(flagged & truth)
    return (hits / len(flagged) if flagged else 0.0), (hits / len(truth) if truth else 0.0)


def run(params: Params, *, interim: str | Path, dedup: str | Path, raw: str | Path,
        out: str | Path, metrics: str | Path) -> dict[str, float]:
    """Write the kept train rows to `out`/manifest.csv and the summary to `metrics`."""
    params = params.clean
    interim_dir, dedup_dir, raw_dir = Path(interim), Path(dedup), Path(raw)
    # Read as text, so the kept rows are written back exactly as the load stage wrote them.
    manifest = read_text_csv(interim_dir / "manifest.csv", ["id", "split"], "run the load stage first")
    train = manifest[manifest.split == "train"]
    pairs_path = dedup_dir / "pairs.csv"
    pairs = read_pairs(dedup_dir)
    unknown = sorted((set(pairs.id_a) | set(pairs.id_b)) - set(train.id))
    if unknown:
        raise InputError(f"{pairs_path}: {len(unknown)} id(s) not among the train images of "
                         f"{interim_dir / 'manifest.csv'}, e.g. {', '.join(unknown[:5])} (stale dedup output?)")
    reasons = drop_reasons(pairs, params.policy)
    kept = train[~train.id.isin(reasons.index)]
    write_kept_manifest(out, kept)
    counts = reasons.value_counts()
    summary: dict[str, float] = {
        "train_images": int(len(train)),
        "kept": int(len(kept)),
        "dropped": int(len(reasons)),
        f"dropped_{EMPTY_VS_MASKED}": int(counts.get(EMPTY_VS_MASKED, 0)),
        f"dropped_{MASK_DISAGREEMENT}": int(counts.get(MASK_DISAGREEMENT, 0)),
        "contradictory_pairs": int(pairs.contradictory.sum()),
    }
    truth = read_train_truth(raw_dir)
    if truth is not None:
        truth_path = raw_dir / TRAIN_TRUTH
        missing = sorted(set(train.id) - set(truth.id))
        if missing:
            raise InputError(f"{truth_path}: no truth for {len(missing)} train image(s), e.g. "
                             f"{', '.join(missing[:5])} (truth from another dataset?)")
        corrupted = set(truth.id[truth.corrupted])
        detected_p, detected_r = precision_recall(empty_side(pairs), corrupted)
        dropped_p, dropped_r = precision_recall(set(reasons.index), corrupted)
        summary |= {
            "synthetic_corrupted": len(corrupted),
            "synthetic_detected_precision": round(detected_p, 4),
            "synthetic_detected_recall": round(detected_r, 4),
            "synthetic_dropped_precision": round(dropped_p, 4),
            "synthetic_dropped_recall": round(dropped_r, 4),
        }
    write_json(metrics, summary)
    return summary
