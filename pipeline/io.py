"""File I/O shared by every stage: atomic writes, TIFF/PNG images, JSON metrics.

Every output goes through `atomic_path`: written to a temporary sibling and
renamed into place, so a killed stage never leaves a half-written file where
DVC would cache it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class InputError(ValueError):
    """Bad input data, with the file that caused it in the message."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` (if any) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_tiff(path: str | Path, array: np.ndarray) -> None:
    """LZW-compressed 8-bit TIFF, like the competition's files."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="TIFF",
                                                                          compression="tiff_lzw")


def _open(path: Path) -> tuple[str, np.ndarray]:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                img, mode = img.convert("RGB"), "RGB"
            return mode, np.asarray(img)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "empty file (0 bytes)" if path.stat().st_size == 0 else f"unreadable or truncated image ({exc})"
        raise InputError(f"{path}: {reason}") from None


def write_png(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")


def read_image(path: str | Path, channels: str = "gray") -> tuple[np.ndarray, str]:
    """Read an 8-bit image as uint8 (H,W) for `gray` or (H,W,3) for `rgb`; returns (array, source mode).

    Colour images are converted to luminance for `gray` (the caller reports how many);
    16-bit and float images are refused: their intensity scale (12-bit? windowed?) cannot be guessed.
    """
    path = Path(path)
    mode, array = _open(path)
    if mode == "1":
        array = array.astype(np.uint8) * 255
    elif mode not in ("L", "RGB"):
        raise InputError(f"{path}: {mode} image ({array.dtype}); expected 8-bit grayscale or RGB")
    if channels == "gray" and array.ndim == 3:
        array = np.asarray(Image.fromarray(array).convert("L"))
    elif channels == "rgb" and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array, dtype=np.uint8), mode


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask file as bool (H,W): 0/255, 0/1 (8-bit) or 0/65535 (16-bit) encodings."""
    path = Path(path)
    mode, array = _open(path)
    if array.ndim != 2:
        raise InputError(f"{path}: mask has {array.shape[2]} channels; expected a single-channel mask")
    values = np.unique(array)
    if mode == "1" or set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255} \
            or set(values.tolist()) <= {0, 65535}:
        return array > 0
    raise InputError(f"{path}: mask values {values[:6].tolist()} are not binary "
                     f"(0/255, 0/1 or 16-bit 0/65535)")


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
