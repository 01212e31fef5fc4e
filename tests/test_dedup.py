"""Dedup: block-histogram layout and binning, exact cosine distances, thresholds, scope, the stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from pipeline.stages import dedup
from pipeline.data.io import InputError
from pipeline.params import DedupParams, Params, ParamsError, parse_params


def naive_block_histograms(images: np.ndarray, block_size: int, bins: int) -> np.ndarray:
    """The straightforward recipe: one np.histogram per block, blocks in row-major order."""
    height, width = images.shape[1:3]
    return np.array([np.concatenate([
        np.histogram(image[y:y + block_size, x:x + block_size], bins=bins, range=(0, 256))[0]
        for y in range(0, height, block_size) for x in range(0, width, block_size)]) for image in images])


def test_each_block_gets_its_own_histogram() -> None:
    # 2 x 3 blocks of 2 x 2 pixels, each block one distinct constant value.
    values = np.array([[10, 200, 50], [255, 0, 128]], np.uint8)
    image = np.kron(values, np.ones((2, 2), np.uint8))[None]
    features = dedup.block_histograms(image, grid=(2, 3), bins=256, progress=False)
    assert features.shape == (1, 6 * 256)
    per_block = features[0].reshape(6, 256)
    for block, value in enumerate(values.ravel()):
        assert per_block[block, value] == 4
        assert per_block[block].sum() == 4


def test_uint8_values_are_binned_over_the_full_range() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    features = dedup.block_histograms(image, grid=(1, 1), bins=4, progress=False)
    np.testing.assert_array_equal(features[0], [64, 64, 64, 64])   # not just the pixels valued 0 or 1


@pytest.mark.parametrize("shape", [(3, 12, 16), (2, 8, 12, 3)])
def test_histograms_equal_np_histogram_per_block(shape: tuple[int, ...]) -> None:
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    features = dedup.block_histograms(images, grid=(shape[1] // 4, shape[2] // 4), bins=9, progress=False)
    np.testing.assert_array_equal(features, naive_block_histograms(images, 4, 9))


def test_the_420x580_grid_gives_the_features_of_20_px_blocks() -> None:
    """dedup.grid: auto resolves to [21, 29] at 420x580: exactly the former 20-px blocks."""
    images = np.random.default_rng(3).integers(0, 256, (2, 420, 580), dtype=np.uint8)
    np.testing.assert_array_equal(dedup.block_histograms(images, (21, 29), 9, progress=False),
                                  naive_block_histograms(images, 20, 9))


def test_a_grid_fits_any_size_with_blocks_a_pixel_apart() -> None:
    ids = dedup.block_ids(101, 101, (5, 5))
    sides = np.unique(np.bincount(ids.ravel()))
    assert ids.max() == 24 and set(sides.tolist()) <= {20 * 20, 20 * 21, 21 * 21}
    image = np.random.default_rng(4).integers(0, 256, (1, 101, 101), dtype=np.uint8)
    features = dedup.block_histograms(image, (5, 5), 9, progress=False).reshape(25, 9)
    np.testing.assert_array_equal(features.sum(axis=1), np.bincount(ids.ravel()))


def test_images_of_mixed_sizes_each_get_their_own_grid() -> None:
    rng = np.random.default_rng(5)
    small, large = rng.integers(0, 256, (1, 40, 60), dtype=np.uint8), rng.integers(0, 256, (1, 80, 100), dtype=np.uint8)
    canvas = np.zeros((2, 80, 100), np.uint8)
    canvas[0, :40, :60], canvas[1] = small[0], large[0]
    features = dedup.block_histograms(canvas, (4, 5), 9, sizes=np.array([[40, 60], [80, 100]]), progress=False)
    np.testing.assert_array_equal(features[0], dedup.block_histograms(small, (4, 5), 9, progress=False)[0])
    np.testing.assert_array_equal(features[1], dedup.block_histograms(large, (4, 5), 9, progress=False)[0])


def pair_set(rows_a: np.ndarray, rows_b: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(rows_a.tolist(), rows_b.tolist()))


def test_distances_equal_scipy_cdist_across_tiles() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 50, (8, 20))
    features = np.concatenate([base, base + rng.integers(0, 2, base.shape), rng.integers(0, 50, (7, 20))])
    expected = cdist(features.astype(np.float64), features.astype(np.float64), "cosine")
    for threshold in (0.01, 0.05, 2.0):
        rows_a, rows_b, distance = dedup.near_duplicate_pairs(features, threshold, chunk_size=5, progress=False)
        want_a, want_b = np.nonzero(np.triu(expected < threshold, k=1))
        assert pair_set(rows_a, rows_b) == pair_set(want_a, want_b)
        np.testing.assert_allclose(distance, expected[rows_a, rows_b], rtol=0, atol=1e-12)
    assert len(rows_a) == len(features) * (len(features) - 1) // 2


def test_a_pair_needs_a_distance_strictly_below_the_threshold() -> None:
    # cos((1,0,0,0), (1,1,1,1)) = 1/2 exactly: distance exactly 0.5.
    features = np.array([[1, 0, 0, 0], [1, 1, 1, 1]])
    assert len(dedup.near_duplicate_pairs(features, 0.5, progress=False)[0]) == 0
    rows_a, rows_b, distance = dedup.near_duplicate_pairs(features, np.nextafter(0.5, 1.0), progress=False)
    assert pair_set(rows_a, rows_b) == {(0, 1)} and distance[0] == 0.5
    identical = np.array([[3, 4], [3, 4]])
    assert len(dedup.near_duplicate_pairs(identical, 0.0, progress=False)[0]) == 0
    assert dedup.near_duplicate_pairs(identical, 1e-12, progress=False)[2].tolist() == [0.0]


def test_subject_scope_compares_only_frames_of_the_same_subject() -> None:
    features = np.ones((5, 3))
    subjects = np.array([2, 1, 2, 1, 3])
    within = dedup.near_duplicate_pairs(features, 0.01, subjects, chunk_size=1, progress=False)
    assert pair_set(*within[:2]) == {(0, 2), (1, 3)}
    assert len(dedup.near_duplicate_pairs(features, 0.01, None, progress=False)[0]) == 10


def test_mask_dice_and_contradictions() -> None:
    masks = np.zeros((5, 4, 4), np.uint8)
    masks[0, :2] = 1          # 8 px
    masks[1, :2, :2] = 1      # 4 px inside mask 0: Dice 2*4/12
    masks[2, 2:] = 1          # disjoint from mask 0: Dice 0
    has_mask = masks.reshape(5, -1).any(axis=1)
    rows_a, rows_b = np.array([0, 0, 0, 3]), np.array([1, 2, 3, 4])
    dice = dedup.pair_mask_dice(masks, has_mask, rows_a, rows_b, progress=False)
    np.testing.assert_allclose(dice, [2 / 3, 0.0, 0.0, 1.0])
    flags = dedup.contradictory(has_mask[rows_a], has_mask[rows_b], dice, min_pair_dice=0.5)
    assert flags.tolist() == [False, True, True, False]   # overlap kept, disjoint and masked-vs-empty flagged
    assert dedup.contradictory(has_mask[rows_a], has_mask[rows_b], dice, 0.7).tolist() == [True, True, True, False]


def test_groups_are_connected_components() -> None:
    labels = dedup.group_labels(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2] and labels[4] == labels[5]
    assert len(set(labels.tolist())) == 3


def test_stage_finds_the_generator_twins(tiny_interim: Path, tiny_plan: Path, tiny_raw: Path, tmp_path: Path) -> None:
    summary = dedup.run(Params(dedup=DedupParams(grid=(6, 8), gallery_pairs=2)), interim=tiny_interim,
                        plan=tiny_plan, out=tmp_path / "dedup", reports=tmp_path / "reports", progress=False)
    pairs = pd.read_csv(tmp_path / "dedup" / "pairs.csv", dtype={"id_a": str, "id_b": str})
    assert list(pairs.columns) == ["id_a", "id_b", "distance", "has_mask_a", "has_mask_b", "mask_dice",
                                   "contradictory"]
    truth = pd.read_csv(tiny_raw / "truth" / "train_truth.csv", dtype=str, keep_default_na=False)
    twins = {(row.twin_of, row.id) for row in truth.itertuples() if row.twin_of}
    assert twins <= set(zip(pairs.id_a, pairs.id_b))
    corrupted = set(truth.id[truth.corrupted == "True"])
    flagged = pairs[pairs.contradictory]
    assert corrupted <= set(flagged.id_a) | set(flagged.id_b)
    assert (pairs.distance < 0.008).all()
    assert (pairs.id_a.str.split("_").str[0] == pairs.id_b.str.split("_").str[0]).all()
    groups = pd.read_csv(tmp_path / "dedup" / "groups.csv", dtype={"id": str})
    assert len(groups) == summary["images"] == 30
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["pairs"] == len(pairs)
    assert summary["contradictory_pairs"] == len(flagged)
    assert (tmp_path / "reports" / "gallery.png").stat().st_size > 0


def test_stage_names_the_missing_input(tiny_plan: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest.csv: not found"):
        dedup.run(Params(), interim=tmp_path, plan=tiny_plan, out=tmp_path / "out", reports=tmp_path / "reports")


@pytest.mark.parametrize("section, key, message", [
    ({"threshold": -0.1}, "threshold", ">= 0.0"),
    ({"grid": [0, 3]}, r"grid\[0\]", ">= 1"),
    ({"bins": 300}, "bins", "<= 256"),
    ({"scope": "patient"}, "scope", "not one of"),
    ({"min_pair_dice": 1.5}, "min_pair_dice", "<= 1.0"),
])
def test_bad_dedup_params_name_the_key(section: dict, key: str, message: str) -> None:
    with pytest.raises(ParamsError, match=f"dedup.{key}.*{message}"):
        parse_params({"dedup": section})
