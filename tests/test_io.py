import numpy as np
import pytest

from pipeline.io import atomic_dir, atomic_path, read_image, write_json, write_tiff, read_json


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
