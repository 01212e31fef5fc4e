"""File I/O shared by every stage: atomic writes, TIFF/PNG images, JSON metrics.

Every output goes through `atomic_path` / `atomic_dir`: written to a temporary sibling
named `.NAME.pidPID.XXXXXXXX.tmp` and renamed into place, so a killed stage never leaves
a half-written file where DVC would cache it. A process killed outright (SIGKILL, power
loss) cannot delete its temporary; the next atomic write into the same folder removes
every such leftover whose process is gone (`remove_stale_temps`), and `.dvcignore`
keeps DVC from ever hashing one. Published files get the usual umask permissions.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class InputError(ValueError):
    """Bad input data, with the file that caused it in the message."""


_TEMP_NAME = re.compile(r"^\..+\.pid(?P<pid>\d+)\.[^.]+(?:\.old)?\.tmp$")
_ACTIVE: set[str] = set()    # temporaries this process is writing right now


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.pid{os.getpid()}."


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid, but not one of our active temporaries: a reused pid (containers)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries of atomic writes whose process died before renaming them; returns them.

    Only names this module creates are touched, and only when their process is gone, so a
    concurrent writer's temporary survives.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or str(entry) in _ACTIVE or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _prepare(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A folder inside one of our temporary folders is new and clean (and may hold thousands of
    # files, as in synth); any other may hold a killed run's leftovers.
    if not any(str(folder) in _ACTIVE for folder in (path.parent, *path.parent.parents)):
        remove_stale_temps(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _ACTIVE.add(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes it private (0600)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
        _ACTIVE.discard(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` (if any) only on success.

    The previous `path` is moved aside first and put back if the final rename fails, so at
    every moment `path` holds either the complete old or the complete new contents (a
    SIGKILL between the two renames leaves no `path` and the old one under a temporary name).
    """
    path = Path(path)
    _prepare(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old.tmp")
    _ACTIVE.update((str(tmp), str(old)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700)
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if (old.exists() or old.is_symlink()) and not path.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # never delete the only copy of the previous output
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        _ACTIVE.difference_update((str(tmp), str(old)))


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
