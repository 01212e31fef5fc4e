"""File I/O shared by every stage: images, masks, JSON, CSV; every write is atomic (`pipeline.atomic`)."""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

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
_ORIENTATION = 0x0112   # the EXIF orientation tag
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


def _raw_bits(img: Image.Image) -> int:
    """16 when the decoder unpacks 16-bit samples into an 8-bit mode (a 16-bit RGB PNG opens as "RGB",
    keeping only the high byte of each sample), else 8. Read before `load()`, which empties `tile`."""
    for tile in getattr(img, "tile", None) or ():
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(rawmode, str) and "16" in rawmode and img.mode in ("L", "LA", "RGB", "RGBA", "RGBX", "P"):
            return 16
    return 8


def _open(path: Path, to_rgb: bool = True) -> tuple[str, np.ndarray, str]:
    """Decode an image file as an image viewer shows it: (PIL mode, array, file format). An EXIF orientation
    is applied (a phone photo stands upright). With `to_rgb` (an image, not a mask), palette, alpha and
    other colour modes become RGB (mode "RGB"), and an image a viewer would not show as stored is refused:
    16 bits per sample decoded as 8 (Pillow keeps the high byte of a 16-bit RGB PNG), or transparent pixels
    (shown over the viewer's own background). Without `to_rgb`, the array is as stored (a palette image
    is its index array)."""
    _refuse_special(path)
    try:
        with Image.open(path) as img:
            bits, file_format = _raw_bits(img), img.format or "?"
            img.load()
            if img.getexif().get(_ORIENTATION, 1) not in (1, None):
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if to_rgb and bits == 16:
                raise InputError(f"{path}: 16-bit {mode} image (16 bits per sample); expected 8-bit grayscale or "
                                 "RGB: its intensity scale (12-bit? windowed?) cannot be guessed")
            if to_rgb and (mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info):
                alpha = np.asarray(img.convert("RGBA"))[..., 3]
                if (alpha < 255).any():
                    raise InputError(f"{path}: {int((alpha < 255).sum())} transparent pixel(s) (alpha < 255), "
                                     "which a viewer shows over its own background; save the image without "
                                     "transparency")
            if to_rgb and mode in _TO_RGB:
                img, mode = img.convert("RGB"), "RGB"
            return mode, np.asarray(img), file_format
    except InputError:
        raise
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
    mode, array, _ = _open(path)
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
    errors either way: their pixels are not labels. A JPEG mask whose values are not binary is an
    error either way: lossy compression changed its values. A dataset's masks are checked together
    by `mask_problems` (the load stage): one file's check cannot see conventions that differ.
    """
    mask, values = read_mask_values(path, foreground)
    if problems := mask_problems([str(path)], [values], foreground):
        raise InputError(problems[0])
    return mask


class MaskValues(np.ndarray):
    """A mask file's distinct values (a plain int64 array) and its file format (`.format`, e.g. "JPEG")."""
    format: str = "?"


def read_mask_values(path: str | Path, foreground: Sequence[int] | None = None) -> tuple[np.ndarray, MaskValues]:
    """(the mask as bool (H,W), the file's distinct values with its format) without judging the values:
    `mask_problems` does, for one file or a whole dataset. Palette masks without `foreground`, and colour
    or alpha masks, are errors here (their pixels are not the values of a binary mask)."""
    path = Path(path)
    mode, array, file_format = _open(path, to_rgb=False)
    if foreground is not None and (mode not in _LABEL_MODES or array.ndim != 2):
        raise InputError(f"{path}: {_MASK_KINDS.get(mode, mode)} mask; expected a single-channel label mask "
                         "(palette indices or grayscale / 16-bit values) for data.foreground")
    values = np.unique(array).astype(np.int64).view(MaskValues)
    values.format = file_format
    if foreground is not None:
        return np.isin(array, np.asarray(foreground, dtype=np.int64)), values
    if mode == "P":  # its index array: the indices are class labels
        raise InputError(f"{path}: palette (P) mask with values {_few(values)}; "
                         + _FOREGROUND_HINT.format(example=_example(values)))
    if array.ndim != 2:
        raise InputError(f"{path}: {_MASK_KINDS.get(mode, mode)} mask; expected a single-channel binary mask")
    return array > 0, values


_BINARY = {"0/255": {0, 255}, "0/1": {0, 1}, "0/65535": {0, 65535}}


def mask_convention(values: np.ndarray) -> str:
    """"empty" (all 0), "0/255", "0/1", "0/65535" (binary encodings), or "labels" (any other values)."""
    present = set(values.tolist())
    if present <= {0}:
        return "empty"
    return next((name for name, allowed in _BINARY.items() if present <= allowed), "labels")


def mask_problems(names: Sequence[str], values: Sequence[np.ndarray | None],
                  foreground: Sequence[int] | None) -> list[str]:
    """Problems of a dataset's masks seen together, one line each naming its file (None values: unreadable).

    - A JPEG mask that is not binary: lossy compression changed its values (values 0..5 around a 0/1
      shape); no `data.foreground` reads it right.
    - Binary masks (`foreground` None): other values are an error; when the other masks are 0/255 (or
      0/65535) the file is named as differing from them (a mixed-up file), otherwise the message suggests
      `data.foreground` (class-label masks).
    - Label masks (`foreground` set): masks that mix conventions (0/255 masks beside masks of small label
      values) cannot all be read with one `data.foreground`; the files that differ from the most common
      convention are named, with how many masks the foreground finds nothing in.
    """
    problems: list[str] = []
    listed = [(n, v, mask_convention(v)) for n, v in zip(names, values) if v is not None]
    lossy = {n for n, v, kind in listed if getattr(v, "format", "") == "JPEG" and kind in ("labels",)}
    problems += [f"{n}: JPEG mask with values {_few(v)}: lossy compression changed its values, so no label "
                 "value reads it right; save the masks losslessly (PNG or TIFF)" for n, v, _ in listed if n in lossy]
    listed = [(n, v, kind) for n, v, kind in listed if n not in lossy]
    if foreground is None:
        scaled = [n for n, _, kind in listed if kind in ("0/255", "0/65535")]
        for n, v, kind in listed:
            if kind != "labels":
                continue
            if scaled:
                problems.append(f"{n}: mask values {_few(v)} are not binary, unlike the other masks ({len(scaled)} "
                                f"are 0/255 or 0/65535, e.g. {Path(scaled[0]).name}): masks mix conventions; save "
                                "this one like the rest")
            else:
                problems.append(f"{n}: mask values {v[:6].tolist()} are not binary (0/255, 0/1 or 16-bit 0/65535); "
                                "if they are class labels, " + _FOREGROUND_HINT.format(example=_example(v)))
        return problems
    by_kind: dict[str, list[tuple[str, np.ndarray]]] = {}
    for n, v, kind in listed:
        if kind != "empty":
            by_kind.setdefault("labels" if kind == "0/1" else kind, []).append((n, v))
    if len(by_kind) > 1:
        usual = max(by_kind, key=lambda k: len(by_kind[k]))
        wanted = np.asarray(foreground, dtype=np.int64)
        missed = {k: sum(not np.isin(v, wanted).any() for _, v in files) for k, files in by_kind.items()}
        lost = "; ".join(f"data.foreground {list(foreground)} finds nothing in {missed[k]} of the {len(files)} "
                         f"{_KIND_WORDS[k]} masks" for k, files in by_kind.items() if missed[k])
        for kind, files in by_kind.items():
            if kind == usual:
                continue
            problems += [f"{n}: mask values {_few(v)} ({_KIND_WORDS[kind]}) differ from the other masks "
                         f"({len(by_kind[usual])} are {_KIND_WORDS[usual]}, e.g. {Path(by_kind[usual][0][0]).name}): "
                         f"masks mix conventions{f' ({lost})' if lost else ''}; save this one like the rest"
                         for n, v in files]
    return problems


_KIND_WORDS = {"0/255": "0/255 binary", "0/65535": "0/65535 binary", "labels": "label-value"}


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
