"""The U-Net with a mask-presence head and its input transform.

Everything that must agree between training and prediction lives here: how the
model is built from params, how its outputs are unpacked, and how images are
normalised and resized. What a checkpoint holds is `pipeline/checkpoints.py`.
"""
from __future__ import annotations

import difflib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.params import ParamsError, TrainParams


def check_encoder(name: str) -> None:
    """Refuse an encoder smp does not know, naming the closest known ones (before any training work).

    Known: smp's own encoder names, and `tu-<model>` for any timm model."""
    import segmentation_models_pytorch as smp

    known = list(smp.encoders.get_encoder_names())
    if name in known:
        return
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return
        close = [f"tu-{m}" for m in difflib.get_close_matches(name[3:], timm.list_models(), n=3)]
    else:
        close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ParamsError(f"train.encoder: unknown encoder {name!r}; {hint}(one of the {len(known)} "
                      f"segmentation_models_pytorch encoders, or tu-<timm model name>)")


def build_model(t: TrainParams, in_channels: int = 1) -> torch.nn.Module:
    """smp U-Net; `in_channels` follows the data (1 for gray, 3 for `data.channels: rgb`)."""
    import segmentation_models_pytorch as smp

    check_encoder(t.encoder)
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


def channels_first(batch: np.ndarray) -> torch.Tensor:
    """A numpy batch (N,H,W) or channels-last (N,H,W,C) -> tensor (N,C,H,W), same dtype."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def fitted_size(native: tuple[int, int], size: tuple[int, int], resize: str) -> tuple[int, int]:
    """Where a native image lands in the working canvas: all of it (stretch), or its aspect ratio
    kept, never enlarged, in the top-left corner (pad; the rest is reflect-padded)."""
    if resize == "stretch":
        return tuple(size)
    scale = min(1.0, size[0] / native[0], size[1] / native[1])
    return max(1, round(native[0] * scale)), max(1, round(native[1] * scale))


def preprocess(images: np.ndarray, size: tuple[int, int], mean: float, std: float,
               resize: str = "stretch") -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,C) of one native size -> normalised float (N,C,h,w) at the working size."""
    x = channels_first(images).float().div_(255.0)
    inner = fitted_size(tuple(x.shape[-2:]), size, resize)
    if tuple(x.shape[-2:]) != inner:
        x = F.interpolate(x, size=inner, mode="bilinear", align_corners=False, antialias=True)
    if inner != tuple(size):  # pad: reflect where the image is large enough, else repeat its edge
        pad = (0, size[1] - inner[1], 0, size[0] - inner[0])
        x = F.pad(x, pad, mode="reflect" if max(pad) < min(inner) else "replicate")
    return (x - mean) / std


def to_native(probs: torch.Tensor, shape: tuple[int, int], resize: str = "stretch") -> torch.Tensor:
    """(N,1,h,w) probabilities at the working size -> (N,H,W) on the native grid of `shape` exactly."""
    inner = fitted_size(tuple(shape), tuple(probs.shape[-2:]), resize)
    probs = probs[..., :inner[0], :inner[1]]
    if tuple(probs.shape[-2:]) != tuple(shape):
        probs = F.interpolate(probs.float(), size=shape, mode="bilinear", align_corners=False)
    return probs[:, 0]
