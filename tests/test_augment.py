"""The augment stage: serialization round trip, independent random draws, image/mask alignment."""
from __future__ import annotations

import dataclasses
import json

import albumentations as A
import numpy as np

from pipeline.data import artifacts
from pipeline.stages import augment
from pipeline.model import transforms
from pipeline.params import AugmentParams, Params, TrainParams

GEOMETRY = AugmentParams(hflip_p=0.5, vflip_p=0.5, affine_p=1.0, shift=0.1, scale=0.2, rotate=30.0,
                         elastic_p=1.0, brightness_contrast_p=0.0, gamma_p=0.0)


def _blob(h: int = 64, w: int = 80) -> np.ndarray:
    """An off-centre, asymmetric mask, so every flip and shift moves it."""
    yy, xx = np.mgrid[:h, :w]
    return (((yy - 20) / 9) ** 2 + ((xx - 28) / 15) ** 2 <= 1).astype(np.uint8)


def test_saved_pipeline_round_trips_and_uses_affine(tmp_path) -> None:
    path = tmp_path / "augment.json"
    artifacts.save_augmentation(transforms.build(AugmentParams(), seed=3), path)
    names = [t["__class_fullname__"] for t in json.loads(path.read_text())["transform"]["transforms"]]
    assert "Affine" in names and "ShiftScaleRotate" not in names
    loaded = artifacts.load_augmentation(path)
    image = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    mask = _blob()
    a = transforms.apply(transforms.build(AugmentParams(), seed=3), image, mask, seed=11)
    b = transforms.apply(loaded, image, mask, seed=11)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_same_seed_same_sample_and_transforms_draw_independently() -> None:
    transform = transforms.build(dataclasses.replace(GEOMETRY, affine_p=0.0, elastic_p=0.0), seed=0)
    mask = _blob()
    outcomes = set()
    for s in range(40):
        _, m = transforms.apply(transform, mask.astype(np.float32), mask, seed=s)
        _, again = transforms.apply(transform, mask.astype(np.float32), mask, seed=s)
        assert np.array_equal(m, again)
        outcomes.add((np.array_equal(m, mask[:, ::-1]), np.array_equal(m, mask[::-1]),
                      np.array_equal(m, mask[::-1, ::-1])))
    # Compose(seed=...) alone would flip both axes or neither; a shared stream gives every combination
    assert {(True, False, False), (False, True, False)} <= outcomes


def test_augmentation_keeps_image_and_mask_aligned() -> None:
    transform = transforms.build(GEOMETRY, seed=0)
    mask = _blob()
    image = mask.astype(np.float32)  # the image *is* the mask: any misalignment shows
    moved = 0
    for s in range(30):
        img, m = transforms.apply(transform, image, mask, seed=s)
        assert img.shape == m.shape == mask.shape and set(np.unique(m)) <= {0, 1}
        agree = ((img > 0.5) == (m > 0)).mean()
        overlap = ((img > 0.5) & (m > 0)).sum() / max(1, ((img > 0.5) | (m > 0)).sum())
        assert agree > 0.99 and overlap > 0.85, (s, agree, overlap)
        moved += not np.array_equal(m, mask)
    assert moved >= 25  # the geometry really was applied


def test_working_arrays_resize_images_like_preprocess_and_threshold_masks() -> None:
    images = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (2, 84, 1))
    masks = np.zeros((2, 84, 120), np.uint8)
    masks[1, 20:60, 30:90] = 1
    x, y = transforms.working_arrays(images, masks, (42, 60))
    assert x.shape == y.shape == (2, 42, 60) and x.dtype == np.float32 and y.dtype == np.uint8
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y[0].sum() == 0 and y[1, 10:30, 15:45].all() and y[1].sum() == 20 * 30


def test_stage_writes_pipeline_and_preview(tiny_interim, tiny_plan, tmp_path) -> None:
    params = Params(seed=7, augment=AugmentParams(preview_samples=4), train=TrainParams(height=48, width=64))
    summary = augment.run(params, interim=tiny_interim, plan=tiny_plan, out=tmp_path / "a.json",
                          preview=tmp_path / "p" / "preview.png")
    assert isinstance(artifacts.load_augmentation(tmp_path / "a.json"), A.Compose)
    assert (tmp_path / "p" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["preview_samples"] == 4


def test_image_quality_transforms_change_the_image_never_the_mask(tmp_path) -> None:
    """nnU-Net's noise, blur and low-resolution simulation (`augment.noise_p`, `blur_p`, `lowres_p`): each
    alone, at p=1, alters the image, leaves the mask as it was, and survives the saved pipeline's round trip."""
    image = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    mask = _blob()
    off = dict(hflip_p=0.0, affine_p=0.0, brightness_contrast_p=0.0, gamma_p=0.0)
    for key in ("noise_p", "blur_p", "lowres_p"):
        params = dataclasses.replace(AugmentParams(), **off, **{key: 1.0})
        transform = transforms.build(params, seed=0)
        artifacts.save_augmentation(transform, tmp_path / f"{key}.json")
        loaded = artifacts.load_augmentation(tmp_path / f"{key}.json")
        for s in range(5):
            img, m = transforms.apply(transform, image, mask, seed=s)
            again, _ = transforms.apply(loaded, image, mask, seed=s)
            assert np.array_equal(m, mask) and np.array_equal(img, again), key
            assert img.dtype == np.float32 and np.abs(img - image).mean() > 1e-4, key
    untouched, _ = transforms.apply(transforms.build(dataclasses.replace(AugmentParams(), **off), seed=0),
                                    image, mask, seed=1)
    assert np.array_equal(untouched, image)  # at p=0 (the default) they do nothing
