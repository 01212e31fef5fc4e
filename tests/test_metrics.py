import numpy as np
import pytest

from pipeline.model.metrics import dice_from_counts, dice_per_image, mean_dice


def test_empty_prediction_on_empty_truth_scores_one():
    empty = np.zeros((4, 5), bool)
    assert dice_per_image(empty, empty) == 1.0


def test_one_stray_pixel_on_empty_truth_scores_zero():
    empty = np.zeros((4, 5), bool)
    stray = empty.copy()
    stray[3, 4] = True
    assert dice_per_image(stray, empty) == 0.0
    assert dice_per_image(empty, stray) == 0.0  # and missing a one-pixel nerve too


def test_hand_computed_overlap_and_batch_mean():
    pred = np.zeros((3, 2, 3), bool)
    truth = np.zeros((3, 2, 3), bool)
    pred[0, 0, :2] = True          # 2 predicted pixels
    truth[0, 0, 1:] = True         # 2 true pixels, 1 shared -> 2*1/4
    truth[1, 1, 1] = True          # missed entirely -> 0
    # image 2 empty on both -> 1
    assert dice_per_image(pred, truth).tolist() == [0.5, 0.0, 1.0]
    assert mean_dice(pred, truth) == pytest.approx(0.5)
    assert mean_dice(truth, truth) == 1.0


def test_counts_formula_matches_masks():
    rng = np.random.default_rng(0)
    pred, truth = rng.random((50, 6, 7)) > 0.8, rng.random((50, 6, 7)) > 0.85
    truth[:10] = False
    pred[:5] = False
    counts = dice_from_counts((pred & truth).sum((1, 2)), pred.sum((1, 2)), truth.sum((1, 2)))
    assert np.array_equal(counts, dice_per_image(pred, truth))
    assert dice_from_counts(0, 0, 0) == 1.0 and dice_from_counts(0, 3, 0) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(np.zeros((2, 3)), np.zeros((3, 2)))
