"""Clean: each policy on a hand-made pairs table, the kept manifest, truth scores, bad input and params."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.stages import clean
from pipeline.data.io import InputError
from pipeline.params import CleanParams, Params, ParamsError, parse_params

# a (mask) ~ b (empty) ~ g (mask): b contradicts two frames; c, d both masked but disagree;
# e ~ f agree; h (empty) ~ i (mask) flagged empty-vs-masked.
PAIRS = pd.DataFrame({
    "id_a":          ["a", "b", "c", "e", "h"],
    "id_b":          ["b", "g", "d", "f", "i"],
    "distance":      [0.001, 0.002, 0.001, 0.001, 0.003],
    "has_mask_a":    [True, False, True, True, False],
    "has_mask_b":    [False, True, True, True, True],
    "mask_dice":     [0.0, 0.0, 0.05, 0.9, 0.0],
    "contradictory": [True, True, True, False, True],
})


@pytest.mark.parametrize("policy, expected", [
    ("none", {}),
    ("drop_empty", {"b": "empty_vs_masked", "h": "empty_vs_masked"}),
    ("drop_both", {"a": "empty_vs_masked", "b": "empty_vs_masked", "g": "empty_vs_masked",
                   "h": "empty_vs_masked", "i": "empty_vs_masked",
                   "c": "mask_disagreement", "d": "mask_disagreement"}),
])
def test_policies_on_a_hand_made_pairs_table(policy: str, expected: dict[str, str]) -> None:
    assert clean.drop_reasons(PAIRS, policy).to_dict() == expected


def test_empty_vs_masked_wins_when_a_frame_has_both_reasons() -> None:
    pairs = pd.concat([PAIRS, pd.DataFrame({"id_a": ["c"], "id_b": ["x"], "has_mask_a": [True],
                                            "has_mask_b": [False], "contradictory": [True]})])
    assert clean.drop_reasons(pairs, "drop_both")["c"] == "empty_vs_masked"


def test_precision_recall() -> None:
    assert clean.precision_recall({"b", "h", "z"}, {"b", "h", "q", "r"}) == (2 / 3, 0.5)
    assert clean.precision_recall(set(), {"b"}) == (0.0, 0.0)


def write_inputs(root: Path, pairs: pd.DataFrame = PAIRS, truth: bool = True) -> None:
    ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    lines = ["id,split,row,subject,frame,has_mask,mask_area,path,mask_path"]
    lines += [f"{i},train,{k},1,{k + 1},{i in 'acdefgi'},{100 if i in 'acdefgi' else 0},t/{i}.tif,t/{i}_mask.tif"
              for k, i in enumerate(ids)]
    lines += ["7,test,0,,,,,t/7.tif,"]
    (root / "interim").mkdir()
    (root / "interim" / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "dedup").mkdir()
    pairs.to_csv(root / "dedup" / "pairs.csv", index=False)
    (root / "raw").mkdir()
    if truth:
        (root / "raw" / "truth").mkdir()
        pd.DataFrame({"id": ids, "corrupted": [i in "bj" for i in ids]}).to_csv(
            root / "raw" / "truth" / "train_truth.csv", index=False)


def run_clean(root: Path, policy: str) -> dict:
    return clean.run(Params(clean=CleanParams(policy=policy)), interim=root / "interim", dedup=root / "dedup",
                     raw=root / "raw", out=root / "processed", metrics=root / "metrics.json")


def test_stage_writes_kept_rows_unchanged_and_scores_against_truth(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    summary = run_clean(tmp_path, "drop_empty")
    interim = (tmp_path / "interim" / "manifest.csv").read_text().splitlines()
    kept = (tmp_path / "processed" / "manifest.csv").read_text().splitlines()
    assert kept == [line for line in interim if line.split(",")[0] not in {"b", "h", "7"}]
    assert summary == json.loads((tmp_path / "metrics.json").read_text())
    assert summary == {
        "train_images": 10, "kept": 8, "dropped": 2, "dropped_empty_vs_masked": 2, "dropped_mask_disagreement": 0,
        "contradictory_pairs": 4, "synthetic_corrupted": 2,
        "synthetic_detected_precision": 0.5, "synthetic_detected_recall": 0.5,
        "synthetic_dropped_precision": 0.5, "synthetic_dropped_recall": 0.5}


def test_stage_without_truth_reports_no_synthetic_scores(tmp_path: Path) -> None:
    write_inputs(tmp_path, truth=False)
    summary = run_clean(tmp_path, "drop_both")
    assert summary["dropped"] == 7 and summary["dropped_mask_disagreement"] == 2
    assert not any(key.startswith("synthetic") for key in summary)


def test_stale_pairs_are_an_input_error_naming_the_file(tmp_path: Path) -> None:
    write_inputs(tmp_path, pairs=PAIRS.assign(id_b=["b", "g", "d", "f", "zz"]))
    with pytest.raises(InputError, match=r"pairs.csv: 1 id\(s\) not among the train images.*zz"):
        run_clean(tmp_path, "none")


def test_pairs_with_a_missing_column_are_an_input_error(tmp_path: Path) -> None:
    write_inputs(tmp_path, pairs=PAIRS.drop(columns="contradictory"))
    with pytest.raises(InputError, match="pairs.csv: missing column.*contradictory"):
        run_clean(tmp_path, "none")


def test_missing_dedup_output_is_named(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    (tmp_path / "dedup" / "pairs.csv").unlink()
    with pytest.raises(InputError, match="pairs.csv: not found"):
        run_clean(tmp_path, "none")


def test_bad_clean_params_name_the_key() -> None:
    with pytest.raises(ParamsError, match="clean.policy: 'drop_all' is not one of"):
        parse_params({"clean": {"policy": "drop_all"}})
    with pytest.raises(ParamsError, match="clean.min_pair_dice.*known: policy"):
        parse_params({"clean": {"min_pair_dice": 0.2}})   # owned by dedup, which flags the pairs
