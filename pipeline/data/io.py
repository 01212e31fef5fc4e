"""File I/O shared by every stage: images, masks, JSON, CSV; every write is atomic (`pipeline.atomic`)."""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_dir, atomic_path
from pipeline.errors import InputError

__all__ = ["InputError", "atomic_dir", "atomic_path"]


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


_TO_RGB = ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr")
_MASK_KINDS = {"P": "palette (P)", "PA": "palette+alpha (PA)", "LA": "LA (grayscale+alpha)", "RGB": "RGB",
               "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr"}


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_file(path: str | Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder (links followed): "a FIFO (named
    pipe)", "a socket", "a character device" or "a block device"; None otherwise, or when it cannot be
    stat'ed (the read that follows says why). Checked before opening: reading a FIFO blocks for ever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def _refuse_special(path: Path) -> None:
    if (kind := special_file(path)) is not None:
        raise InputError(f"{path}: {kind}, not a regular file")


def _open(path: Path, to_rgb: bool = True) -> tuple[str, np.ndarray]:
    """Decode an image file: (PIL mode, array). With `to_rgb`, palette, alpha and other colour modes
    become RGB (mode "RGB"); without, the array is as stored (a palette image is its index array)."""
    _refuse_special(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if to_rgb and mode in _TO_RGB:
                img, mode = img.convert("RGB"), "RGB"
            return mode, np.asarray(img)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        reason = "empty file (0 bytes)" if empty else f"unreadable or truncated image ({exc})"
        raise InputError(f"{path}: {reason}") from None


def write_png(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    _refuse_special(path)
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


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


_FOREGROUND_HINT = "set data.foreground to the label values of the object (e.g. [{example}])"
_LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")  # one value per pixel: indices or labels


def read_mask(path: str | Path, foreground: Sequence[int] | None = None) -> np.ndarray:
    """Read a mask file as bool (H,W).

    `foreground` None (binary masks): 0/255, 0/1 (8-bit) or 0/65535 (16-bit) encodings; anything
    else (a palette mask, other values) is an error suggesting `data.foreground`.
    `foreground` a list of label values (`data.foreground`): the mask's one value per pixel (a
    palette (P) mask's index array, an L / 16-bit mask's values) is read and the pixels whose value
    is in the list are foreground, `np.isin(array, foreground)`. Colour (RGB) and alpha masks are
    errors either way: their pixels are not labels.
    """
    path = Path(path)
    mode, array = _open(path, to_rgb=False)
    if foreground is not None:
        if mode not in _LABEL_MODES or array.ndim != 2:
            raise InputError(f"{path}: {_MASK_KINDS.get(mode, mode)} mask; expected a single-channel label mask "
                             "(palette indices or grayscale / 16-bit values) for data.foreground")
        return np.isin(array, np.asarray(foreground, dtype=np.int64))
    if mode == "P":  # its index array: the indices are class labels
        values = np.unique(array)
        raise InputError(f"{path}: palette (P) mask with values {_few(values)}; "
                         + _FOREGROUND_HINT.format(example=_example(values)))
    if array.ndim != 2:
        raise InputError(f"{path}: {_MASK_KINDS.get(mode, mode)} mask; expected a single-channel binary mask")
    values = np.unique(array)
    if mode == "1" or set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255} \
            or set(values.tolist()) <= {0, 65535}:
        return array > 0
    raise InputError(f"{path}: mask values {values[:6].tolist()} are not binary "
                     f"(0/255, 0/1 or 16-bit 0/65535); if they are class labels, "
                     + _FOREGROUND_HINT.format(example=_example(values)))


def _example(values: np.ndarray) -> int:
    """A label to suggest for data.foreground: the smallest non-zero value (0 is usually background)."""
    nonzero = values[values != 0]
    return int(nonzero[0]) if len(nonzero) else 1


def _few(values: np.ndarray, most: int = 10) -> str:
    """`[0, 1, 2]`, or the first `most` values and how many there are."""
    listed = ", ".join(map(str, values[:most].tolist()))
    return f"[{listed}]" if len(values) <= most else f"[{listed}, ...] ({len(values)} values)"


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
