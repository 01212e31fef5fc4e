import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.data import artifacts
from pipeline.stages import load
from pipeline.data.io import InputError, read_json
from pipeline.params import DataParams, Params


@pytest.fixture
def raw(tiny_raw, tmp_path):
    """A private copy of the tiny dataset that a test may break."""
    return shutil.copytree(tiny_raw, tmp_path / "raw")


def _run(raw, tmp_path):
    return load.run(Params(), raw=raw, out=tmp_path / "interim", metrics=tmp_path / "metrics.json",
                    fingerprint=tmp_path / "fingerprint.json")


def test_loads_arrays_manifest_and_metrics(tiny_interim, tiny_raw):
    manifest = artifacts.read_manifest(tiny_interim)
    images, masks = artifacts.open_arrays(tiny_interim, "train")
    test_images, _ = artifacts.open_arrays(tiny_interim, "test")
    train = manifest[manifest.split == "train"]
    assert images.shape == masks.shape == (30, 96, 128) and test_images.shape == (6, 96, 128)
    assert set(np.unique(masks)) <= {0, 1}
    row = train[train.id == "2_5"].iloc[0]
    with Image.open(tiny_raw / "train" / "2_5.tif") as img:
        assert np.array_equal(images[row.row], np.asarray(img))
    with Image.open(tiny_raw / "train" / "2_5_mask.tif") as img:
        assert np.array_equal(masks[row.row], np.asarray(img) > 0)
    assert row.subject == 2 and row.frame == 5
    assert (train.mask_area == masks.reshape(30, -1).sum(1)[train.row]).all()
    assert (train.has_mask == (train.mask_area > 0)).all()
    assert sorted(manifest[manifest.split == "test"].id, key=int) == [str(i) for i in range(1, 7)]
    metrics = read_json(tiny_interim.parent / "load_metrics.json")
    assert metrics["train_images"] == 30 and metrics["subjects"] == 3
    assert metrics["empty_fraction"] == pytest.approx(1 - train.has_mask.mean(), abs=1e-4)


def _expect_error(raw, tmp_path, *fragments):
    with pytest.raises(InputError) as info:
        _run(raw, tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not (tmp_path / "interim").exists(), "no partial output on bad input"
    assert not (tmp_path / "metrics.json").exists()


def test_zero_byte_image(raw, tmp_path):
    (raw / "train" / "1_3.tif").write_bytes(b"")
    _expect_error(raw, tmp_path, "1_3.tif", "0 bytes")


def test_truncated_image(raw, tmp_path):
    path = raw / "test" / "2.tif"
    path.write_bytes(path.read_bytes()[:300])
    _expect_error(raw, tmp_path, "2.tif", "truncated")


def test_garbage_file(raw, tmp_path):
    (raw / "train" / "1_4_mask.tif").write_bytes(b"not an image at all" * 10)
    _expect_error(raw, tmp_path, "1_4_mask.tif", "unreadable")


def test_image_without_mask_and_mask_without_image(raw, tmp_path):
    (raw / "train" / "1_2_mask.tif").unlink()
    (raw / "train" / "3_1.tif").unlink()
    _expect_error(raw, tmp_path, "1_2.tif: image has no mask", "3_1_mask.tif: mask has no image")


def test_shape_mismatch(raw, tmp_path):
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(raw / "train" / "2_2.tif")
    _expect_error(raw, tmp_path, "2_2_mask.tif", "differs from its image's 50x60")


def test_images_of_mixed_sizes_keep_their_native_size(raw, tmp_path):
    """Each image in the top-left corner of one padded array; its own size in the manifest."""
    Image.fromarray(np.full((50, 60), 77, np.uint8)).save(raw / "train" / "2_2.tif")
    Image.fromarray(np.full((50, 60), 255, np.uint8)).save(raw / "train" / "2_2_mask.tif")
    Image.fromarray(np.full((120, 100), 9, np.uint8)).save(raw / "test" / "3.tif")
    summary = _run(raw, tmp_path)
    assert summary["image_sizes"] == 3 and (summary["height"], summary["width"]) == (96, 128)
    manifest = artifacts.read_manifest(tmp_path / "interim")
    row = manifest.set_index("id").loc["2_2"]
    assert (row.height, row.width, row.mask_area) == (50, 60, 3000)
    images, masks = artifacts.open_arrays(tmp_path / "interim", "train")
    assert images.shape[1:] == (96, 128) and (images[row.row, :50, :60] == 77).all()
    assert masks[row.row].sum() == 3000 and masks[row.row, 50:, :].sum() == 0
    test_images, _ = artifacts.open_arrays(tmp_path / "interim", "test")
    assert test_images.shape[1:] == (120, 128)
    assert (manifest.set_index("id").loc["3", ["height", "width"]].tolist()) == [120, 100]


def test_16_bit_image_refused(raw, tmp_path):
    Image.fromarray(np.zeros((96, 128), np.uint16)).save(raw / "test" / "1.tif")
    _expect_error(raw, tmp_path, "1.tif", "I;16", "expected 8-bit")


def test_rgb_image_converted_to_gray_and_counted(raw, tmp_path):
    with Image.open(raw / "train" / "2_3.tif") as img:
        gray = np.asarray(img)
    Image.fromarray(np.stack([gray] * 3, axis=2)).save(raw / "train" / "2_3.tif")
    summary = _run(raw, tmp_path)
    assert summary["colour_images_converted_to_gray"] == 1
    images, _ = artifacts.open_arrays(tmp_path / "interim", "train")
    row = artifacts.read_manifest(tmp_path / "interim").set_index("id").loc["2_3", "row"]
    assert np.array_equal(images[row], gray)


def test_rgb_mask_refused(raw, tmp_path):
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(raw / "train" / "2_3_mask.tif")
    _expect_error(raw, tmp_path, "2_3_mask.tif", "single-channel")


def test_mask_values_not_binary(raw, tmp_path):
    Image.fromarray(np.full((96, 128), 7, np.uint8)).save(raw / "train" / "2_4_mask.tif")
    _expect_error(raw, tmp_path, "2_4_mask.tif", "not binary")


def test_non_numeric_ids_and_stray_files(raw, tmp_path):
    shutil.copy(raw / "test" / "1.tif", raw / "test" / "abc.tif")
    shutil.copy(raw / "train" / "1_1.tif", raw / "train" / "x_1.tif")
    _expect_error(raw, tmp_path, "abc.tif", "x_1.tif", "numeric")


def test_empty_test_folder(raw, tmp_path):
    for path in (raw / "test").iterdir():
        path.unlink()
    _expect_error(raw, tmp_path, "no test images")


def test_missing_folders(tmp_path):
    (tmp_path / "raw").mkdir()
    _expect_error(tmp_path / "raw", tmp_path, "train", "folder not found")
    with pytest.raises(InputError, match="data folder not found"):
        load.run(Params(), raw=tmp_path / "absent", out=tmp_path / "o", metrics=tmp_path / "m.json",
                 fingerprint=tmp_path / "f.json")


def test_zero_one_masks_accepted(raw, tmp_path):
    mask = np.zeros((96, 128), np.uint8)
    mask[20:30, 40:50] = 1
    Image.fromarray(mask).save(raw / "train" / "1_1_mask.tif")
    summary = _run(raw, tmp_path)
    assert summary["train_images"] == 30
    manifest = artifacts.read_manifest(tmp_path / "interim")
    assert manifest.set_index("id").loc["1_1", "mask_area"] == 100


def test_rerun_replaces_output(raw, tmp_path):
    _run(raw, tmp_path)
    (tmp_path / "interim" / "stale.txt").write_text("old")
    _run(raw, tmp_path)
    assert not (tmp_path / "interim" / "stale.txt").exists()


def test_leading_zero_id_beside_the_same_id_is_an_error_naming_both(raw, tmp_path):
    """`01_1.tif` and `1_1.tif` are one id (ids compare as numbers): refused, not one frame silently dropped."""
    shutil.copy(raw / "train" / "1_1.tif", raw / "train" / "01_1.tif")
    shutil.copy(raw / "train" / "1_1_mask.tif", raw / "train" / "01_1_mask.tif")
    _expect_error(raw, tmp_path, "01_1.tif and 1_1.tif: both are training image 1_1",
                  "01_1_mask.tif and 1_1_mask.tif: both are mask 1_1")


def test_mask_must_spell_its_image_id_exactly(raw, tmp_path):
    """`01_2.tif` does not silently pair with `1_2_mask.tif`: the error names both files."""
    (raw / "train" / "1_2.tif").rename(raw / "train" / "01_2.tif")
    _expect_error(raw, tmp_path, "01_2.tif and 1_2_mask.tif: image and mask spell id 1_2 differently",
                  "1 problem(s)")


def test_test_ids_of_one_value_are_an_error_naming_both(raw, tmp_path):
    shutil.copy(raw / "test" / "1.tif", raw / "test" / "01.tif")
    _expect_error(raw, tmp_path, "01.tif and 1.tif: both are test image 1")


def test_non_ascii_digits_are_not_ids(raw, tmp_path):
    """`\\d` would take Arabic-Indic digits: `١_٧.tif` loaded as 1_7, `٣.tif` as a test id."""
    shutil.copy(raw / "train" / "1_7.tif", raw / "train" / "\u0661_\u0667.tif")
    shutil.copy(raw / "test" / "1.tif", raw / "test" / "\u0663.tif")
    _expect_error(raw, tmp_path, "\u0661_\u0667.tif: name does not match", "\u0663.tif: name does not match",
                  "ASCII")


def test_test_folder_rule_dot_files_skipped_and_upper_case_suffix_read(raw, tmp_path):
    """One rule for which files are test images (load and `pipeline validate` share it)."""
    from pipeline.data.layouts import list_test_images

    (raw / "test" / "._1.tif").write_bytes(b"AppleDouble resource fork")
    (raw / "test" / ".DS_Store").write_bytes(b"\0")
    shutil.copy(raw / "test" / "1.tif", raw / "test" / "7.TIF")
    listed = list_test_images(raw / "test", DataParams())
    assert [i for i, _ in listed] == ["1", "2", "3", "4", "5", "6", "7"]
    assert listed[-1][1].name == "7.TIF"
    assert _run(raw, tmp_path)["test_images"] == 7
    ids = artifacts.read_manifest(tmp_path / "interim").query("split == 'test'").id.tolist()
    assert ids == ["1", "2", "3", "4", "5", "6", "7"]


def test_unreadable_test_folder_is_one_error_naming_it(raw, tmp_path, monkeypatch):
    """Root ignores chmod 000, so the refusal is simulated where the folder is listed."""
    real_iterdir = type(raw).iterdir
    test_dir = raw / "test"

    def iterdir(self):
        if self == test_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(type(raw), "iterdir", iterdir)
    with pytest.raises(InputError) as info:
        _run(raw, tmp_path)
    assert str(info.value) == (f"1 problem(s) in the input data:\n  - {test_dir}: folder not readable "
                               "(Permission denied)")


def test_every_problem_is_listed_at_once(raw, tmp_path):
    """A truncated image, a mask of value 7 and an image whose mask has another size: all three, in one error
    (images of different sizes are fine; an image and its mask must agree)."""
    image = raw / "train" / "1_3.tif"
    image.write_bytes(image.read_bytes()[:300])
    Image.fromarray(np.full((96, 128), 7, np.uint8)).save(raw / "train" / "2_4_mask.tif")
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(raw / "train" / "2_2.tif")
    _expect_error(raw, tmp_path, "3 problem(s)", "1_3.tif: unreadable or truncated", "2_4_mask.tif: mask values [7]",
                  "2_2_mask.tif: mask size 96x128 differs from its image's 50x60")


@pytest.mark.parametrize("mode, fragment", [
    ("P", "palette (P) mask with values [0, 1, 2]; set data.foreground to the label values of the object (e.g. [1])"),
    ("LA", "LA (grayscale+alpha) mask; expected a single-channel binary mask"),
])
def test_palette_and_la_masks_say_what_they_are(raw, tmp_path, mode, fragment):
    mask = np.zeros((96, 128), np.uint8)
    mask[10:20, 10:20], mask[30:40, 30:40] = 1, 2
    if mode == "P":
        img = Image.fromarray(mask, "L").convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])
    else:
        img = Image.fromarray(np.stack([mask * 255, np.full_like(mask, 255)], axis=2), "LA")
    img.save(raw / "train" / "2_5_mask.tif")
    _expect_error(raw, tmp_path, f"2_5_mask.tif: {fragment}")
