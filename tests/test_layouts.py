"""Each layout adapter end to end on generated data, and its bad inputs."""
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_plan
from pipeline.data import artifacts, layouts, rle
from pipeline.stages import load, synth
from pipeline.data.io import InputError
from pipeline.params import DataParams, Params, SynthParams

SMALL = dict(subjects=2, frames_per_subject=4, test_images=3, height=64, width=80, label_noise=0.0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same generated data written in all three layouts."""
    root = tmp_path_factory.mktemp("layouts")
    for layout in ("ultrasound", "folders", "csv"):
        synth.run(Params(seed=5, synth=SynthParams(layout=layout, **SMALL)), out=root / layout)
    return root


def _load(raw, data, tmp_path):
    summary = load.run(Params(data=data), raw=raw, out=tmp_path / "interim", metrics=tmp_path / "m.json",
                       fingerprint=tmp_path / "fingerprint.json")
    images, masks = artifacts.open_arrays(tmp_path / "interim", "train")
    return summary, artifacts.read_manifest(tmp_path / "interim"), images, masks


@pytest.mark.parametrize("layout, group_column", [("folders", None), ("folders", "group"), ("csv", "group"),
                                                  ("csv", None)])
def test_layouts_load_the_same_pixels(datasets, tmp_path, layout, group_column):
    _, ref_manifest, ref_images, ref_masks = _load(datasets / "ultrasound", DataParams(), tmp_path / "ref")
    summary, manifest, images, masks = _load(datasets / layout, DataParams(layout=layout, group_column=group_column),
                                             tmp_path / layout)
    assert summary["train_images"] == 8 and summary["test_images"] == 3
    assert (manifest.height == 64).all() and (manifest.width == 80).all()
    ref = ref_manifest[ref_manifest.split == "train"].set_index("id")
    for row in manifest[manifest.split == "train"].itertuples():
        assert np.array_equal(images[row.row], ref_images[ref.loc[row.id, "row"]])
        assert np.array_equal(masks[row.row], ref_masks[ref.loc[row.id, "row"]])
    train = manifest[manifest.split == "train"]
    expected_groups = 2 if group_column else 8
    assert train.subject.nunique() == expected_groups


def test_csv_row_major_zero_indexed(datasets, tmp_path):
    raw = shutil.copytree(datasets / "csv", tmp_path / "raw")
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    table["rle_mask"] = [rle.encode(rle.decode(t, (64, 80)), order="C", start=0) for t in table.rle_mask]
    table.to_csv(raw / "train.csv", index=False)
    _, _, _, masks = _load(raw, DataParams(layout="csv", rle_order="row", rle_start=0), tmp_path / "a")
    _, _, _, ref = _load(datasets / "csv", DataParams(layout="csv"), tmp_path / "b")
    assert np.array_equal(masks, ref) and masks.any()


def test_csv_multiple_rows_per_id_are_merged(datasets, tmp_path):
    raw = shutil.copytree(datasets / "csv", tmp_path / "raw")
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    table.loc[0, "rle_mask"] = "1 3"
    extra = table.iloc[[0]].assign(rle_mask="100 2")
    pd.concat([table, extra]).to_csv(raw / "train.csv", index=False)
    _, manifest, _, masks = _load(raw, DataParams(layout="csv"), tmp_path)
    row = manifest.set_index("id").loc[table.loc[0, "id"], "row"]
    assert masks[row].sum() == 5


@pytest.mark.parametrize("breakage, fragments", [
    ("mask_renamed", ["image has no mask", "mask has no image"]),
    ("mask_other_size", ["size 10x10"]),
    ("rle_out_of_range", ["train.csv: id", "ends past the image"]),
    ("csv_missing_column", ["'rle_mask'", "not found"]),
    ("csv_unknown_id", ["has no image"]),
    ("sixteen_bit_mask", []),
])
def test_adapter_bad_inputs(datasets, tmp_path, breakage, fragments):
    layout = "folders" if breakage in ("mask_renamed", "mask_other_size", "sixteen_bit_mask") else "csv"
    raw = shutil.copytree(datasets / layout, tmp_path / "raw")
    masks_dir = raw / "train" / "masks"
    first = sorted(p.name for p in (raw / "train" / "images").iterdir())[0]
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    if breakage == "mask_renamed":
        (masks_dir / first).rename(masks_dir / "zz_other.png")
    elif breakage == "mask_other_size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks_dir / first)
    elif breakage == "rle_out_of_range":
        table.loc[0, "rle_mask"] = "5119 5"
        table.to_csv(raw / "train.csv", index=False)
    elif breakage == "csv_missing_column":
        table.rename(columns={"rle_mask": "pixels"}).to_csv(raw / "train.csv", index=False)
    elif breakage == "csv_unknown_id":
        pd.concat([table, table.iloc[[0]].assign(id="ghost")]).to_csv(raw / "train.csv", index=False)
    elif breakage == "sixteen_bit_mask":  # 0/65535 16-bit masks are a valid encoding (TGS salt ships them)
        mask = np.zeros((64, 80), np.uint16)
        mask[10:20, 10:30] = 65535
        Image.fromarray(mask).save(masks_dir / first)
        _, manifest, _, masks = _load(raw, DataParams(layout=layout), tmp_path)
        assert masks[manifest.set_index("id").loc[first[:-4], "row"]].sum() == 200
        return
    with pytest.raises(InputError) as info:
        _load(raw, DataParams(layout=layout), tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not (tmp_path / "interim").exists()


def test_rgb_channels_kept(datasets, tmp_path):
    summary, _, images, _ = _load(datasets / "folders", DataParams(layout="folders", channels="rgb"), tmp_path)
    assert summary["channels"] == 3 and images.shape[-1] == 3
    assert np.array_equal(images[..., 0], images[..., 2])


def test_csv_layout_end_to_end_with_its_own_conventions(tmp_path):
    """csv layout, RGB kept, row-major 0-indexed RLE, string ids, 64x80: load -> train -> tune -> predict.

    The submission must use the dataset's header, ids and RLE convention at its native size:
    decoded with that convention it gives the same masks as the ultrasound convention does.
    """
    from pipeline.stages import augment, clean, dedup, predict, train, tune
    from pipeline.model.checkpoints import load_checkpoint
    from pipeline.model.network import input_channels
    from pipeline.params import AugmentParams, CleanParams, DedupParams, PredictParams, TrainParams, TuneParams

    raw = tmp_path / "raw"
    synth.run(Params(seed=3, synth=SynthParams(layout="csv", subjects=3, frames_per_subject=6, test_images=4,
                                               height=64, width=80)), out=raw)
    shutil.rmtree(raw / "truth")  # the generator's truth is keyed by the numeric ids renamed below
    test_ids = ["a1f0", "b72c", "c004", "d9e3"]
    for old, new in zip(sorted((raw / "test" / "images").iterdir()), test_ids):
        old.rename(old.with_name(f"{new}.png"))
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    table["rle_mask"] = [rle.encode(rle.decode(t, (64, 80)), order="C", start=0) for t in table.rle_mask]
    table.to_csv(raw / "train.csv", index=False)
    data = DataParams(layout="csv", channels="rgb", rle_order="row", rle_start=0, group_column="group",
                      submission_columns=("id", "rle_mask"))

    interim = tmp_path / "interim"
    assert load.run(Params(data=data), raw=raw, out=interim, metrics=tmp_path / "load.json",
                    fingerprint=tmp_path / "fingerprint.json")["channels"] == 3
    plan = make_plan(tmp_path / "fingerprint.json", tmp_path / "plan.json")
    dedup.run(Params(dedup=DedupParams(grid=(16, 20), scope="global")), interim=interim, plan=plan,
              out=tmp_path / "dedup", reports=tmp_path / "dedup_reports")
    clean.run(Params(clean=CleanParams()), interim=interim, dedup=tmp_path / "dedup", raw=raw,
              out=tmp_path / "processed", metrics=tmp_path / "clean.json")
    t = TrainParams(encoder_depth=3, decoder_channels=(16, 8, 4), height=32, width=48, epochs=1, batch_size=4,
                    folds=3, train_folds=1)
    augment.run(Params(seed=1, augment=AugmentParams(preview_samples=2), train=t), interim=interim, plan=plan,
                out=tmp_path / "aug.json", preview=tmp_path / "preview.png")
    train.run(Params(seed=1, train=t), interim=interim, manifest=tmp_path / "processed" / "manifest.csv",
              augment=tmp_path / "aug.json", plan=plan, models=tmp_path / "models", oof=tmp_path / "oof",
              reports=tmp_path / "train_reports")
    model, _ = load_checkpoint(tmp_path / "models" / "fold_0" / "best.pt", map_location="cpu")
    assert input_channels(model) == 3
    median = float(np.median(np.load(tmp_path / "oof" / "oof.npz")["mask_prob"]))  # partial masks, not all or none
    tune.run(Params(tune=TuneParams(pixel_thresholds=(round(median, 6),), presence_thresholds=(0.0,), min_areas=(0,))),
             oof=tmp_path / "oof", interim=interim, plan=plan, out=tmp_path / "thresholds.json",
             reports=tmp_path / "tune_reports")

    def submit(name: str, d: DataParams) -> pd.DataFrame:
        predict.run(Params(predict=PredictParams(tta_flip=False), data=d), interim=interim, models=tmp_path / "models",
                    thresholds=tmp_path / "thresholds.json", raw=raw, out=tmp_path / name,
                    metrics=tmp_path / f"{name}.json")
        return pd.read_csv(tmp_path / name, dtype=str, keep_default_na=False)

    ours = submit("ours.csv", data)
    kaggle = submit("kaggle.csv", DataParams(layout="csv", channels="rgb"))
    assert list(ours.columns) == ["id", "rle_mask"] and ours.id.tolist() == test_ids
    decoded = [rle.decode(r, (64, 80), order="C", start=0) for r in ours.rle_mask]
    for mine, theirs in zip(decoded, kaggle.pixels):
        assert np.array_equal(mine, rle.decode(theirs, (64, 80)))
    assert any(0 < m.sum() < m.size for m in decoded)  # partial masks, so the pixel order matters


@pytest.mark.parametrize("first, second, pixels", [("100 2", "1 3", 5), ("1 3", "2 3", 4), ("5 2", "-1", 2)])
def test_csv_rows_of_one_id_are_a_union_of_pixels(datasets, tmp_path, first, second, pixels):
    """Rows of one id in any order, even overlapping, give the union of their pixels."""
    raw = shutil.copytree(datasets / "csv", tmp_path / "raw")
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    table.loc[0, "rle_mask"] = first
    extra = table.iloc[[0]].assign(rle_mask=second)
    pd.concat([table, extra]).to_csv(raw / "train.csv", index=False)
    _, manifest, _, masks = _load(raw, DataParams(layout="csv"), tmp_path)
    assert masks[manifest.set_index("id").loc[table.loc[0, "id"], "row"]].sum() == pixels


def test_csv_rle_error_names_the_line(datasets, tmp_path):
    raw = shutil.copytree(datasets / "csv", tmp_path / "raw")
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    pd.concat([table, table.iloc[[1]].assign(rle_mask="3 x")]).to_csv(raw / "train.csv", index=False)
    with pytest.raises(InputError, match=rf"train.csv: id '{table.loc[1, 'id']}' \(line {len(table) + 2}\): mask RLE"):
        _load(raw, DataParams(layout="csv"), tmp_path)


@pytest.mark.parametrize("layout", ["csv", "folders"])
def test_blank_group_cells_are_an_error_naming_their_lines(datasets, tmp_path, layout):
    """A blank group cell would silently become one group "" shared by every such image."""
    raw = shutil.copytree(datasets / layout, tmp_path / "raw")
    table = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    table.loc[[1, 4], "group"] = ["", "  "]
    table.to_csv(raw / "train.csv", index=False)
    with pytest.raises(InputError) as info:
        _load(raw, DataParams(layout=layout, group_column="group"), tmp_path)
    assert f"{raw / 'train.csv'}: blank 'group' on line(s) 3, 6" in str(info.value)
    assert not (tmp_path / "interim").exists()


@pytest.mark.parametrize("name, fragment", [
    ("n\nl.png", "contains a line break"), ("t\tab.png", "contains a line break or another control character"),
    (" lead.png", "has leading or trailing whitespace")])
def test_test_ids_a_submission_cannot_hold_are_refused_at_load(datasets, tmp_path, name, fragment):
    raw = shutil.copytree(datasets / "folders", tmp_path / "raw")
    first = sorted((raw / "test" / "images").iterdir())[0]
    first.rename(first.with_name(name))
    with pytest.raises(InputError) as info:
        _load(raw, DataParams(layout="folders"), tmp_path)
    assert f"{raw / 'test' / 'images' / name}: id {name[:-4]!r} {fragment}" in str(info.value)




# ---------------------------------------------------------------- training pairs at the root, test truth

def _usgra_like(root, mask_kind="palette", sizes=((24, 32),) * 4):
    """Like a published split: images/ + masks/ at the root (no train/), test/images/ + test/masks/; palette
    masks hold class indices (0 background, 1 object, 2 decoy), binary masks 0/255."""
    rng = np.random.default_rng(0)

    def pair(folder, name, shape, k):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "images" / name)
        labels = np.zeros(shape, np.uint8)
        labels[2:6, 2 + k:8 + k], labels[10:14, 20:26] = 1, 2
        if mask_kind == "palette":
            img = Image.fromarray(labels, "P")
            img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
            img.save(folder / "masks" / name)
        else:
            Image.fromarray((labels == 1).astype(np.uint8) * 255).save(folder / "masks" / name)

    for k, shape in enumerate(sizes):
        pair(root, f"{k:04d}.png", shape, k)
    for k in (7, 9):
        pair(root / "test", f"{k:04d}.png", sizes[0], 0)
    return root


def test_folders_layout_reads_pairs_at_the_root_and_ignores_test_masks(tmp_path):
    from pipeline.data import layouts

    raw = _usgra_like(tmp_path / "raw")
    listing = layouts.scan(raw, DataParams(layout="folders"))
    assert listing.train.id.tolist() == ["0000", "0001", "0002", "0003"]
    assert listing.train.path.tolist() == [str(raw / "images" / f"000{k}.png") for k in range(4)]
    assert listing.train.mask_path.tolist() == [str(raw / "masks" / f"000{k}.png") for k in range(4)]
    assert listing.test.id.tolist() == ["0007", "0009"]
    assert listing.test.path.tolist() == [str(raw / "test" / "images" / n) for n in ("0007.png", "0009.png")]
    assert listing.train.subject.nunique() == 4 and layouts.group_kind(DataParams(layout="folders")) == "image"
    assert layouts.group_kind(DataParams()) == "subject"
    assert layouts.group_kind(DataParams(layout="csv", group_column="patient")) == "subject"


def test_a_train_folder_wins_over_root_images(tmp_path):
    """The one rule: train/images + train/masks when train/ exists; images/ + masks/ at the root otherwise."""
    from pipeline.data import layouts

    raw = _usgra_like(tmp_path / "raw")
    (raw / "train").mkdir()
    assert layouts.train_dir(raw) == raw / "train"
    with pytest.raises(InputError, match=r"train/images: folder not found"):
        layouts.scan(raw, DataParams(layout="folders"))
    (raw / "train").rmdir()
    assert layouts.train_dir(raw) == raw
    shutil.rmtree(raw / "images")
    shutil.rmtree(raw / "masks")
    with pytest.raises(InputError, match=r"train/images: folder not found \(nor images/ at the dataset root\)"):
        layouts.scan(raw, DataParams(layout="folders"))


def test_root_pairs_errors_name_the_root_folders(tmp_path):
    from pipeline.data import layouts

    raw = _usgra_like(tmp_path / "raw", mask_kind="binary")
    (raw / "masks" / "0001.png").rename(raw / "masks" / "0099.png")
    with pytest.raises(InputError) as info:
        layouts.scan(raw, DataParams(layout="folders"))
    assert f"{raw / 'images' / '0001.png'}: image has no mask in masks/" in str(info.value)
    assert f"{raw / 'masks' / '0099.png'}: mask has no image in images/" in str(info.value)


def test_root_pairs_load_end_to_end(tmp_path):
    raw = _usgra_like(tmp_path / "raw", mask_kind="binary")
    summary, manifest, images, masks = _load(raw, DataParams(layout="folders"), tmp_path)
    assert summary["train_images"] == 4 and summary["test_images"] == 2
    assert masks.sum(axis=(1, 2)).tolist() == [24] * 4
    assert (manifest.mask_path[manifest.split == "train"] == [str(raw / "masks" / f"000{k}.png")
                                                               for k in range(4)]).all()


def test_test_mask_paths(tmp_path, datasets):
    from pipeline.data import layouts
    from pipeline.data.io import read_mask

    raw = _usgra_like(tmp_path / "raw")
    data = DataParams(layout="folders", foreground=(1,))
    found = layouts.test_mask_paths(raw, data)
    assert found == {"0007": raw / "test" / "masks" / "0007.png", "0009": raw / "test" / "masks" / "0009.png"}
    assert read_mask(found["0007"], data.foreground).sum() == 24
    # None: another layout, or no test/masks/ folder
    assert layouts.test_mask_paths(raw, DataParams(layout="csv")) is None
    assert layouts.test_mask_paths(datasets / "folders", DataParams(layout="folders")) is None
    assert layouts.test_mask_paths(datasets / "ultrasound", DataParams()) is None
    # the folder exists: test images and masks must pair up
    (raw / "test" / "masks" / "0009.png").rename(raw / "test" / "masks" / "0010.png")
    (raw / "test" / "masks" / "notes.txt").write_text("x")
    (raw / "test" / "masks" / ".DS_Store").write_text("x")
    with pytest.raises(InputError) as info:
        layouts.test_mask_paths(raw, data)
    message = str(info.value)
    assert message.startswith("3 problem(s)")
    assert f"{raw / 'test' / 'images' / '0009.png'}: test image has no mask in test/masks/" in message
    assert f"{raw / 'test' / 'masks' / '0010.png'}: mask has no image in test/images/" in message
    assert f"{raw / 'test' / 'masks' / 'notes.txt'}: not an image file" in message


@pytest.mark.parametrize("layout", ["ultrasound", "folders", "csv"])
def test_special_files_in_a_dataset_are_refused_without_opening_them(datasets, tmp_path, layout):
    """A FIFO, a socket or a device in a dataset folder is named and refused at listing: never opened
    (reading a FIFO would block for ever), whatever its name."""
    import os
    import socket

    raw = tmp_path / layout
    shutil.copytree(datasets / layout, raw)
    train = raw / "train" if layout == "ultrasound" else raw / "train" / "images"
    test = raw / "test" if layout == "ultrasound" else raw / "test" / "images"
    os.mkfifo(train / "9_9.tif")
    os.mkfifo(test / "99.tif")
    os.symlink(os.devnull, train / "8_8_mask.tif")
    data = DataParams(layout=layout, group_column="group" if layout != "ultrasound" else None)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(train / "7_7.tif"))
        with pytest.raises(InputError) as listed:   # listing opens nothing
            layouts.scan(raw, data)
        with pytest.raises(InputError) as info:
            load.run(Params(data=data), raw=raw, out=tmp_path / "interim", metrics=tmp_path / "m.json",
                     fingerprint=tmp_path / "fp.json")
    assert str(listed.value) == str(info.value)
    text = str(info.value)
    assert f"{train / '9_9.tif'}: a FIFO (named pipe), not a regular file or folder" in text
    assert f"{test / '99.tif'}: a FIFO (named pipe), not a regular file or folder" in text
    assert f"{train / '7_7.tif'}: a socket, not a regular file or folder" in text
    assert f"{train / '8_8_mask.tif'}: a character device, not a regular file or folder" in text
    assert not (tmp_path / "interim").exists()
    from pipeline.data import io
    with pytest.raises(InputError, match="a FIFO"):
        io.read_image(train / "9_9.tif")
