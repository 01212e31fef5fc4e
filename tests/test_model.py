"""The model contract shared by train and predict: shapes, both heads, preprocessing (checkpoints:
tests/test_checkpoints.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL as TINY
from pipeline.model import build_model, preprocess, split_outputs, to_native


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


def test_unknown_encoder_names_the_key_and_close_names() -> None:
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match=r"^train.encoder: unknown encoder 'resnet81'; did you mean resnet18") as err:
        build_model(dataclasses.replace(TINY, encoder="resnet81"))
    assert "\n" not in str(err.value)
    with pytest.raises(ParamsError, match=r"train.encoder: unknown encoder 'tu-resnet188'; did you mean tu-resnet18"):
        build_model(dataclasses.replace(TINY, encoder="tu-resnet188"))
