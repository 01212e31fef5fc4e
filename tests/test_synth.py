import numpy as np
import pandas as pd
from PIL import Image

from pipeline.data import rle
from pipeline.stages import synth
from pipeline.params import Params, SynthParams


def _read(path):
    with Image.open(path) as img:
        return img.info.get("compression"), np.asarray(img)


def test_kaggle_layout_and_format(tiny_raw):
    train = sorted(p.name for p in (tiny_raw / "train").iterdir())
    assert len(train) == 2 * 3 * 10
    assert "1_1.tif" in train and "1_1_mask.tif" in train and "3_10_mask.tif" in train
    assert sorted(int(p.stem) for p in (tiny_raw / "test").iterdir()) == list(range(1, 7))
    compression, image = _read(tiny_raw / "train" / "1_1.tif")
    assert compression == "tiff_lzw"
    assert image.dtype == np.uint8 and image.shape == (96, 128)
    _, mask = _read(tiny_raw / "train" / "1_1_mask.tif")
    assert set(np.unique(mask)) <= {0, 255}


def test_default_size_is_kaggle_size(tmp_path):
    synth.run(Params(seed=0, synth=SynthParams(subjects=2, frames_per_subject=2, test_images=1)), out=tmp_path / "d")
    _, image = _read(tmp_path / "d" / "train" / "1_1.tif")
    assert image.shape == (420, 580)


def test_truth_records_corruption_and_twins(tiny_raw):
    truth = pd.read_csv(tiny_raw / "truth" / "train_truth.csv", keep_default_na=False)
    corrupted = truth[truth.corrupted]
    assert len(corrupted) > 0
    # every corrupted frame shows a nerve, has an empty mask file, and is the twin of a masked frame
    assert corrupted.visible.all() and (corrupted.twin_of != "").all()
    by_id = truth.set_index("id")
    for row in corrupted.itertuples():
        _, mask = _read(tiny_raw / "train" / f"{row.id}_mask.tif")
        assert mask.max() == 0
        assert by_id.loc[row.twin_of, "visible"]
    # frames marked visible and not corrupted carry a mask
    ok = truth[truth.visible & ~truth.corrupted].iloc[0]
    assert _read(tiny_raw / "train" / f"{ok.id}_mask.tif")[1].max() == 255


def test_twins_are_near_identical_and_contradictory(tiny_raw):
    truth = pd.read_csv(tiny_raw / "truth" / "train_truth.csv", keep_default_na=False)
    row = truth[truth.corrupted].iloc[0]
    a = _read(tiny_raw / "train" / f"{row.id}.tif")[1].astype(float)
    b = _read(tiny_raw / "train" / f"{row.twin_of}.tif")[1].astype(float)
    assert np.abs(a - b).mean() < 3.0


def test_test_truth_decodes_to_plausible_masks(tiny_raw):
    masks = pd.read_csv(tiny_raw / "truth" / "test_masks.csv", keep_default_na=False)
    assert sorted(masks.img) == list(range(1, 7))
    decoded = [rle.decode(p, (96, 128)) for p in masks.pixels]
    assert all(m.shape == (96, 128) for m in decoded)


def test_deterministic_from_seed(tmp_path):
    p = SynthParams(subjects=2, frames_per_subject=3, test_images=2, height=64, width=64)
    synth.run(Params(seed=1, synth=p), out=tmp_path / "a")
    synth.run(Params(seed=1, synth=p), out=tmp_path / "b")
    synth.run(Params(seed=2, synth=p), out=tmp_path / "c")
    a, b, c = (_read(tmp_path / d / "train" / "2_3.tif")[1] for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_empty_fraction_near_target(tmp_path):
    p = SynthParams(subjects=6, frames_per_subject=40, test_images=1, height=64, width=80,
                    empty_fraction=0.58, label_noise=0.12)
    summary = synth.run(Params(seed=3, synth=p), out=tmp_path / "d")
    assert 0.45 <= summary["train_empty_fraction"] <= 0.7
    assert summary["corrupted"] > 0


def test_another_dataset_means_no_generation(tmp_path):
    """dvc repro on a user's dataset: data.raw_dir elsewhere, so synth writes only its note, at once."""
    import time

    import yaml

    from pipeline.params import load_params

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"data": {"raw_dir": str(tmp_path / "mine")}}))
    params = load_params(params_file)  # full-size defaults: generating would take many seconds
    start = time.perf_counter()
    summary = synth.run(params, out=tmp_path / "synthetic")
    assert time.perf_counter() - start < 1.0
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [synth.NOTE]
    assert "no synthetic data was generated" in summary["skipped"]
    assert str(tmp_path / "mine") in (tmp_path / "synthetic" / synth.NOTE).read_text()
    assert not synth.generates(params, tmp_path / "synthetic")


def test_generation_when_raw_dir_is_the_synthetic_folder(tmp_path, monkeypatch):
    from pipeline.params import DataParams

    p = SynthParams(subjects=2, frames_per_subject=2, test_images=1, height=32, width=32)
    assert DataParams().raw_dir == synth.SYNTH_DIR          # the default reads what synth writes
    assert synth.generates(Params(synth=p), tmp_path / "anywhere")
    own = Params(data=DataParams(raw_dir=str(tmp_path / "d")), synth=p)
    assert synth.generates(own, tmp_path / "d") and synth.generates(own, tmp_path / "x" / ".." / "d")
    synth.run(own, out=tmp_path / "d")
    assert (tmp_path / "d" / "train" / "1_1.tif").exists() and not (tmp_path / "d" / synth.NOTE).exists()
    monkeypatch.chdir(tmp_path)   # data.raw_dir relative to the working directory, as in dvc repro
    assert synth.generates(Params(data=DataParams(raw_dir="./data/raw/synthetic/"), synth=p), "elsewhere")
    assert not synth.generates(Params(data=DataParams(raw_dir="data/raw/other"), synth=p), "data/raw/synthetic")


def test_dvc_synth_stage_writes_the_default_raw_dir_and_tracks_it():
    from pathlib import Path

    import yaml

    stage = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]["synth"]
    assert stage["outs"] == [synth.SYNTH_DIR] and f"--out {synth.SYNTH_DIR}" in stage["cmd"]
    assert "data.raw_dir" in stage["params"]
