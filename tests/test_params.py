import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline.params import (SEED_MAX, Params, ParamsError, TrainParams, UniqueKeyLoader, load_params, parse_params,
                             to_dict, with_settings)

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
    assert dataclasses.replace(p, seed=42, train=dataclasses.replace(p.train, epochs="auto")) == load_params(REPO_PARAMS)


def test_repo_params_yaml_values():
    p = load_params(REPO_PARAMS)
    assert (p.seed, p.train.epochs, p.train.folds, p.train.train_folds, p.train.budget) == (42, "auto", 4, "auto", "auto")
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
    ({"train": {"folds": 2, "train_folds": 4}}, "train.train_folds: 4 is more than train.folds (2)"),
    ({"train": {"budget": 1000, "budget_minutes": 5.0}}, "train.budget_minutes: 5.0 is set, and so is train.budget (1000): set one of them"),
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


@pytest.mark.parametrize("text, expected", [
    ("train:\n  lr: 1e-5\n", 1e-5), ("train:\n  lr: 1e-05\n", 1e-5), ("train:\n  lr: 1E-3\n", 1e-3),
    ("train:\n  lr: 2.5e-4\n", 2.5e-4), ("train:\n  lr: 1.0e-5\n", 1e-5), ("train:\n  lr: 5e+0\n", 5.0),
    ("train:\n  lr: 0.00001\n", 1e-5), ("train:\n  lr: .5e-3\n", 5e-4)])
def test_scientific_notation_is_a_number(tmp_path, text, expected):
    """YAML 1.1 reads `1e-5` as a string; DVC's `-S train.lr=1e-5` and people write it as a number."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path).train.lr == expected
    assert yaml.load(text, Loader=UniqueKeyLoader)["train"]["lr"] == expected


def test_scientific_notation_in_an_integer_key_is_still_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1e3\ntrain:\n  epochs: 1e1\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).splitlines() == [f"{path}: seed: expected an integer from 0 to 4294967295, got 1000.0",
                                            f"{path}: train.epochs: expected an integer, got 10.0 (or auto)"]


def test_dvc_exp_run_set_small_floats_end_to_end(tmp_path):
    """The README's `dvc exp run -S` workflow: DVC writes `lr: 1e-05` into params.yaml, and a stage that
    loads the params with our loader must read it as the number it is (a tiny DVC project, one stage)."""
    import os
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    dvc = Path(sys.executable).with_name("dvc")
    git = shutil.which("git")
    if git is None or not dvc.exists():
        pytest.skip("needs git and dvc")
    shutil.copy(REPO_PARAMS, tmp_path / "params.yaml")
    (tmp_path / "stage.py").write_text(
        "import json\nfrom pipeline.params import load_params\n\nt = load_params().train\n"
        "json.dump({'lr': t.lr, 'weight_decay': t.weight_decay}, open('out.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"read": {
        "cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "params": ["train.lr", "train.weight_decay"],
        "outs": ["out.json"]}}}))
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    for args in ([git, "init", "-q"], [str(dvc), "init", "-q"], [git, "add", "-A"],
                 [git, "commit", "-qm", "init"]):
        assert sh(*args).returncode == 0, args
    result = sh(str(dvc), "exp", "run", "-S", "train.lr=1e-5", "-S", "train.weight_decay=0.00001")
    assert result.returncode == 0, result.stdout + result.stderr
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]
    assert written["lr"] in ("1e-05", "1e-5")    # DVC writes it so that YAML 1.1 reads a string
    assert json.loads((tmp_path / "out.json").read_text()) == {"lr": 1e-5, "weight_decay": 1e-5}


def test_alias_bomb_huge_values_and_deep_nesting_end_in_one_short_line(tmp_path):
    """No MemoryError, no 72 MB error line: the file size and expanded aliases are bounded, and an error
    echoes at most a few dozen characters of a value."""
    path = tmp_path / "params.yaml"
    names = "abcdefghij"
    path.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip(names, names[1:])))
    with pytest.raises(ParamsError, match=r"more than 100,000 values once YAML aliases are expanded") as info:
        load_params(path)
    assert "\n" not in str(info.value)
    path.write_text("x: &x [*x]\n")
    with pytest.raises(ParamsError, match="YAML aliases"):
        load_params(path)
    path.write_text("seed: '" + "x" * 500_000 + "'\ntrain:\n  " + "k" * 1000 + ": 1\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(len(line) < 600 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith(f"{path}: seed: expected an integer") and "(500,002 characters)" in lines[0]
    path.write_text("data:\n  raw_dir: '" + "x" * 2_000_000 + "'\n")
    with pytest.raises(ParamsError, match=r"2,000,020 bytes; a params file is at most 1,048,576"):
        load_params(path)
    path.write_text("train:\n  decoder_channels: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert len(str(info.value)) < 600


def test_a_fifo_is_not_read_as_params(tmp_path):
    import os

    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ParamsError, match="not a regular file"):
        load_params(fifo)


def test_with_settings_changes_keys_parsed_and_validated_as_params_yaml():
    changed = with_settings(Params(), ["train.weight_decay=3e-5"])
    assert changed.train.weight_decay == 3e-5 and changed.train.lr == Params().train.lr
    assert with_settings(Params(), ["tune.keep_largest=[false]"]).tune.keep_largest == (False,)
    assert with_settings(Params(), []) == Params()
    for setting in ("train.nope=1", "train=1", "seed.x=1", "train.lr"):
        with pytest.raises(ParamsError, match="section.key=value"):
            with_settings(Params(), [setting])
    with pytest.raises(ParamsError):  # bad YAML is a ParamsError, not PyYAML's own exception
        with_settings(Params(), ["train.lr=[1"])
    with pytest.raises(ValueError, match="loss"):
        with_settings(Params(), ["train.loss=hinge"])


def test_with_settings_validates_once_all_are_in():
    """A depth and the decoder widths it needs are valid together, not one at a time."""
    both = ["train.encoder_depth=4", "train.decoder_channels=[128,64,32,16]"]
    changed = with_settings(Params(), both)
    assert changed.train.encoder_depth == 4 and changed.train.decoder_channels == (128, 64, 32, 16)
    with pytest.raises(ValueError, match="decoder_channels"):
        with_settings(Params(), both[:1])
