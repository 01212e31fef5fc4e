import json

import numpy as np
import pytest

from pipeline.io import InputError
from pipeline.artifacts import Thresholds, read_thresholds
from pipeline.postprocess import apply, binarize


def test_pixel_threshold_is_strict():
    assert binarize(np.array([0.49, 0.5, 0.51], np.float32), 0.5).tolist() == [False, False, True]


def test_gates_make_whole_masks_empty():
    prob = np.zeros((4, 3, 3), np.float32)
    prob[:, :2, :2] = 0.9                      # every image: a 4-pixel blob
    prob[3, 2, 2] = 0.9                        # image 3: 5 pixels
    presence = np.array([0.9, 0.2, 0.9, 0.9], np.float32)
    out = apply(prob, presence, Thresholds(pixel=0.5, presence=0.5, min_area=5))
    assert out.sum(axis=(1, 2)).tolist() == [0, 0, 0, 5]  # 0, 2: too small; 1: gated by presence
    out = apply(prob, presence, Thresholds(pixel=0.5, presence=0.5, min_area=4))
    assert out.sum(axis=(1, 2)).tolist() == [4, 0, 4, 5]  # area equal to min_area is kept
    out = apply(prob, presence, Thresholds(pixel=0.5, presence=0.2, min_area=0))
    assert out.sum(axis=(1, 2)).tolist() == [4, 4, 4, 5]  # presence equal to the threshold is kept
    out = apply(prob, np.zeros(4, np.float32), Thresholds(pixel=0.5, presence=0.0, min_area=0))
    assert out.sum(axis=(1, 2)).tolist() == [4, 4, 4, 5]  # presence 0 switches the gate off
    out = apply(prob, presence, Thresholds(pixel=0.95, presence=0.0, min_area=0))
    assert not out.any()
    assert (prob[:, :2, :2] == np.float32(0.9)).all()      # input untouched


def test_apply_matches_a_per_image_loop():
    rng = np.random.default_rng(1)
    prob = rng.random((30, 8, 9)).astype(np.float32)
    presence = rng.random(30).astype(np.float32)
    t = Thresholds(pixel=0.6, presence=0.4, min_area=30)
    expected = []
    for p, s in zip(prob, presence):
        m = p > t.pixel
        expected.append(m if s >= t.presence and m.sum() >= t.min_area else np.zeros_like(m))
    assert np.array_equal(apply(prob, presence, t), np.stack(expected))


def test_read_thresholds_round_trip(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"pixel": 0.4, "presence": 1, "min_area": 200}))
    assert read_thresholds(path) == Thresholds(0.4, 1.0, 200)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{", "not valid JSON"),
    ('{"pixel": 0.5, "presence": 0.5}', "expected exactly the keys"),
    ('{"pixel": 0.5, "presence": 0.5, "min_area": 0, "x": 1}', "expected exactly the keys"),
    ('[0.5, 0.5, 0]', "expected exactly the keys"),
    ('{"pixel": 1.5, "presence": 0.5, "min_area": 0}', "pixel must be a number in"),
    ('{"pixel": NaN, "presence": 0.5, "min_area": 0}', "pixel must be a number in"),
    ('{"pixel": 0.5, "presence": "high", "min_area": 0}', "presence must be a number"),
    ('{"pixel": 0.5, "presence": true, "min_area": 0}', "presence must be a number"),
    ('{"pixel": 0.5, "presence": 0.5, "min_area": 2.5}', "min_area must be a non-negative integer"),
    ('{"pixel": 0.5, "presence": 0.5, "min_area": -1}', "min_area must be a non-negative integer"),
])
def test_read_thresholds_rejects(tmp_path, content, message):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        read_thresholds(path)
    assert str(path) in str(info.value)
