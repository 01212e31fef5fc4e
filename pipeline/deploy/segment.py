"""`python -m pipeline segment`: an exported bundle applied to any folder of images, with ONNX Runtime.

Outside the DAG and without torch: images are read as the load stage reads them
(`pipeline.data.io.read_image`), brought to the working size in numpy (`pipeline.deploy.resize`),
run through the bundle's `model.onnx` (the fold ensemble and its flip views, CUDA when ONNX
Runtime has it, else the CPU), mapped back to each image's native size and thresholded by the
same rules as predict (`pipeline.model.postprocess.apply`). Writes, into `out` (one folder,
replaced as a whole, so it appears complete or not at all):

- `masks/ID.png`: 0/255 at the image's native size;
- `overlays/ID.png`: the image with the mask's outline in red (as the report draws predictions);
- `submission.csv`: the submission format of the bundle (`pipeline.data.rle`), validated.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from pipeline.data import rle
from pipeline.data.artifacts import check_probabilities
from pipeline.data.ids import id_sort_key
from pipeline.data.io import InputError, atomic_dir, read_image, write_png
from pipeline.data.layouts import list_test_images
from pipeline.deploy.bundle import INPUT, MASK_OUTPUT, PRESENCE_OUTPUT, Bundle, BundleError, read_bundle
from pipeline.deploy.resize import preprocess, to_native
from pipeline.model.postprocess import apply
from pipeline.params import DataParams

OUTLINE = (255, 0, 0)  # red, the report's colour for predicted masks


def providers() -> list[str]:
    """ONNX Runtime's CUDA provider when this install has it, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


def session_options(threads: int = 0) -> Any:
    """ONNX Runtime's options for the bundle's graph; `threads` 0: ONNX Runtime's default.

    Without the CPU memory arena and the memory-pattern planner: on the default run's ensemble at
    batch 32 they raised the peak memory from about 1.3 to 1.9 GiB and ran no faster."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: the CUDA provider's fallback notices are not errors here
    return options


def open_session(bundle: Bundle, threads: int = 0) -> Any:
    """An ONNX Runtime session on the bundle's (already verified) model."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(bundle.model), session_options(threads), providers=providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BundleError(f"{bundle.model}: ONNX Runtime cannot load it ({str(exc).strip()[:300]})") from None


def predict(session: Any, bundle: Bundle, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """uint8 images of any sizes -> (per image, float32 (H,W) mask probabilities at its native size; (N,)
    presence probabilities)."""
    batch = np.stack([preprocess(image, bundle.size, bundle.resize) for image in images])
    mask, presence = session.run([MASK_OUTPUT, PRESENCE_OUTPUT], {INPUT: batch})
    native = [to_native(m[0], image.shape[:2], bundle.resize) for m, image in zip(mask, images)]
    return native, np.asarray(presence, np.float32).reshape(-1)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8: the image (gray shown as gray) with the mask's outline drawn in red; the outline is
    the mask's border pixels, about 1/200 of the image's shorter side thick (at least one pixel)."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
    if mask.any():
        width = max(1, round(min(mask.shape) / 200))
        edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
        rgb[edge] = OUTLINE
    return rgb


def _batches(paths: list[tuple[str, Path]], channels: str, size: int
             ) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    for k in range(0, len(paths), size):
        part = paths[k:k + size]
        yield [i for i, _ in part], [read_image(path, channels)[0] for _, path in part]


def run(*, bundle: str | Path, images: str | Path, out: str | Path, batch_size: int = 8,
        threads: int = 0) -> dict[str, Any]:
    """Segment every image in `images` with the bundle; write masks, overlays and submission.csv into `out`
    (replaced as a whole). Returns the summary the command prints."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be a positive whole number, got {batch_size!r}")
    started = time.perf_counter()
    b = read_bundle(bundle)
    listed = list_test_images(images, DataParams(layout="folders"))  # every problem at once, before any work
    session = open_session(b, threads)
    shapes: dict[str, tuple[int, int]] = {}
    encoded: dict[str, str] = {}
    with atomic_dir(out) as tmp, tqdm(total=len(listed), desc="segment", unit="image", mininterval=1.0) as bar:
        for ids, arrays in _batches(listed, b.channels, batch_size):
            native, presence = predict(session, b, arrays)
            for image_id, image, prob, p in zip(ids, arrays, native, presence):
                check_probabilities(prob[None], f"{b.model}: mask probabilities", [image_id])
                check_probabilities(p[None], f"{b.model}: presence probabilities", [image_id])
                mask = apply(prob[None], p[None], b.thresholds)[0]
                shapes[image_id] = mask.shape
                encoded[image_id] = rle.encode(mask, b.rle_order, b.rle_start)
                write_png(tmp / "masks" / f"{image_id}.png", mask.astype(np.uint8) * 255)
                write_png(tmp / "overlays" / f"{image_id}.png", overlay(image, mask))
            bar.update(len(ids))
        rows = sorted(encoded.items(), key=lambda kv: id_sort_key(kv[0]))
        csv = tmp / "submission.csv"
        rle.write_submission(csv, rows, b.submission_columns)
        rle.validate_submission(csv, list(encoded), next(iter(shapes.values())), columns=b.submission_columns,
                                start=b.rle_start, numeric_ids=False, shapes=shapes)
    empty = sum(r == "" for _, r in rows)
    import onnxruntime as ort

    return {"images": len(rows), "predicted_empty": empty, "predicted_empty_fraction": round(empty / len(rows), 5),
            "provider": session.get_providers()[0], "onnxruntime": ort.__version__,
            "seconds": round(time.perf_counter() - started, 2), "out": str(out)}
