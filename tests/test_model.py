"""The model contract shared by train and predict: shapes, both heads, preprocessing (checkpoints:
tests/test_checkpoints.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL as TINY
from pipeline.model.network import (SideOutputs, bare, build_model, preprocess, split_outputs, split_training_outputs,
                                    to_native, trainable)


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


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_presence_pooling_decides_how_the_head_reads_the_deepest_features(pooling: str) -> None:
    """train.presence_pooling: the presence logit is the head's linear layer applied to the mean
    (avg) or the largest value (max) of each channel of the encoder's deepest feature map."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, presence_pooling=pooling)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        deepest = model.encoder(x)[-1]
        pooled = deepest.amax(dim=(2, 3)) if pooling == "max" else deepest.mean(dim=(2, 3))
        expected = model.classification_head[3](pooled).reshape(-1)
        _, presence_logit = split_outputs(model(x))
    assert torch.allclose(presence_logit, expected, atol=1e-5)
    other = deepest.mean(dim=(2, 3)) if pooling == "max" else deepest.amax(dim=(2, 3))
    assert not torch.allclose(presence_logit, model.classification_head[3](other).reshape(-1), atol=1e-3)


def test_deep_supervision_adds_side_logits_in_training_and_leaves_the_model_as_it_was() -> None:
    """With train.deep_supervision the trained module returns the U-Net's own outputs plus one logit map per
    inner decoder block (finest first, the coarsest left out); the U-Net alone, which is saved and exported,
    is unchanged and carries none of the heads."""
    t = dataclasses.replace(TINY, encoder_depth=4, decoder_channels=(32, 16, 8, 4), deep_supervision=True)
    torch.manual_seed(0)
    model = build_model(t).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        alone = split_outputs(model(x))
        wrapped = trainable(model, t).eval()
        mask_logits, presence_logit, sides = split_training_outputs(wrapped(x))
        again = split_outputs(model(x))
    assert isinstance(wrapped, SideOutputs) and bare(wrapped) is model
    assert [tuple(s.shape) for s in sides] == [(2, 1, 32, 32), (2, 1, 16, 16)]
    assert torch.equal(mask_logits, alone[0]) and torch.equal(presence_logit, alone[1])
    assert torch.equal(again[0], alone[0])  # the hooks capture only inside the wrapper
    assert not any("heads" in k for k in model.state_dict())
    assert any(k.startswith("heads.") for k in wrapped.state_dict())
    plain = dataclasses.replace(t, deep_supervision=False)
    assert trainable(model, plain) is model and split_training_outputs(model(x))[2] == []


def test_preprocess_normalises_and_resizes_and_to_native_restores_the_grid() -> None:
    images = np.full((2, 42, 58), 51, np.uint8)
    x = preprocess(images, (64, 64), mean=0.1, std=0.5)
    assert x.shape == (2, 1, 64, 64)
    assert torch.allclose(x, torch.full_like(x, (51 / 255 - 0.1) / 0.5), atol=1e-5)
    assert to_native(torch.sigmoid(x), (42, 58)).shape == (2, 42, 58)


def test_unknown_encoder_names_the_key_and_close_names() -> None:
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match=r"^train.encoder: unknown encoder 'resnet81'; did you mean resnet18") as err:
        build_model(dataclasses.replace(TINY, encoder="resnet81"))
    assert "\n" not in str(err.value)
    with pytest.raises(ParamsError, match=r"train.encoder: unknown encoder 'tu-resnet188'; did you mean tu-resnet18"):
        build_model(dataclasses.replace(TINY, encoder="tu-resnet188"))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_encoder_weights_from_a_local_file_load_offline(tmp_path, in_channels: int) -> None:
    """The Kaggle way: a file with the smp encoder's state_dict (3-channel, as saved from a default
    smp.Unet) loads into the encoder; the first convolution is adapted like smp adapts imagenet's."""
    torch.manual_seed(0)
    source = build_model(TINY, in_channels=3).encoder
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # nothing a fresh model would start with
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save(saved, tmp_path / "resnet18.pth")
    model = build_model(dataclasses.replace(TINY, encoder_weights=str(tmp_path / "resnet18.pth")), in_channels)
    loaded = model.encoder.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        if key == "conv1.weight" and in_channels == 1:
            assert torch.allclose(loaded[key], value.sum(1, keepdim=True)), key
        else:
            assert torch.equal(loaded[key], value), key


def test_bad_encoder_weight_files_are_one_clear_error(tmp_path) -> None:
    from pipeline.params import ParamsError

    def build(path):
        return build_model(dataclasses.replace(TINY, encoder_weights=str(path)))

    with pytest.raises(ParamsError, match=r"^train.encoder_weights: .*missing.pth: no such file"):
        build(tmp_path / "missing.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ParamsError, match=r"^train.encoder_weights: .*list.pth: not a state dict"):
        build(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ParamsError, match=r"^train.encoder_weights: .*junk.pth: not a readable tensor state dict"):
        build(tmp_path / "junk.pth")
    other = build_model(dataclasses.replace(TINY, encoder="resnet34")).encoder.state_dict()
    torch.save(other, tmp_path / "resnet34.pth")
    with pytest.raises(ParamsError, match=r"^train.encoder_weights: .*resnet34.pth: does not fit .*unexpected keys") \
            as err:
        build(tmp_path / "resnet34.pth")
    assert "\n" not in str(err.value)
    own = build_model(TINY).encoder.state_dict()
    torch.save({k: v for k, v in own.items() if k != "conv1.weight"}, tmp_path / "partial.pth")
    with pytest.raises(ParamsError, match=r"partial.pth: does not fit .*\(1 missing keys \(e.g. conv1.weight\)\)"):
        build(tmp_path / "partial.pth")


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_instance_norm_normalises_each_image_alone(norm: str) -> None:
    """`train.norm: instance` (nnU-Net's) leaves no BatchNorm, and in training an image's output no longer
    depends on the other images of its batch; with BatchNorm it does (so the check can fail)."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, norm=norm)).train()
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        together = split_outputs(model(x))[0][:1]
        alone = split_outputs(model(x[:1].repeat(2, 1, 1, 1)))[0][:1]
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    per_image = sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == m.num_channels for m in model.modules())
    if norm == "instance":
        assert batch_norms == 0 and per_image > 10
        assert torch.allclose(together, alone, atol=1e-5)
    else:
        assert batch_norms > 10 and per_image == 0
        assert not torch.allclose(together, alone, atol=1e-3)
