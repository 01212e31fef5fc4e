from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, parse_params, to_dict


def test_repo_params_yaml_is_valid():
    p = load_params(Path(__file__).parents[1] / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.raw_dir


def test_defaults_round_trip_through_yaml():
    p = Params()
    assert parse_params(yaml.safe_load(yaml.safe_dump(to_dict(p)))) == p


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


def test_int_accepted_for_float():
    assert parse_params({"synth": {"label_noise": 0}}).synth.label_noise == 0.0


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
