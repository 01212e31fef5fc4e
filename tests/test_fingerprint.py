"""The dataset fingerprint: known answers on small synthetic sets, JSON-able, deterministic, fast."""
import json
import time

import numpy as np
import pytest

from pipeline.data.fingerprint import fingerprint


def _image(shape, value=120, border=0):
    """A bright image with a black frame of `border` px on every side."""
    a = np.full(shape, value, np.uint8)
    if border:
        a[:border], a[-border:], a[:, :border], a[:, -border:] = 0, 0, 0, 0
    return a


def _fp(images, masks=None, modes=None, groups=None, group_kind="image", **kw):
    masks = masks if masks is not None else [np.zeros(a.shape[:2], bool) for a in images]
    return fingerprint(images=images, masks=masks, modes=modes or ["L"] * len(images),
                       groups=groups if groups is not None else list(range(len(images))), group_kind=group_kind, **kw)


def test_sizes_channels_modes_and_groups():
    images = [_image((40, 60)), _image((40, 60)), _image((40, 60)), _image((30, 30)),
              np.stack([_image((50, 100))] * 3, axis=2)]
    f = _fp(images, modes=["L", "L", "RGB", "RGB", "RGB"], groups=["a", "a", "b", "b", "c"], group_kind="subject")
    assert f["images"] == 5
    assert f["sizes"] == [{"height": 40, "width": 60, "count": 3}, {"height": 30, "width": 30, "count": 1},
                          {"height": 50, "width": 100, "count": 1}]
    assert (f["median_height"], f["median_width"]) == (40.0, 60.0)
    assert f["median_aspect"] == round(40 / 60, 4)                 # h/w of 2/3, 2/3, 2/3, 1, 1/2
    assert f["channels"] == {"1": 4, "3": 1} and f["modes"] == {"L": 2, "RGB": 3}
    assert (f["groups"], f["group_kind"], f["one_image_per_group"]) == (3, "subject", False)
    assert f["median_images_per_group"] == 2.0
    json.dumps(f)  # JSON-able as it is

    one_each = _fp(images[:2])
    assert (one_each["groups"], one_each["group_kind"], one_each["one_image_per_group"]) == (2, "image", True)


def test_letterbox_border_of_ten_pixels():
    framed = [_image((60, 80), border=10) for _ in range(3)]
    f = _fp(framed + [_image((60, 80))])
    assert f["letterbox"]["fraction"] == 0.75
    assert f["letterbox"]["border_px"] == {"top": 10.0, "bottom": 10.0, "left": 10.0, "right": 10.0}
    assert f["letterbox"]["side_fraction"] == {"top": 0.75, "bottom": 0.75, "left": 0.75, "right": 0.75}
    # top/bottom only (a wide frame letterboxed into a taller one), values up to `dark` still count as border
    a = _image((60, 80))
    a[:12], a[-7:] = 8, 3
    f = _fp([a])
    assert f["letterbox"]["border_px"] == {"top": 12.0, "bottom": 7.0, "left": 0.0, "right": 0.0}
    assert _fp([a], dark=5)["letterbox"]["border_px"] == {"top": 0.0, "bottom": 7.0, "left": 0.0, "right": 0.0}
    # a colour image: the border is dark in every channel
    rgb = np.stack([_image((60, 80), border=10)] * 3, axis=2)
    rgb[20, 2, 1] = 200   # one bright pixel in the left border's green channel
    assert _fp([rgb])["letterbox"]["border_px"]["left"] == 2.0
    # no frame, a one-line edge artefact, a blank image: no letterbox
    line = _image((60, 80))
    line[0] = 0
    none = _fp([_image((60, 80)), line, np.zeros((60, 80), np.uint8)])["letterbox"]
    assert none["fraction"] == 0.0 and none["border_px"] is None


def test_masks_empty_fraction_area_and_components():
    shape = (20, 50)
    two = np.zeros(shape, bool)
    two[2:6, 2:7], two[10:14, 30:40] = True, True                # 2 components, 20 + 40 = 60 px
    diagonal = np.zeros(shape, bool)
    diagonal[5, 5], diagonal[6, 6] = True, True                  # touching diagonally: one component
    one = np.zeros(shape, bool)
    one[:10, :10] = True                                         # 100 px
    empty = np.zeros(shape, bool)
    masks = [two, diagonal, one, empty, empty]
    f = _fp([_image(shape) for _ in masks], masks=masks)
    assert f["empty_fraction"] == 0.4
    area = np.array([60, 2, 100]) / 1000
    assert f["mask_area_fraction"] == {f"q{q}": round(float(np.percentile(area, q)), 6) for q in (5, 25, 50, 75, 95)}
    assert f["mask_area_fraction"]["q50"] == 0.06
    assert f["components"]["q50"] == 1.0 and f["components"]["q95"] == pytest.approx(1.9)
    assert f["multi_component_fraction"] == round(1 / 3, 4)
    nothing = _fp([_image(shape)], masks=[empty])
    assert nothing["empty_fraction"] == 1.0
    assert nothing["mask_area_fraction"] is None and nothing["components"] is None


def test_mixed_mask_sizes_use_each_images_own_area():
    a, b = np.zeros((10, 10), bool), np.zeros((20, 50), bool)
    a[:5], b[:10] = True, True                                   # half of each
    f = _fp([_image((10, 10)), _image((20, 50))], masks=[a, b])
    assert f["mask_area_fraction"]["q5"] == f["mask_area_fraction"]["q95"] == 0.5


def test_intensity_percentiles_exact_when_every_pixel_is_sampled_and_deterministic():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (30, 40), dtype=np.uint8) for _ in range(5)]
    every = np.concatenate([a.ravel() for a in images])
    f = _fp(images, samples=10 ** 6)
    assert f["intensity"] == {f"p{p:g}": round(float(np.percentile(every, p)), 2)
                              for p in (0.5, 5, 50, 95, 99.5)}
    ramp = [np.tile(np.arange(256, dtype=np.uint8), (64, 1))]   # uniform 0..255
    g = _fp(ramp, samples=20_000)
    assert g == _fp(ramp, samples=20_000)                      # same seed, same sample
    assert abs(g["intensity"]["p50"] - 127.5) < 5 and g["intensity"]["p0.5"] < 5 and g["intensity"]["p99.5"] > 250


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="no images"):
        _fp([])
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        _fp([_image((4, 4))] * 2, masks=[np.zeros((4, 4), bool)])


def test_fast_on_5000_kaggle_size_images():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 256, (420, 580), dtype=np.uint8) for _ in range(4)]
    nerve = np.zeros((420, 580), bool)
    nerve[150:220, 200:320] = True
    images = [base[k % 4] for k in range(5000)]
    masks = [nerve if k % 5 < 2 else np.zeros_like(nerve) for k in range(5000)]
    start = time.perf_counter()
    f = _fp(images, masks=masks, groups=[k // 100 for k in range(5000)], group_kind="subject")
    elapsed = time.perf_counter() - start
    assert f["images"] == 5000 and f["empty_fraction"] == 0.6 and f["groups"] == 50
    assert elapsed < 10, f"{elapsed:.1f} s"   # about 1 s here
