"""The model contract shared by train and predict: shapes, both heads, preprocessing, checkpoints."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.model import CheckpointError, build_model, load_checkpoint, preprocess, save_checkpoint, split_outputs, to_native
from pipeline.params import TrainParams

TINY = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 4), encoder_weights="none",
                   height=64, width=64)


@pytest.mark.parametrize("presence_head", [True, False])
def test_outputs_have_mask_and_presence_shapes(presence_head: bool) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, presence_head=presence_head)).eval()
    with torch.no_grad():
        mask_logits, presence_logit = split_outputs(model(torch.randn(3, 1, 64, 64)))
    assert mask_logits.shape == (3, 1, 64, 64)
    assert presence_logit.shape == (3,)
    if not presence_head:  # without the head, presence means "the most confident pixel"
        assert torch.equal(presence_logit, mask_logits.amax(dim=(1, 2, 3)))


def test_presence_head_is_a_separate_output() -> None:
    out = build_model(TINY).eval()(torch.randn(2, 1, 64, 64))
    assert isinstance(out, tuple) and len(out) == 2


def test_preprocess_normalises_and_resizes_and_to_native_restores_the_grid() -> None:
    images = np.full((2, 42, 58), 51, np.uint8)
    x = preprocess(images, (64, 64), mean=0.1, std=0.5)
    assert x.shape == (2, 1, 64, 64)
    assert torch.allclose(x, torch.full_like(x, (51 / 255 - 0.1) / 0.5), atol=1e-5)
    assert to_native(torch.sigmoid(x), (42, 58)).shape == (2, 42, 58)


def test_checkpoint_roundtrip_gives_the_same_outputs(tmp_path) -> None:
    torch.manual_seed(1)
    model = build_model(TINY).eval()
    save_checkpoint(tmp_path / "m.pt", model, TINY, {"mean": 0.3, "std": 0.2}, epoch=3)
    loaded, state = load_checkpoint(tmp_path / "m.pt", expect=TINY)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(split_outputs(model(x)), split_outputs(loaded.eval()(x))):
            assert torch.equal(a, b)
    assert state["norm"] == {"mean": 0.3, "std": 0.2} and state["epoch"] == 3


def test_checkpoint_for_another_config_is_refused(tmp_path) -> None:
    save_checkpoint(tmp_path / "m.pt", build_model(TINY), TINY, {"mean": 0.3, "std": 0.2})
    other = dataclasses.replace(TINY, decoder_channels=(32, 16, 8))
    with pytest.raises(CheckpointError, match="decoder_channels"):
        load_checkpoint(tmp_path / "m.pt", expect=other)


def test_unknown_encoder_names_the_key_and_close_names() -> None:
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match=r"^train.encoder: unknown encoder 'resnet81'; did you mean resnet18") as err:
        build_model(dataclasses.replace(TINY, encoder="resnet81"))
    assert "\n" not in str(err.value)
    with pytest.raises(ParamsError, match=r"train.encoder: unknown encoder 'tu-resnet188'; did you mean tu-resnet18"):
        build_model(dataclasses.replace(TINY, encoder="tu-resnet188"))


def test_checkpoints_hold_plain_data_only(tmp_path) -> None:
    """numpy values are converted when saving; objects that would need code to unpickle are refused then."""
    model = build_model(TINY)
    save_checkpoint(tmp_path / "m.pt", model, TINY, {"mean": np.float64(0.3), "std": 0.2},
                    extra={"a": np.arange(3), "b": np.int64(4), "c": (1, None, "x")})
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert type(state["norm"]["mean"]) is float and state["extra"]["b"] == 4 and type(state["extra"]["b"]) is int
    assert torch.equal(state["extra"]["a"], torch.arange(3)) and state["extra"]["c"] == (1, None, "x")
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]: a TrainParams cannot go into a checkpoint"):
        save_checkpoint(tmp_path / "bad.pt", model, TINY, {"mean": 0.3, "std": 0.2}, extra=TINY)
    assert not (tmp_path / "bad.pt").exists()
