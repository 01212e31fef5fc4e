"""The U-Net with a mask-presence head, its input transform and its checkpoints.

Everything that must agree between training and prediction lives here: how the
model is built from params, how its outputs are unpacked, how images are
normalised and resized, and what a checkpoint holds.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io import atomic_path
from pipeline.params import TrainParams, _build

MODEL_KEYS = ("encoder", "encoder_depth", "decoder_channels", "encoder_weights", "presence_head", "height", "width")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the current configuration."""


def build_model(t: TrainParams, in_channels: int = 1) -> torch.nn.Module:
    """smp U-Net; `in_channels` follows the data (1 for gray, 3 for `data.channels: rgb`)."""
    import segmentation_models_pytorch as smp

    aux = dict(classes=1, dropout=0.2) if t.presence_head else None
    return smp.Unet(encoder_name=t.encoder, encoder_depth=t.encoder_depth,
                    encoder_weights=None if t.encoder_weights == "none" else t.encoder_weights,
                    decoder_channels=list(t.decoder_channels), in_channels=in_channels, classes=1, aux_params=aux)


def input_channels(model: torch.nn.Module) -> int:
    """Channels the network takes: those of its first convolution."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def split_outputs(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_logits (N,1,h,w), presence_logit (N,)) from the model's output, the one place this is done.

    Without a presence head the presence logit is the highest pixel logit, so presence gating
    still means "is any pixel confident".
    """
    if isinstance(output, (tuple, list)):
        mask_logits, label_logits = output
        return mask_logits, label_logits.reshape(-1)
    return output, output.amax(dim=(1, 2, 3))


def model_config(t: TrainParams, in_channels: int = 1) -> dict[str, Any]:
    """The params that decide the network's shape: a checkpoint is only valid for the same ones."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(t).items() if k in MODEL_KEYS}
    return {**config, "in_channels": in_channels}


def channels_first(batch: np.ndarray) -> torch.Tensor:
    """A numpy batch (N,H,W) or channels-last (N,H,W,C) -> tensor (N,C,H,W), same dtype."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def preprocess(images: np.ndarray, size: tuple[int, int], mean: float, std: float) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,C) -> normalised float (N,C,h,w) at the working size."""
    x = channels_first(images).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


def to_native(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resize (N,1,h,w) probabilities back to the native (N,H,W) grid exactly."""
    if tuple(probs.shape[-2:]) != tuple(shape):
        probs = F.interpolate(probs.float(), size=shape, mode="bilinear", align_corners=False)
    return probs[:, 0]


def save_checkpoint(path: str | Path, model: torch.nn.Module, t: TrainParams, norm: dict[str, float],
                    **extra: Any) -> None:
    """Atomically save weights with everything needed to rebuild and feed the model."""
    state = {"model": model.state_dict(), "config": model_config(t, input_channels(model)), "norm": dict(norm),
             **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect: TrainParams | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint; with `expect`, refuse one saved for another model config."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(state, dict) or not {"model", "config", "norm"} <= set(state):
        raise CheckpointError(f"{path}: not a pipeline checkpoint (missing model/config/norm)")
    config = dict(state["config"])
    in_channels = config.pop("in_channels", 1)
    if expect is not None and config != {k: v for k, v in model_config(expect).items() if k != "in_channels"}:
        diff = {k: (config.get(k), v) for k, v in model_config(expect).items() if k in config and config[k] != v}
        raise CheckpointError(f"{path}: saved for a different model config: "
                              + ", ".join(f"train.{k} was {a!r}, params say {b!r}" for k, (a, b) in diff.items()))
    try:
        t = _build(TrainParams, config, "train")
        model = build_model(dataclasses.replace(t, encoder_weights="none"), in_channels)
        model.load_state_dict(state["model"])
    except Exception as exc:  # noqa: BLE001 - unknown encoder, config keys or weights that do not fit it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its weights do not fit its saved model config ({first[:300]})") from None
    return model, state
