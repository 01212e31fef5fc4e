import json

import numpy as np
import pytest

from pipeline.data.io import InputError
from pipeline.data.artifacts import Thresholds, read_thresholds
from pipeline.model.postprocess import apply, binarize


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


def _two_blobs() -> np.ndarray:
    """Image 0: a 12-pixel blob and a 4-pixel one; image 1: a 2x2 blob and a diagonal 3-pixel line
    (one 8-connected component); image 2: empty."""
    prob = np.zeros((3, 8, 10), np.float32)
    prob[0, 1:4, 1:5] = 0.9    # 12 pixels
    prob[0, 5:7, 7:9] = 0.8    # 4 pixels, apart
    prob[1, 0:2, 0:2] = 0.9    # 4 pixels
    prob[1, [4, 5, 6], [5, 6, 7]] = 0.9  # 3 pixels touching only diagonally: one component
    return prob


def test_keep_largest_keeps_the_larger_of_two_blobs():
    prob = _two_blobs()
    out = apply(prob, np.ones(3, np.float32), Thresholds(pixel=0.5, presence=0.0, min_area=0, keep_largest=True))
    expected = prob > 0.5
    expected[0, 5:7, 7:9] = False                 # the small blob goes, the large one stays whole
    expected[1, [4, 5, 6], [5, 6, 7]] = False     # 4 pixels beat the diagonal 3: it is one component, not three
    assert np.array_equal(out, expected)
    assert np.array_equal(apply(prob, np.ones(3, np.float32), Thresholds(0.5, 0.0, 0)), prob > 0.5)  # off: untouched


def test_keep_largest_tie_keeps_the_first_in_raster_order():
    prob = np.zeros((1, 5, 5), np.float32)
    prob[0, 3, 3:5] = prob[0, 0, 0:2] = 0.9
    out = apply(prob, np.ones(1, np.float32), Thresholds(0.5, 0.0, 0, keep_largest=True))
    assert out[0].sum() == 2 and out[0, 0, 0:2].all()


def test_min_component_removes_small_blobs_as_a_fraction_of_the_image():
    prob = _two_blobs()
    ones = np.ones(3, np.float32)
    # 80 pixels per image: 0.05 -> components of >= 4 pixels stay, 0.051 -> >= 4.08 pixels
    out = apply(prob, ones, Thresholds(0.5, 0.0, 0, min_component=0.05))
    assert out.sum(axis=(1, 2)).tolist() == [16, 4, 0]
    assert out[1, 0:2, 0:2].all() and not out[1, 4:].any()  # the 3-pixel diagonal goes, the 2x2 stays
    out = apply(prob, ones, Thresholds(0.5, 0.0, 0, min_component=0.051))
    assert out.sum(axis=(1, 2)).tolist() == [12, 0, 0] and out[0, 1:4, 1:5].all()
    # the min_area gate sees the area after the component rules: 12 pixels left, 13 needed
    assert not apply(prob, ones, Thresholds(0.5, 0.0, 13, min_component=0.051)).any()
    assert apply(prob, ones, Thresholds(0.5, 0.0, 13)).sum() == 16  # without it, image 0's 16 >= 13 passes


def test_apply_with_components_matches_a_per_image_loop():
    from scipy import ndimage
    rng = np.random.default_rng(2)
    prob = rng.random((40, 12, 15)).astype(np.float32)
    presence = rng.random(40).astype(np.float32)
    for t in (Thresholds(0.7, 0.3, 5, keep_largest=True), Thresholds(0.6, 0.0, 0, min_component=0.02),
              Thresholds(0.6, 0.2, 3, keep_largest=True, min_component=0.03)):
        expected = []
        for p, s in zip(prob, presence):
            labels, n = ndimage.label(p > t.pixel, np.ones((3, 3)))
            sizes = np.array([(labels == k).sum() for k in range(1, n + 1)])
            keep = [k + 1 for k in range(n) if sizes[k] >= t.min_component * 12 * 15
                    and (not t.keep_largest or k == np.argmax(sizes))]
            m = np.isin(labels, keep)
            expected.append(m if s >= t.presence and m.sum() >= t.min_area else np.zeros_like(m))
        assert np.array_equal(apply(prob, presence, t), np.stack(expected)), t


def test_old_thresholds_file_without_component_keys_means_components_off(tmp_path):
    """A thresholds.json written before the component rules: read as off, so masks are as before."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"pixel": 0.5, "presence": 0.2, "min_area": 3}))
    t = read_thresholds(path)
    assert t == Thresholds(0.5, 0.2, 3, keep_largest=False, min_component=0.0)
    prob = _two_blobs()
    presence = np.array([0.9, 0.1, 0.9], np.float32)
    masks = prob > 0.5
    masks[1] = False  # the presence gate; nothing else changes
    assert np.array_equal(apply(prob, presence, t), masks)


def test_read_thresholds_round_trip_with_components(tmp_path):
    path = tmp_path / "t.json"
    t = Thresholds(0.4, 0.6, 200, keep_largest=True, min_component=0.001)
    path.write_text(json.dumps(t.to_dict()))
    assert read_thresholds(path) == t


@pytest.mark.parametrize("extra, message", [
    ({"keep_largest": 1}, "keep_largest must be true or false"),
    ({"keep_largest": "yes"}, "keep_largest must be true or false"),
    ({"min_component": 1.5}, "min_component must be a number in"),
    ({"min_component": True}, "min_component must be a number in"),
    ({"min_component": -0.1}, "min_component must be a number in"),
    ({"keep_biggest": True}, "expected exactly the keys pixel, presence, min_area .and optionally keep_largest"),
])
def test_read_thresholds_rejects_bad_component_keys(tmp_path, extra, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"pixel": 0.5, "presence": 0.5, "min_area": 0} | extra))
    with pytest.raises(InputError, match=message):
        read_thresholds(path)
