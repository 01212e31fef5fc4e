import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.data import artifacts
from pipeline.stages import tune
from pipeline.cli import app
from pipeline.data.io import InputError
from pipeline.data.artifacts import open_arrays, read_manifest
from pipeline.model.metrics import mean_dice
from pipeline.model.network import to_native
from pipeline.params import Params, ParamsError, TuneParams, parse_params
from pipeline.data.artifacts import Thresholds
from pipeline.model.postprocess import apply

PLANTED = TuneParams(pixel_thresholds=(0.5, 0.3, 0.4), presence_thresholds=(0.6, 0.7, 0.8), min_areas=(0, 50, 120),
                     keep_largest=(False,), min_component_fractions=(0.0,))  # components: off only


def _planted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 images of 32x32 whose only perfect thresholds are pixel 0.4, presence 0.7, min_area 50.

    4 nerves (10x10 at p=0.45, a 2-px ring at p=0.35 that 0.3 would add, presence 0.75 that
    0.8 would gate), 3 empty frames with a large false blob (presence 0.65: only 0.7 gates it),
    3 empty frames with a 25-px speck (presence 0.9: only min_area 50 removes it), 2 clean empties.
    """
    prob = np.zeros((12, 32, 32), np.float32)
    truth = np.zeros((12, 32, 32), np.uint8)
    presence = np.zeros(12, np.float32)
    for i in range(4):
        r, c = 4 + 4 * i, 3 + 5 * i
        prob[i, r - 2:r + 12, c - 2:c + 12] = 0.35
        prob[i, r:r + 10, c:c + 10] = 0.45
        truth[i, r:r + 10, c:c + 10] = 1
        presence[i] = 0.75
    prob[4:7, 5:17, 8:20] = 0.45
    presence[4:7] = 0.65
    prob[7:10, 20:25, 2:7] = 0.45
    presence[7:10] = 0.9
    presence[10:] = 0.1
    return prob, truth, presence


def test_finds_the_planted_thresholds():
    prob, truth, presence = _planted()
    grid, chosen, metrics = tune.search(prob, truth, np.arange(12), presence, PLANTED)
    assert chosen == Thresholds(pixel=0.4, presence=0.7, min_area=50)
    assert metrics["dice_best"] == 1.0
    assert (grid.dice < 1.0).sum() == len(grid) - 1  # the optimum is unique
    assert len(grid) == 27 and metrics["candidates"] == 27
    assert metrics["dice_all_empty"] == pytest.approx(8 / 12, abs=1e-5)
    assert metrics["dice_default"] == pytest.approx(8 / 12, abs=1e-5)  # 0.5 finds no nerve at all
    assert metrics["dice_no_presence_gate"] == pytest.approx(9 / 12, abs=1e-5)  # false blobs survive


def test_grid_matches_thresholding_at_native_size():
    """Every candidate's score equals thresholding the upsampled probabilities and scoring the masks."""
    rng = np.random.default_rng(3)
    native = np.zeros((20, 24, 32), np.uint8)
    for i in range(0, 20, 2):
        r, c = rng.integers(0, 14), rng.integers(0, 20)
        native[i, r:r + 9, c:c + 11] = 1
    low = torch.nn.functional.avg_pool2d(torch.from_numpy(native.astype(np.float32))[:, None], 2)[:, 0].numpy()
    prob = np.clip(low + rng.normal(0, 0.25, low.shape), 0, 1).astype(np.float16)
    prob[::3, :, :6] = 0.5  # flat patches exactly at a threshold: the comparison must be strict in both
    presence = np.clip(native.any(axis=(1, 2)) * 0.4 + rng.random(20) * 0.6, 0, 1).astype(np.float32)
    presence[:6] = 0.5  # exactly at a grid threshold too
    p = TuneParams(pixel_thresholds=(0.3, 0.5, 0.6), presence_thresholds=(0.2, 0.5, 0.7), min_areas=(0, 30, 90),
                   min_component_fractions=(0.0, 0.004, 0.02))  # 24x32: components of >= 3.072 / 15.36 pixels
    rows = rng.permutation(20)  # OOF order differs from array order
    grid, _, _ = tune.search(prob[rows], native, rows, presence[rows], p)
    assert len(grid) == 3 * 3 * 3 * 6  # components: off, 2 min_component, keep_largest x 3
    up = to_native(torch.from_numpy(prob.astype(np.float32))[:, None], (24, 32)).numpy()
    for row in grid.itertuples():
        t = Thresholds(row.pixel, row.presence, int(row.min_area), bool(row.keep_largest), row.min_component)
        assert row.dice == pytest.approx(mean_dice(apply(up, presence, t), native), abs=1e-12), t
    assert grid.dice.nunique() > 5
    changed = grid.groupby(["pixel", "presence", "min_area"]).dice.nunique() > 1
    assert changed.mean() > 0.3  # the component rules change the score of many gate settings


def _oof(tiny_interim, path, ids=None, size=(48, 64)):
    manifest = read_manifest(tiny_interim)
    train = manifest[manifest.split == "train"]
    train = train[train.id.isin(ids)] if ids is not None else train
    _, masks = open_arrays(tiny_interim, "train")
    low = torch.nn.functional.interpolate(torch.from_numpy(masks[train.row.to_numpy()].astype(np.float32))[:, None],
                                          size=size, mode="area")[:, 0].numpy()
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "oof.npz", ids=np.asarray(train.id, dtype=str), mask_prob=(low * 0.9).astype(np.float16),
             presence_prob=train.has_mask.to_numpy(float).astype(np.float32) * 0.8 + 0.1)
    return train


def test_run_writes_thresholds_table_plots_and_metrics(tiny_interim, tiny_plan, tmp_path):
    train = _oof(tiny_interim, tmp_path / "oof", ids=None)
    metrics = tune.run(Params(), plan=tiny_plan, oof=tmp_path / "oof", interim=tiny_interim,
                       out=tmp_path / "thresholds.json",
                       reports=tmp_path / "reports")
    chosen = json.loads((tmp_path / "thresholds.json").read_text())
    assert set(chosen) == {"pixel", "presence", "min_area", "keep_largest", "min_component"}
    grid = pd.read_csv(tmp_path / "reports" / "grid.csv")
    assert list(grid.columns) == ["pixel", "presence", "min_area", "keep_largest", "min_component", "dice"]
    assert len(grid) == 7 * 12 * 7 * 8 == metrics["candidates"]  # 8 component options: off, 3 + 4 on
    at = np.logical_and.reduce([np.isclose(grid[k].astype(float), float(v)) for k, v in chosen.items()])
    assert at.sum() == 1  # the chosen thresholds are one of the grid's candidates
    side = grid[(grid.presence > 0) == (chosen["presence"] > 0)]  # gated or not, as chosen
    if metrics["tuned"]:  # a best (ties: nearest the defaults), else the untuned defaults
        assert grid.dice[at].iloc[0] == pytest.approx(side.dice.max(), abs=1e-6)
    else:
        assert chosen == Thresholds().to_dict()
    assert grid.dice[at].iloc[0] == pytest.approx(metrics["dice_best"], abs=1e-5)
    assert grid.dice.max() == pytest.approx(max(metrics["dice_presence_gate"], metrics["dice_no_presence_gate"]),
                                            abs=1e-5)
    off = grid[~grid.keep_largest & (grid.min_component == 0)]
    assert off.dice.max() == pytest.approx(metrics["dice_no_components"], abs=1e-5)
    assert side[~side.keep_largest & (side.min_component == 0)].dice.max() <= metrics["dice_best"] + 1e-6
    for name in ("pixel", "presence", "min_area"):
        profile = pd.read_csv(tmp_path / "reports" / f"dice_vs_{name}.csv")
        assert list(profile.columns) == [name, "dice"] and profile.dice.max() == grid.dice.max()
    assert (tmp_path / "reports" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == metrics
    assert metrics["images"] == len(train) == 30
    assert metrics["dice_all_empty"] == pytest.approx(1 - train.has_mask.mean(), abs=1e-5)
    assert metrics["dice_best"] >= max(metrics["dice_default"], metrics["dice_all_empty"]) and metrics["dice_best"] > 0.9


def test_run_writes_per_image_oof_scores_at_the_chosen_thresholds(tiny_interim, tiny_plan, tmp_path):
    """oof_scores.csv: one row per OOF image, in OOF order, scored exactly as predict makes masks; the report's
    confusion matrix and gallery read it instead of re-scoring with torch."""
    from pipeline.data import rle
    from pipeline.model.metrics import dice_per_image

    train = _oof(tiny_interim, tmp_path / "oof")
    metrics = tune.run(Params(), plan=tiny_plan, oof=tmp_path / "oof", interim=tiny_interim,
                       out=tmp_path / "thresholds.json",
                       reports=tmp_path / "reports")
    scores = pd.read_csv(tmp_path / "reports" / "oof_scores.csv", dtype={"id": str, "rle": str},
                         keep_default_na=False)
    assert tuple(scores.columns) == artifacts.SCORE_COLUMNS
    assert list(scores.id) == list(train.id) and len(scores) == metrics["images"] == 30
    assert scores.dice.mean() == pytest.approx(metrics["dice_best"], abs=1e-5)
    ids, mask_prob, presence = artifacts.read_oof(tmp_path / "oof")
    assert np.array_equal(scores.presence_prob.to_numpy(np.float32), presence)  # float32 round-trips its text
    _, masks = open_arrays(tiny_interim, "train")
    truth = masks[train.row.to_numpy()].astype(bool)
    t = Thresholds(**json.loads((tmp_path / "thresholds.json").read_text()))
    pred = apply(to_native(torch.from_numpy(mask_prob.astype(np.float32))[:, None], truth.shape[1:]).numpy(),
                 presence, t)
    decoded = np.stack([rle.decode(r, truth.shape[1:]) for r in scores.rle])
    assert np.array_equal(decoded, pred)
    assert np.allclose(scores.dice, dice_per_image(pred, truth))
    assert np.array_equal(scores.truth_area, truth.sum(axis=(1, 2))) and np.array_equal(scores.predicted_area,
                                                                                        pred.sum(axis=(1, 2)))
    assert list(scores.truth_empty) == list(~train.has_mask.astype(bool))
    assert np.array_equal(scores.predicted_empty, ~pred.any(axis=(1, 2))) and (scores.rle == "").any()


def test_run_uses_only_the_ids_in_the_oof(tiny_interim, tiny_plan, tmp_path):
    _oof(tiny_interim, tmp_path / "oof", ids=["1_1", "2_3", "3_10"])
    assert tune.run(Params(tune=PLANTED), plan=tiny_plan, oof=tmp_path / "oof", interim=tiny_interim,
                    out=tmp_path / "t.json",
                    reports=tmp_path / "r")["images"] == 3


@pytest.mark.parametrize("breakage, message", [
    ("absent", "oof.npz: out-of-fold predictions not found"),
    ("missing_key", "missing key.s. presence_prob"),
    ("shape", "inconsistent shapes"),
    ("unknown_id", "1 OOF id.s. not among the train images.*9_9"),
    ("object_ids", "save ids as a str array"),
])
def test_bad_oof_is_a_clear_input_error(tiny_interim, tiny_plan, tmp_path, breakage, message):
    oof = tmp_path / "oof"
    if breakage != "absent":
        _oof(tiny_interim, oof)
        data = dict(np.load(oof / "oof.npz"))
        if breakage == "missing_key":
            del data["presence_prob"]
        elif breakage == "shape":
            data["presence_prob"] = data["presence_prob"][:-1]
        elif breakage == "unknown_id":
            data["ids"] = np.where(data["ids"] == "1_1", "9_9", data["ids"])
        else:
            data["ids"] = data["ids"].astype(object)
        np.savez(oof / "oof.npz", **data)
    with pytest.raises(InputError, match=message):
        tune.run(Params(tune=PLANTED), plan=tiny_plan, oof=oof, interim=tiny_interim, out=tmp_path / "t.json",
                 reports=tmp_path / "r")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("raw, key", [
    ({"tune": {"pixel_thresholds": []}}, r"tune\.pixel_thresholds: expected a non-empty list"),
    ({"tune": {"presence_thresholds": []}}, r"tune\.presence_thresholds"),
    ({"tune": {"min_areas": []}}, r"tune\.min_areas"),
    ({"tune": {"pixel_thresholds": [0.5, 1.5]}}, r"tune\.pixel_thresholds\[1\]"),
    ({"tune": {"min_areas": [-1]}}, r"tune\.min_areas\[0\]"),
    ({"tune": {"min_areas": [10.5]}}, r"tune\.min_areas\[0\]"),
])
def test_bad_grid_names_the_key(raw, key):
    with pytest.raises(ParamsError, match=key):
        parse_params(raw)


def test_tune_cli(tiny_interim, tiny_plan, tmp_path):
    _oof(tiny_interim, tmp_path / "oof")
    params = tmp_path / "params.yaml"
    params.write_text("tune:\n  pixel_thresholds: [0.4, 0.5]\n  presence_thresholds: [0.5]\n  min_areas: [0, 10]\n")
    args = ["tune", "--oof", str(tmp_path / "oof"), "--interim", str(tiny_interim), "--plan", str(tiny_plan), "--out",
            str(tmp_path / "t.json"), "--reports", str(tmp_path / "r"), "--params", str(params)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dice_best:" in result.output and json.loads((tmp_path / "t.json").read_text())["presence"] == 0.5
    result = CliRunner().invoke(app, args[:2] + [str(tmp_path / "nope")] + args[3:])
    assert result.exit_code == 1 and "out-of-fold predictions not found" in result.output
    assert "Traceback" not in result.output


def test_duplicate_oof_ids_name_the_file_and_up_to_five_ids(tiny_interim, tiny_plan, tmp_path):
    _oof(tiny_interim, tmp_path / "oof")
    data = dict(np.load(tmp_path / "oof" / "oof.npz"))
    ids = data["ids"].copy()
    ids[10:17] = ids[:7]  # 7 ids twice: only 5 are named
    np.savez(tmp_path / "oof" / "oof.npz", **(data | {"ids": ids}))
    with pytest.raises(InputError) as info:
        tune.run(Params(tune=PLANTED), plan=tiny_plan, oof=tmp_path / "oof", interim=tiny_interim,
                 out=tmp_path / "t.json",
                 reports=tmp_path / "r")
    text = str(info.value)
    assert str(tmp_path / "oof" / "oof.npz") in text and "7 id(s) appear more than once" in text
    named = sorted(ids[:7])[:5]
    assert f"e.g. {', '.join(named)} (" in text and sorted(ids[:7])[5] not in text
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(InputError, match="2 OOF id.s. appear more than once, e.g. 1_1, 1_2"):
        tune.train_rows(tiny_interim, np.array(["1_1", "1_2", "1_1", "1_2", "1_3"]))


def _object_and_neighbour(spurious: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 images of 32x32, each with one predicted object (16 to 100 pixels) and, beside it, a predicted
    blob of about half its size (8 to 50 pixels). `spurious`: the blob is a false positive on every
    image; only keep_largest removes it (no size threshold separates the blobs from the objects of
    other images). Else the blob is a true second object, and keep_largest would cut it."""
    prob = np.zeros((10, 32, 32), np.float32)
    truth = np.zeros((10, 32, 32), np.uint8)
    for i, side in enumerate([4, 5, 5, 6, 7, 7, 8, 9, 9, 10]):
        prob[i, 2:2 + side, 2:2 + side] = 0.9
        truth[i, 2:2 + side, 2:2 + side] = 1
        prob[i, 20:20 + side // 2, 18:18 + side] = 0.8
        truth[i, 20:20 + side // 2, 18:18 + side] = not spurious
    return prob, truth, np.full(10, 0.9, np.float32)


GATES = TuneParams(pixel_thresholds=(0.5,), presence_thresholds=(0.0, 0.5), min_areas=(0, 20))


def test_chooses_keep_largest_when_a_spurious_blob_sits_beside_the_object():
    prob, truth, presence = _object_and_neighbour(spurious=True)
    _, chosen, metrics = tune.search(prob, truth, np.arange(10), presence, GATES)
    assert chosen.keep_largest and chosen.min_component == 0.0
    assert metrics["dice_best"] == 1.0 > metrics["dice_no_components"]
    assert metrics["best_keep_largest"] is True
    # without keep_largest among the candidates no min_component can fix every image
    _, chosen, metrics = tune.search(prob, truth, np.arange(10), presence,
                                     dataclasses.replace(GATES, keep_largest=(False,),
                                                         min_component_fractions=(0.0, 0.01, 0.02, 0.04)))
    assert not chosen.keep_largest and metrics["dice_best"] < 1.0


def test_keeps_components_off_where_they_would_hurt_or_tie():
    prob, truth, presence = _object_and_neighbour(spurious=False)
    grid, chosen, metrics = tune.search(prob, truth, np.arange(10), presence, GATES)
    assert (chosen.keep_largest, chosen.min_component) == (False, 0.0)
    assert metrics["dice_best"] == metrics["dice_no_components"] == 1.0
    assert (grid[grid.keep_largest].dice < 1.0).all()           # keep_largest cuts a true object: it hurts
    small = grid[~grid.keep_largest & (grid.min_component > 0)]  # 0.0005..0.002 x 1024 < 3 pixels: changes nothing
    assert len(small) and (small.dice == 1.0).all()             # a tie: off wins


def test_search_time_with_and_without_components():
    """The component options cost one labelling per image and pixel threshold, not one per candidate."""
    import time

    prob, truth, presence = _object_and_neighbour(spurious=True)
    prob, truth, presence = np.tile(prob, (20, 1, 1)), np.tile(truth, (20, 1, 1)), np.tile(presence, 20)
    rows = np.arange(len(prob))
    p = TuneParams(min_areas=(0, 10, 20, 50))
    start = time.perf_counter()
    tune.search(prob, truth, rows, presence, dataclasses.replace(p, keep_largest=(False,), min_component_fractions=(0.0,)))
    off = time.perf_counter() - start
    start = time.perf_counter()
    _, chosen, _ = tune.search(prob, truth, rows, presence, p)
    on = time.perf_counter() - start
    assert chosen.keep_largest and on < 2.0, (off, on)


# ---------------------------------------------------------------- the one-standard-error rule

NEAR_DEFAULT = TuneParams(pixel_thresholds=(0.4, 0.5), presence_thresholds=(0.0, 0.5), min_areas=(0,),
                          keep_largest=(False,), min_component_fractions=(0.0,))


def _faint(gaining: int, losing: int, n: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images with a bright nerve (any threshold finds it), except `gaining` nerves at p=0.45 (only pixel
    0.4 finds them) and `losing` empty frames with a p=0.45 blob (only pixel 0.5 keeps them empty)."""
    prob = np.zeros((n, 32, 32), np.float32)
    truth = np.zeros((n, 32, 32), np.uint8)
    truth[:, 8:18, 8:18] = 1
    prob[:, 8:18, 8:18] = 0.9
    prob[:gaining, 8:18, 8:18] = 0.45
    truth[gaining:gaining + losing] = 0
    prob[gaining:gaining + losing] = 0
    prob[gaining:gaining + losing, 20:28, 20:28] = 0.45
    return prob, truth, np.full(n, 0.9, np.float32)


def test_clearly_beats_needs_a_gain_larger_than_its_standard_error() -> None:
    assert tune.clearly_beats(np.ones(30), np.r_[np.zeros(10), np.ones(20)], 1.0)[0]  # 10 of 30 better
    noisy = np.r_[1.0, 1.0, 0.0, np.ones(27)], np.r_[0.0, 0.0, 1.0, np.ones(27)]
    ok, gain, se = tune.clearly_beats(*noisy, 1.0)
    assert not ok and gain == pytest.approx(1 / 30) and se > gain
    assert tune.clearly_beats(*noisy, 0.0)[0]  # 0: any gain
    assert not tune.clearly_beats(np.ones(1), np.zeros(1), 1.0)[0]  # one image proves nothing


def test_a_gain_within_the_noise_keeps_the_untuned_defaults() -> None:
    prob, truth, presence = _faint(gaining=2, losing=1)
    _, chosen, metrics = tune.search(prob, truth, np.arange(30), presence, NEAR_DEFAULT)
    assert chosen == Thresholds() and metrics["tuned"] is False
    assert metrics["gain_over_default"] == pytest.approx(1 / 30, abs=1e-5)  # metrics are rounded to 5 places
    assert metrics["dice_best"] == pytest.approx(metrics["dice_default"])
    _, chosen, metrics = tune.search(prob, truth, np.arange(30), presence,
                                     dataclasses.replace(NEAR_DEFAULT, min_gain_se=0.0))
    assert chosen.pixel == 0.4 and metrics["tuned"] is True


def test_a_clear_gain_is_tuned() -> None:
    prob, truth, presence = _faint(gaining=10, losing=0)
    _, chosen, metrics = tune.search(prob, truth, np.arange(30), presence, NEAR_DEFAULT)
    assert chosen.pixel == 0.4 and metrics["tuned"] is True
    # presence 0 and 0.5 score the same here (every presence is 0.9): a tie keeps the gate at 0.5
    assert chosen.presence == 0.5
    assert metrics["gain_over_default"] == pytest.approx(1 / 3, abs=1e-5)
    assert metrics["gain_over_default"] > metrics["gain_standard_error"] > 0


def test_of_the_candidates_within_the_noise_of_the_best_the_nearest_the_defaults_is_chosen() -> None:
    """Presence 0.4 clearly beats the untuned 0.5 (ten nerves at 0.45); 0.2 is the grid's best by one image of
    30 (two nerves at 0.3 found, one empty frame at 0.3 given a blob), inside its standard error: the
    one-standard-error rule takes 0.4, the candidate nearest the defaults that the best does not clearly beat."""
    n = 30
    prob = np.zeros((n, 32, 32), np.float32)
    truth = np.zeros((n, 32, 32), np.uint8)
    presence = np.full(n, 0.9, np.float32)
    nerves = np.r_[0:12, 21:30]
    truth[nerves, 8:18, 8:18] = 1
    prob[nerves, 8:18, 8:18] = 0.9
    presence[0:10] = 0.45
    presence[10:12] = 0.3
    presence[12] = 0.3
    prob[12, 20:28, 20:28] = 0.9  # an empty frame with a confident blob, half-believed by the head
    presence[13:21] = 0.01
    p = TuneParams(pixel_thresholds=(0.5,), presence_thresholds=(0.2, 0.4, 0.5), min_areas=(0,),
                   keep_largest=(False,), min_component_fractions=(0.0,))
    grid, chosen, metrics = tune.search(prob, truth, np.arange(n), presence, p)
    dice = dict(zip(grid.presence, grid.dice))
    assert dice[0.2] == pytest.approx(29 / 30) and dice[0.4] == pytest.approx(28 / 30)
    assert dice[0.5] == pytest.approx(18 / 30)
    assert chosen.presence == 0.4 and metrics["tuned"] is True
    assert metrics["dice_best"] == pytest.approx(28 / 30, abs=1e-5)
    assert metrics["dice_grid_best"] == pytest.approx(29 / 30, abs=1e-5)
    _, chosen, _ = tune.search(prob, truth, np.arange(n), presence, dataclasses.replace(p, min_gain_se=0.0))
    assert chosen.presence == 0.2  # 0: the grid's best


# ---------------------------------------------------------------- the presence gate goes only on clear evidence

GATE_OR_NOT = TuneParams(pixel_thresholds=(0.5,), presence_thresholds=(0.0, 0.05, 0.5), min_areas=(0,),
                         keep_largest=(False,), min_component_fractions=(0.0,))


def _unsure_head(unsure_nerves: int, false_blobs: int, doubtful_nerves: int = 0,
                 n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images, half nerves (presence 0.9, found by the pixel head) and half empty (presence 0.01), except
    `unsure_nerves` nerves whose presence is 0.01 (every gate drops them), the next `doubtful_nerves` at
    presence 0.1 (a 0.05 gate keeps them, 0.5 drops them) and `false_blobs` empty frames where the pixel
    head draws a blob (every gate removes it): the fresh synthetic run's OOF set in small."""
    prob = np.zeros((n, 32, 32), np.float32)
    truth = np.zeros((n, 32, 32), np.uint8)
    presence = np.full(n, 0.01, np.float32)
    nerves = n // 2
    truth[:nerves, 8:18, 8:18] = 1
    prob[:nerves, 8:18, 8:18] = 0.9
    presence[unsure_nerves:nerves] = 0.9
    presence[unsure_nerves:unsure_nerves + doubtful_nerves] = 0.1
    prob[nerves:nerves + false_blobs, 20:28, 20:28] = 0.9
    return prob, truth, presence


def test_a_gate_off_gain_within_the_noise_keeps_the_gate() -> None:
    prob, truth, presence = _unsure_head(unsure_nerves=2, false_blobs=1, doubtful_nerves=10)
    _, chosen, metrics = tune.search(prob, truth, np.arange(40), presence, GATE_OR_NOT)
    assert metrics["dice_no_presence_gate"] == pytest.approx(metrics["dice_presence_gate"] + 1 / 40, abs=1e-5)
    assert chosen.presence == 0.05 and metrics["tuned"] is True  # far better than the default 0.5 ...
    assert metrics["dice_best"] == pytest.approx(metrics["dice_presence_gate"])  # ... and kept over gate-off
    _, chosen, _ = tune.search(prob, truth, np.arange(40), presence, dataclasses.replace(GATE_OR_NOT, min_gain_se=0.0))
    assert chosen.presence == 0.0  # 0: any gain switches the gate off


def test_a_clear_gate_off_gain_switches_the_gate_off() -> None:
    prob, truth, presence = _unsure_head(unsure_nerves=10, false_blobs=0)
    _, chosen, metrics = tune.search(prob, truth, np.arange(40), presence, GATE_OR_NOT)
    assert chosen.presence == 0.0 and metrics["tuned"] is True
    assert metrics["dice_best"] == metrics["dice_no_presence_gate"] == 1.0
    assert metrics["dice_presence_gate"] == pytest.approx(0.75)


def test_a_low_gate_that_ties_gate_off_is_kept() -> None:
    """Presence 0.05 keeps every nerve here and the pixel head draws no blob: a tie, and the tie keeps a gate."""
    prob, truth, presence = _unsure_head(unsure_nerves=0, false_blobs=0, doubtful_nerves=20)
    _, chosen, metrics = tune.search(prob, truth, np.arange(40), presence,
                                     dataclasses.replace(GATE_OR_NOT, min_gain_se=0.0))
    assert chosen.presence == 0.05 and metrics["dice_best"] == 1.0


def test_a_gate_off_best_within_the_noise_of_the_defaults_leaves_the_defaults() -> None:
    """Gate-off clearly beats the best gate (0.05: three nerves at presence 0.01 it drops) but not the untuned
    0.5, which trades ten doubtful nerves (presence 0.1) for nine empty frames with a blob at presence 0.1:
    31/40 against 27/40, a paired gain of 0.100 with a standard error of 0.118. The defaults stay eligible
    across the gate, so the one-standard-error rule keeps them."""
    prob, truth, presence = _unsure_head(unsure_nerves=3, false_blobs=9, doubtful_nerves=10)
    presence[20:29] = 0.1
    grid, chosen, metrics = tune.search(prob, truth, np.arange(40), presence, GATE_OR_NOT)
    dice = dict(zip(grid.presence, grid.dice))
    assert (dice[0.0], dice[0.05], dice[0.5]) == pytest.approx((31 / 40, 28 / 40, 27 / 40))
    assert tune.clearly_beats(np.r_[np.ones(3), np.zeros(37)], np.zeros(40), 1.0)[0]  # gate-off over 0.05
    assert metrics["gain_over_default"] == pytest.approx(0.1, abs=1e-5)
    assert metrics["gain_standard_error"] > 0.1
    assert metrics["dice_grid_best"] == pytest.approx(31 / 40, abs=1e-5)
    assert chosen == Thresholds() and metrics["tuned"] is False
    _, chosen, _ = tune.search(prob, truth, np.arange(40), presence, dataclasses.replace(GATE_OR_NOT, min_gain_se=0.0))
    assert chosen.presence == 0.0
