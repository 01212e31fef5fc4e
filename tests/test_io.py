import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.io import atomic_dir, atomic_path, read_image, write_json, write_tiff, read_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_tiff_round_trip_is_lzw(tmp_path):
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (42, 58), dtype=np.uint8)
    write_tiff(tmp_path / "x.tif", array)
    with Image.open(tmp_path / "x.tif") as img:
        assert img.info["compression"] == "tiff_lzw"
    assert np.array_equal(read_image(tmp_path / "x.tif")[0], array)


def test_published_files_and_folders_get_umask_permissions_not_private_ones(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755      # mkdtemp alone gives 0700


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is free
    stale_file = tmp_path / f".last.pt.pid{child.pid}.abcd1234.tmp"
    stale_dir = tmp_path / f".interim.pid{child.pid}.efgh5678.tmp"
    stale_old = tmp_path / f".interim.pid{child.pid}.efgh5678.old.tmp"
    live = tmp_path / f".best.pt.pid{os.getppid()}.ijkl9012.tmp"  # a concurrent writer's: kept
    unrelated = [tmp_path / ".keep.tmp", tmp_path / ".gitignore", tmp_path / "data.pid1.x.tmp"]
    for path in (stale_file, live, *unrelated):
        path.write_text("x")
    for folder in (stale_dir, stale_old):
        folder.mkdir()
        (folder / "train_images.npy").write_text("half")
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["metrics.json", live.name] + [p.name for p in unrelated])


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == target and not str(src).endswith(".old.tmp"):  # the restore itself works
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ---------------------------------------------------------------- masks: binary and class-index (data.foreground)

def _labels() -> np.ndarray:
    labels = np.zeros((12, 16), np.uint8)
    labels[2:5, 3:8], labels[7:10, 9:14] = 1, 2   # 15 pixels of class 1, 15 of class 2
    return labels


def _palette_mask(path: Path, labels: np.ndarray) -> Path:
    from PIL import Image

    img = Image.fromarray(labels, "P")
    img.putpalette([0, 0, 0, 255, 255, 0, 0, 0, 255])   # colours unlike the indices: the indices count
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"
    return path


def test_palette_mask_foreground_picks_indices(tmp_path):
    from pipeline.data.io import read_mask

    labels = _labels()
    path = _palette_mask(tmp_path / "m.png", labels)
    assert np.array_equal(read_mask(path, [1]), labels == 1)
    assert np.array_equal(read_mask(path, (2,)), labels == 2)
    assert np.array_equal(read_mask(path, [1, 2]), labels > 0)
    assert not read_mask(path, [3]).any()
    assert read_mask(path, [1]).dtype == bool


def test_palette_mask_without_foreground_suggests_it(tmp_path):
    from pipeline.data.io import InputError, read_mask

    path = _palette_mask(tmp_path / "m.png", _labels())
    with pytest.raises(InputError) as info:
        read_mask(path)
    assert str(info.value) == (f"{path}: palette (P) mask with values [0, 1, 2]; set data.foreground to the "
                               "label values of the object (e.g. [1])")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_label_map_l_and_16_bit_foreground_picks_values(tmp_path, suffix):
    from PIL import Image

    from pipeline.data.io import InputError, read_mask

    labels = _labels()
    Image.fromarray(labels * 3).save(tmp_path / f"l{suffix}")                      # L: values 0, 3, 6
    assert np.array_equal(read_mask(tmp_path / f"l{suffix}", [6]), labels == 2)
    wide = labels.astype(np.uint16) * 1000                                          # 16-bit: 0, 1000, 2000
    Image.fromarray(wide).save(tmp_path / f"w{suffix}")
    assert np.array_equal(read_mask(tmp_path / f"w{suffix}", [1000, 2000]), labels > 0)
    with pytest.raises(InputError, match=r"mask values \[0, 3, 6\] are not binary .*set data.foreground to the "
                                         r"label values of the object \(e.g. \[3\]\)"):
        read_mask(tmp_path / f"l{suffix}")


@pytest.mark.parametrize("scale", [255, 1])
def test_binary_masks_read_as_today(tmp_path, scale):
    """0/255 and 0/1 masks: without foreground they are binary; with foreground their values are labels."""
    from PIL import Image

    from pipeline.data.io import read_mask

    truth = _labels() > 0
    Image.fromarray(truth.astype(np.uint8) * scale).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), truth)
    assert np.array_equal(read_mask(tmp_path / "m.png", [scale]), truth)
    Image.fromarray(truth.astype(np.uint16) * 65535).save(tmp_path / "w.png")
    assert np.array_equal(read_mask(tmp_path / "w.png"), truth)


@pytest.mark.parametrize("foreground", [None, [1]])
def test_colour_masks_stay_an_error(tmp_path, foreground):
    from PIL import Image

    from pipeline.data.io import InputError, read_mask

    rgb = np.repeat((_labels() > 0)[..., None].astype(np.uint8) * 255, 3, axis=2)
    Image.fromarray(rgb, "RGB").save(tmp_path / "m.png")
    with pytest.raises(InputError, match=r"m.png: RGB mask; expected a single-channel"):
        read_mask(tmp_path / "m.png", foreground)
