import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline.params import (SEED_MAX, Params, ParamsError, TrainParams, UniqueKeyLoader, load_params, parse_params,
                             to_dict)

REPO_PARAMS = Path(__file__).parents[1] / "params.yaml"


def test_params_yaml_equals_the_model_defaults_key_for_key():
    """One place for defaults: params.yaml must say exactly what the code defaults to."""
    from_file = yaml.safe_load(REPO_PARAMS.read_text())
    defaults = to_dict(Params())
    assert list(from_file) == list(defaults)
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert list(from_file[section]) == list(values), section
            for key, value in values.items():
                assert from_file[section][key] == value, f"{section}.{key}"
        else:
            assert from_file[section] == values, section
    assert load_params(REPO_PARAMS) == Params()


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n", "train:\n", "seed: 42\ntrain: {}\n"])
def test_empty_or_partial_file_means_the_params_yaml_values(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path) == load_params(REPO_PARAMS)
    assert to_dict(load_params(path)) == to_dict(load_params(REPO_PARAMS))


def test_partial_file_overrides_only_its_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 7\ntrain:\n  epochs: 2\n")
    p = load_params(path)
    assert (p.seed, p.train.epochs) == (7, 2)
    assert dataclasses.replace(p, seed=42, train=dataclasses.replace(p.train, epochs=8)) == load_params(REPO_PARAMS)


def test_repo_params_yaml_values():
    p = load_params(REPO_PARAMS)
    assert (p.seed, p.train.epochs, p.train.folds, p.train.train_folds) == (42, 8, 4, 4)
    assert p.train.decoder_channels == (128, 64, 32, 16, 8) and isinstance(p.train.decoder_channels, tuple)
    assert p.data.submission_columns == ("img", "pixels") and isinstance(p.data.submission_columns, tuple)
    assert p.data.rle_start == 1 and type(p.data.rle_start) is int
    assert p.tune.min_areas == "auto" and p.tune.min_area_fractions[-1] == 0.012
    assert isinstance(p.tune.pixel_thresholds, tuple)
    assert (p.train.height, p.train.width, p.dedup.grid, p.dedup.scope) == ("auto", "auto", "auto", "auto")


def test_defaults_round_trip_through_yaml():
    p = Params()
    assert parse_params(yaml.safe_load(yaml.safe_dump(to_dict(p)))) == p


def test_to_dict_is_plain_json():
    d = to_dict(Params())
    assert d["train"]["decoder_channels"] == [128, 64, 32, 16, 8] and type(d["train"]["decoder_channels"]) is list
    assert json.loads(json.dumps(d)) == d
    assert list(to_dict(TrainParams())) == [f.name for f in dataclasses.fields(TrainParams)]  # the resume hash input


def test_params_are_frozen_and_replace_revalidates():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1  # type: ignore[misc]
    assert hash(p) == hash(Params())
    assert dataclasses.replace(p.train, epochs=3).epochs == 3
    with pytest.raises(ValueError):
        dataclasses.replace(p.train, epochs=0)


@pytest.mark.parametrize("raw, key", [
    ({"synth": {"subject": 3}}, "synth.subject"),                 # unknown key (typo)
    ({"sinth": {}}, "sinth"),                                     # unknown section
    ({"synth": {"subjects": "many"}}, "synth.subjects"),          # wrong type
    ({"synth": {"subjects": 2.5}}, "synth.subjects"),             # float for int
    ({"synth": {"empty_fraction": 1.5}}, "synth.empty_fraction"),  # out of range
    ({"seed": True}, "seed"),                                     # bool is not an int
    ({"data": {"raw_dir": ""}}, "data.raw_dir"),                  # empty string
    ({"synth": 3}, "synth"),                                      # section not a mapping
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(raw)


@pytest.mark.parametrize("raw, message", [
    ({"seed": -1}, "seed: -1 is out of range (must be >= 0)"),
    ({"seed": 2**32}, f"seed: {2**32} is out of range (must be <= {SEED_MAX})"),
    ({"seed": 1e20}, f"seed: expected an integer from 0 to {SEED_MAX}, got 1e+20"),
    ({"seed": 42.0}, f"seed: expected an integer from 0 to {SEED_MAX}, got 42.0"),
    ({"train": {"decoder_channels": [0, 0, 0, 0, 0]}}, "train.decoder_channels[0]: 0 is out of range (must be >= 1)"),
    ({"train": {"encoder_depth": 3}},
     "train.decoder_channels: needs 3 entries (one per train.encoder_depth level), got 5"),
    ({"train": {"folds": 2}}, "train.train_folds: 4 is more than train.folds (2)"),
    ({"train": {"amp": 1}}, "train.amp: expected true or false, got 1"),
    ({"train": {"lr": float("inf")}}, "train.lr: expected a finite number > 0.0, got inf"),
    ({"augment": {"gamma_low": 130}}, "augment.gamma_low: 130.0 must not exceed augment.gamma_high (120.0)"),
    ({"data": {"submission_columns": ["img", "img"]}},
     "data.submission_columns: ['img', 'img'] needs exactly two different names (id column, RLE column)"),
    ({"data": {"submission_columns": ["img", ""]}}, "data.submission_columns[1]: expected a non-empty string, got ''"),
    ({"data": {"rle_start": 1.0}}, "data.rle_start: 1.0 is not one of 0 or 1"),
    ({"data": {"rle_start": True}}, "data.rle_start: True is not one of 0 or 1"),
    ({"clean": {"policy": "drop_all"}}, "clean.policy: 'drop_all' is not one of 'none', 'drop_empty' or 'drop_both'"),
    ({"tune": {"min_areas": [10.5]}}, "tune.min_areas[0]: expected an integer, got 10.5 (or auto)"),
    ({"train": {"height": 20}}, "train.height: 20 is out of range (must be >= 32) (or auto)"),
    ({"synth": {"subjcts": 3}}, "unknown key in 'synth': synth.subjcts (known: subjects, frames_per_subject, "
                                "test_images, height, width, empty_fraction, label_noise, layout)"),
    ([1], "params: expected a mapping, got [1]"),
])
def test_each_problem_is_one_clear_line(raw, message):
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert str(info.value) == message


def test_several_problems_each_get_a_line_naming_its_key():
    with pytest.raises(ParamsError) as info:
        parse_params({"seed": "x", "synth": {"subjects": 1, "height": 3.0}})
    assert str(info.value).splitlines() == [f"seed: expected an integer from 0 to {SEED_MAX}, got 'x'",
                                            "synth.subjects: 1 is out of range (must be >= 2)",
                                            "synth.height: expected an integer >= 32, got 3.0"]


def test_int_accepted_for_float():
    value = parse_params({"synth": {"label_noise": 0}}).synth.label_noise
    assert value == 0.0 and type(value) is float


@pytest.mark.parametrize("text, message", [
    ("seed: 1\ntrain:\n  epochs: 2\n  epochs: 3\n", "line 4: duplicate key 'train.epochs' (first given on line 3)"),
    ("train:\n  epochs: 2\nseed: 3\ntrain:\n  lr: 0.1\n", "line 4: duplicate key 'train' (first given on line 1)"),
    ("seed: 1\nseed: 1\n", "line 2: duplicate key 'seed' (first given on line 1)"),
])
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: {message}"


def test_unique_key_loader_still_loads_anchors_and_merges():
    text = "base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\nsame: *b\n"
    assert yaml.load(text, Loader=UniqueKeyLoader) == {"base": {"x": 1}, "other": {"x": 1, "y": 2}, "same": {"x": 1}}


def test_unreadable_params_paths(tmp_path):
    with pytest.raises(ParamsError, match=r"is a directory, not a params file"):
        load_params(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"seed: \xff\n")
    with pytest.raises(ParamsError) as info:
        load_params(binary)
    assert str(info.value) == f"{binary}: not UTF-8 text (byte 0xff at offset 6)"


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("synth:\n  subjcts: 3\n")
    with pytest.raises(ParamsError, match=r"typo\.yaml.*synth\.subjcts"):
        load_params(typo)


def test_foreground_labels_and_object_name():
    """data.foreground: null (binary masks) or a non-empty list of label values 0..65535; object_name: words."""
    defaults = Params().data
    assert defaults.foreground is None and defaults.object_name == "nerve"
    data = parse_params({"data": {"foreground": [1, 2], "object_name": "salt"}}).data
    assert data.foreground == (1, 2) and isinstance(data.foreground, tuple) and data.object_name == "salt"
    assert parse_params({"data": {"foreground": [65535]}}).data.foreground == (65535,)
    assert parse_params({"data": {"foreground": None}}).data.foreground is None
    for raw, message in [
        ([], "data.foreground: expected a non-empty list, got []"),
        (1, "data.foreground: expected a non-empty list, got 1"),
        ([70000], "data.foreground[0]: 70000 is out of range (must be <= 65535)"),
        ([-1], "data.foreground[0]: -1 is out of range (must be >= 0)"),
        ([1.0], "data.foreground[0]: expected an integer"),
        ([True], "data.foreground[0]: expected an integer"),
    ]:
        with pytest.raises(ParamsError) as info:
            parse_params({"data": {"foreground": raw}})
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(ParamsError, match="data.object_name: expected a non-empty string"):
        parse_params({"data": {"object_name": ""}})
