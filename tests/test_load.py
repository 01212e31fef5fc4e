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


def _folders(root, n=8, size=(32, 40)):
    """A small folders-layout dataset: PNG images of noise, 0/255 PNG masks (every other one empty)."""
    rng = np.random.default_rng(3)
    for sub in ("images", "masks", "test/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(rng.integers(40, 256, size, dtype=np.uint8)).save(root / "images" / f"{k}.png")
        mask = np.zeros(size, np.uint8)
        if k % 2:
            mask[4:20, 5:25] = 255
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    Image.fromarray(rng.integers(40, 256, size, dtype=np.uint8)).save(root / "test" / "images" / "t.png")
    return root


def _load_folders(root, tmp_path, **data):
    return load.run(Params(data=DataParams(layout="folders", **data)), raw=root, out=tmp_path / "interim",
                    metrics=tmp_path / "metrics.json", fingerprint=tmp_path / "fingerprint.json")


def test_a_jpeg_mask_among_png_masks_is_refused_whatever_data_foreground_says(tmp_path):
    """A JPEG mask's values (0..5 around a 0/1 shape) are not labels: refused, naming the file, with no hint
    to follow; setting data.foreground [1] anyway must not empty the 0/255 masks silently."""
    root = _folders(tmp_path / "ds")
    (root / "masks" / "3.png").unlink()
    mask = np.zeros((32, 40), np.uint8)
    mask[4:20, 5:25] = 1
    Image.fromarray(mask).save(root / "masks" / "3.jpg", quality=70)
    with Image.open(root / "masks" / "3.jpg") as img:
        assert len(np.unique(np.asarray(img))) > 2    # the compression made values beside 0 and 1
    for foreground in (None, (1,)):
        with pytest.raises(InputError) as info:
            _load_folders(root, tmp_path / str(foreground), foreground=foreground)
        text = str(info.value)
        assert f"{root / 'masks' / '3.jpg'}: JPEG mask with values" in text and "lossy" in text, text
        assert "1 problem(s)" in text and "data.foreground to" not in text
        assert not (tmp_path / str(foreground) / "interim").exists()


def test_masks_that_mix_conventions_name_the_files_that_differ(tmp_path):
    """0/1 PNG masks beside 0/255 ones: with data.foreground [1] (the old hint) the 0/255 masks would all
    be empty; with [255] the 0/1 one would. Refused, naming the minority files and what would be lost."""
    root = _folders(tmp_path / "ds")
    mask = np.zeros((32, 40), np.uint8)
    mask[4:20, 5:25] = 1
    Image.fromarray(mask).save(root / "masks" / "5.png")
    assert _load_folders(root, tmp_path / "binary")["empty_fraction"] == 0.5   # 0/1 and 0/255: both binary
    for foreground in ((1,), (255,)):
        with pytest.raises(InputError) as info:
            _load_folders(root, tmp_path / str(foreground), foreground=foreground)
        lines = str(info.value).splitlines()
        assert len(lines) == 2 and lines[1].startswith(f"  - {root / 'masks' / '5.png'}: mask values [0, 1] "
                                                       "(label-value) differ from the other masks (3 are 0/255 "
                                                       "binary, e.g. 1.png): masks mix conventions"), lines
        lost = "3 of the 3 0/255 binary masks" if foreground == (1,) else "1 of the 1 label-value masks"
        assert f"data.foreground {list(foreground)} finds nothing in {lost}" in lines[1]


def test_a_non_binary_png_mask_among_0_255_masks_is_named_as_differing(tmp_path):
    root = _folders(tmp_path / "ds")
    mask = np.zeros((32, 40), np.uint8)
    mask[4:20, 5:25] = 2
    Image.fromarray(mask).save(root / "masks" / "5.png")
    with pytest.raises(InputError) as info:
        _load_folders(root, tmp_path)
    text = str(info.value)
    assert (f"{root / 'masks' / '5.png'}: mask values [0, 2] are not binary, unlike the other masks (3 are 0/255 "
            "or 0/65535, e.g. 1.png): masks mix conventions") in text
    assert "data.foreground" not in text


def _png16(path, array):
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    height, width, channels = array.shape
    rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour = {3: 2, 4: 6, 2: 4}[channels]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_a_16_bit_rgb_png_is_refused_not_read_as_its_high_byte(tmp_path, channels):
    root = _folders(tmp_path / "ds")
    _png16(root / "images" / "2.png", np.full((32, 40, channels), 1000, np.uint16))
    with pytest.raises(InputError) as info:
        _load_folders(root, tmp_path)
    assert f"{root / 'images' / '2.png'}: 16-bit" in str(info.value) and "expected 8-bit" in str(info.value)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """An EXIF orientation is applied (with the mask's own); transparent pixels are refused."""
    root = _folders(tmp_path / "ds", size=(32, 40))
    upright = np.zeros((40, 32), np.uint8)
    upright[:10, :] = 200    # bright at the top as shown
    stored = np.rot90(upright, -1)   # stored rotated; EXIF orientation 8 (rotate 90 CW... as viewers do)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.ascontiguousarray(stored)).save(root / "images" / "4.jpg", exif=exif.tobytes(), quality=95)
    (root / "images" / "4.png").unlink()
    (root / "masks" / "4.png").unlink()
    Image.fromarray(np.where(upright > 0, 255, 0).astype(np.uint8)).save(root / "masks" / "4.png")
    _load_folders(root, tmp_path / "a")
    images, masks = artifacts.open_arrays(tmp_path / "a" / "interim", "train")
    row = artifacts.read_manifest(tmp_path / "a" / "interim").set_index("id").loc["4"]
    assert (row.height, row.width) == (40, 32)
    assert images[row.row, :10, :32].mean() > 150 and images[row.row, 10:40, :32].mean() < 50
    rgba = np.full((32, 40, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "images" / "6.png")
    with pytest.raises(InputError, match=r"6.png: 1 transparent pixel\(s\)"):
        _load_folders(root, tmp_path / "b")
    rgba[0, 0, 3] = 255    # opaque: an RGB image with an alpha channel
    Image.fromarray(rgba, "RGBA").save(root / "images" / "6.png")
    assert _load_folders(root, tmp_path / "c")["colour_images_converted_to_gray"] == 1


def test_an_image_at_another_intensity_scale_is_reported(tmp_path):
    root = _folders(tmp_path / "ds")
    assert _load_folders(root, tmp_path / "a")["images_at_another_scale"] == "none"
    Image.fromarray(np.random.default_rng(0).integers(0, 4, (32, 40), dtype=np.uint8)).save(root / "images" / "5.png")
    summary = _load_folders(root, tmp_path / "b")
    assert summary["images_at_another_scale"].startswith(f"1: {root / 'images' / '5.png'} (99th percentile below")
    assert read_json(tmp_path / "b" / "metrics.json")["images_at_another_scale"] == summary["images_at_another_scale"]
