"""Benchmark: the dedup stage's near-duplicate search vs the straightforward recipe.

Generates full-size 420x580 synthetic ultrasound frames (default 5,000; subjects from
`pipeline.stages.synth`, cheap per-frame variants: shift + pooled speckle, and near-identical
twins of the previous frame), then finds all pairs with cosine distance < 0.008 over
the whole set (global scope, as `pdist` compares everything) two ways:
  naive: per-block `np.histogram` loop, `scipy.spatial.distance.pdist(..., "cosine")`,
         `squareform`, threshold (the recipe of the public kernels);
  ours:  `pipeline.stages.dedup.block_histograms` + `near_duplicate_pairs`.
Checks both find the same pairs and prints the time and peak memory of each, the speedup,
and the cost of merely reading the images (.npy from the page cache; LZW TIFF decoding as
in the competition files, timed on a sample and scaled).

Each method runs in its own forked process; peak memory is its anonymous resident memory
(RssAnon) above the level at its start, sampled every 5 ms. The images are a memory-mapped
file, so their pages are file-backed and not counted for either method.

    python benchmarks/bench_dedup.py [--images 5000] [--workdir /tmp/bench_dedup]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import pdist, squareform
from tqdm import tqdm

from pipeline.stages import dedup, synth
from pipeline.data.io import write_tiff

SHAPE = (420, 580)
BLOCK_SIZE, BINS, THRESHOLD = 20, 9, 0.008
FRAMES_PER_SUBJECT = 100
KEY_FRAMES = 6           # full renders per subject; other frames are cheap variants of them
SPECKLE_POOL = 16        # speckle fields, rolled to a random offset for each frame
TWIN_PROBABILITY = 0.35  # as in pipeline.stages.synth
TIFF_SAMPLE = 200


def _speckle(rng: np.random.Generator) -> np.ndarray:
    grain = ndimage.gaussian_filter(rng.gamma(2.0, 0.5, SHAPE).astype(np.float32), 0.8)
    return grain / grain.mean()


def make_images(path: Path, n_images: int, seed: int = 0) -> int:
    """Write n_images frames to a .npy file; returns how many are twins of their previous frame."""
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_images, *SHAPE))
    speckles = [_speckle(rng) for _ in range(SPECKLE_POOL)]
    no_speckle = np.ones(SHAPE, np.float32)
    twins = 0
    for start in tqdm(range(0, n_images, FRAMES_PER_SUBJECT), desc="generate subjects", unit="subject"):
        anatomy = synth.make_anatomy(rng, SHAPE)
        keys = [synth.render(anatomy, rng, tuple(rng.normal(0, 10, 2)), bool(rng.random() < 0.5),
                             no_speckle)[0].astype(np.float32) for _ in range(KEY_FRAMES)]
        for i in range(start, min(start + FRAMES_PER_SUBJECT, n_images)):
            if i > start and rng.random() < TWIN_PROBABILITY:
                images[i] = np.clip(images[i - 1] + rng.normal(0, 1.5, SHAPE), 0, 255)
                twins += 1
                continue
            scene = np.roll(keys[rng.integers(KEY_FRAMES)], tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
            grain = np.roll(speckles[rng.integers(SPECKLE_POOL)], (rng.integers(SHAPE[0]), rng.integers(SHAPE[1])),
                            axis=(0, 1))
            images[i] = np.clip(scene * grain * rng.uniform(0.92, 1.08), 0, 255)
    images.flush()
    return twins


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


class PeakMemory:
    """Peak anonymous resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss_anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon_kib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon_kib())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 1024


def _phases(clock: list[float]) -> dict[str, float]:
    return {"histograms": clock[1] - clock[0], "pairs": clock[2] - clock[1], "total": clock[2] - clock[0]}


def _measure(histograms: Callable[[], np.ndarray],
             pairs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Wall and CPU seconds (all threads) of both phases, peak memory, and the pairs found."""
    with PeakMemory() as memory:
        wall, cpu = [time.perf_counter()], [time.process_time()]
        features = histograms()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        rows_a, rows_b = pairs(features)
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
    return {"wall": _phases(wall), "cpu": _phases(cpu), "peak_mib": memory.mib,
            "found": set(zip(rows_a.tolist(), rows_b.tolist()))}


def naive(images: np.ndarray) -> dict[str, Any]:
    """The straightforward recipe: a Python loop over blocks, then the full N x N distance matrix."""
    height, width = images.shape[1:]

    def histograms() -> np.ndarray:
        return np.array([np.concatenate([
            np.histogram(image[y:y + BLOCK_SIZE, x:x + BLOCK_SIZE], bins=BINS, range=(0, 256))[0]
            for y in range(0, height, BLOCK_SIZE) for x in range(0, width, BLOCK_SIZE)])
            for image in tqdm(images, desc="naive histograms", unit="img", mininterval=2.0)])

    def pairs(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances = squareform(pdist(features, "cosine"))
        return np.nonzero(np.triu(distances < THRESHOLD, k=1))

    return _measure(histograms, pairs)


def ours(images: np.ndarray) -> dict[str, Any]:
    return _measure(lambda: dedup.block_histograms(images, BLOCK_SIZE, BINS),
                    lambda features: dedup.near_duplicate_pairs(features, THRESHOLD)[:2])


def reading(images: np.ndarray, workdir: Path) -> dict[str, Any]:
    """Cost of only getting the pixels: a full pass over the .npy, and LZW TIFF decoding (sampled)."""
    t0 = time.perf_counter()
    checksum = sum(int(np.asarray(images[s:s + 256]).max()) for s in range(0, len(images), 256))
    npy = time.perf_counter() - t0
    sample = min(TIFF_SAMPLE, len(images))
    paths = [workdir / f"{k}.tif" for k in range(sample)]
    for path, image in zip(paths, images):
        write_tiff(path, image)
    t0 = time.perf_counter()
    for path in paths:
        with Image.open(path) as tiff:
            np.asarray(tiff)
    tiff_per_image = (time.perf_counter() - t0) / sample
    return {"npy": npy, "tiff": tiff_per_image * len(images), "tiff_sample": sample, "checksum": checksum}


def _in_child(func: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run in a fresh forked process, so one method's freed-but-kept heap does not hide another's peak."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(func, args)


def _open(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _run_naive(path: Path) -> dict[str, Any]:
    return naive(_open(path))


def _run_ours(path: Path) -> dict[str, Any]:
    return ours(_open(path))


def _run_reading(path: Path, workdir: Path) -> dict[str, Any]:
    return reading(_open(path), workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="number of 420x580 frames (default 5000)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dedup."))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        path = workdir / "images.npy"
        twins = make_images(path, args.images)
        print(f"{args.images} images of {SHAPE[0]}x{SHAPE[1]} ({args.images * SHAPE[0] * SHAPE[1] / 2**30:.2f} GiB), "
              f"{twins} planted twins; blocks {BLOCK_SIZE}px x {BINS} bins = "
              f"{SHAPE[0] // BLOCK_SIZE * (SHAPE[1] // BLOCK_SIZE) * BINS}-d features; global scope, "
              f"cosine distance < {THRESHOLD}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores",
              flush=True)
        read = _in_child(_run_reading, path, workdir)
        fast = _in_child(_run_ours, path)
        slow = _in_child(_run_naive, path)
        print(f"\n{'':29}{'histograms s':>13}{'pairs s':>9}{'total s':>9}{'CPU s':>8}{'peak MiB':>10}")
        for name, result in (("naive (np.histogram + pdist)", slow), ("ours (bincount + tiled GEMM)", fast)):
            wall = result["wall"]
            print(f"{name:29}{wall['histograms']:13.2f}{wall['pairs']:9.2f}{wall['total']:9.2f}"
                  f"{result['cpu']['total']:8.2f}{result['peak_mib']:10.0f}")
        ratio = {phase: slow["wall"][phase] / fast["wall"][phase] for phase in ("histograms", "pairs", "total")}
        print(f"\nspeedup end to end: {ratio['total']:.1f}x wall, "
              f"{slow['cpu']['total'] / fast['cpu']['total']:.1f}x CPU time "
              f"(wall: histograms {ratio['histograms']:.1f}x, pairs {ratio['pairs']:.1f}x)")
        print(f"reading only: {read['npy']:.2f} s for the .npy (page cache); "
              f"{read['tiff']:.1f} s to decode them as LZW TIFF (Pillow, scaled from {read['tiff_sample']})")
        same = slow["found"] == fast["found"]
        print(f"pairs: naive {len(slow['found'])}, ours {len(fast['found'])}, identical: {same}; "
              f"load average now {os.getloadavg()[0]:.2f}")
        if not same:
            raise SystemExit("the two methods found different pairs")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
