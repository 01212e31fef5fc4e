"""Training-time augmentation and the working-size arrays it runs on, shared by augment and train.

Augmentation runs after resizing to the working size (float images in [0, 1], 0/1 masks):
about 5x cheaper than at 420x580 and the same geometry. Every sample's randomness comes from
(seed, epoch, index), so workers, ranks and resumes see the same augmented data.
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from pipeline.data.artifacts import size_chunks
from pipeline.model.network import preprocess
from pipeline.params import AugmentParams

CHUNK = 64


def build(a: AugmentParams, seed: int) -> A.Compose:
    """The pipeline from params; geometric transforms move image and mask together (mask: nearest)."""
    return A.Compose([
        A.HorizontalFlip(p=a.hflip_p),
        A.VerticalFlip(p=a.vflip_p),
        A.Affine(translate_percent=(-a.shift, a.shift), scale=(1 - a.scale, 1 + a.scale),
                 rotate=(-a.rotate, a.rotate), fill=0, fill_mask=0, p=a.affine_p),
        A.ElasticTransform(alpha=a.elastic_alpha, sigma=a.elastic_sigma, approximate=True, p=a.elastic_p),
        A.RandomBrightnessContrast(brightness_limit=a.brightness, contrast_limit=a.contrast,
                                   p=a.brightness_contrast_p),
        A.RandomGamma(gamma_limit=(a.gamma_low, a.gamma_high), p=a.gamma_p),
        # nnU-Net's image-quality transforms, last so that adding them left the draws above unchanged
        A.GaussNoise(std_range=(0.0, a.noise_std), p=a.noise_p),
        A.GaussianBlur(sigma_limit=(0.5, a.blur_sigma), p=a.blur_p),
        A.Downscale(scale_range=(a.lowres_scale, 1.0),
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}, p=a.lowres_p),
    ], seed=seed)


def reseed(transform: A.Compose, seed: int) -> None:
    """Give the whole pipeline one shared random stream.

    albumentations 2.0.8's `Compose(seed=...)` / `set_random_seed` hands every child its own
    generator with the same seed, so the children's draws coincide (both flips always fire
    together); one shared generator keeps them independent.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers, ranks and resumes."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def working_arrays(images: np.ndarray, masks: np.ndarray, size: tuple[int, int], sizes: np.ndarray | None = None,
                   resize: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """Native uint8 images and 0/1 masks -> float32 images in [0, 1] and 0/1 uint8 masks at `size`.

    Images are resized exactly as `model.preprocess` does at prediction time (stretched, or
    padded with `resize: pad`); masks the same way, then thresholded at 0.5. `sizes` gives each
    image's native (height, width) when images of mixed sizes share one padded array.
    """
    n, (h, w) = len(images), size
    sizes = np.tile(images.shape[1:3], (n, 1)) if sizes is None else np.asarray(sizes).reshape(n, 2)
    xs = np.zeros((n, h, w) + images.shape[3:], np.float32)
    ys = np.zeros((n, h, w), np.uint8)
    for (native_h, native_w), part in size_chunks(sizes[:, 0], sizes[:, 1], CHUNK):
        x = preprocess(np.asarray(images[part])[:, :native_h, :native_w], size, 0.0, 1.0, resize)
        x = x.permute(0, 2, 3, 1)  # channels last
        xs[part] = (x[..., 0] if x.shape[-1] == 1 else x).numpy()
        m = np.asarray(masks[part], dtype=np.uint8)[:, :native_h, :native_w] * np.uint8(255)
        ys[part] = (preprocess(m, size, 0.0, 1.0, resize)[:, 0] >= 0.5).numpy()
    return xs, ys


def apply(transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, mask) pair, deterministic from `seed`."""
    reseed(transform, seed)
    out = transform(image=image, mask=mask)
    return out["image"], out["mask"]
