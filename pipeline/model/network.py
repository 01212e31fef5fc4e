"""The U-Net with a mask-presence head and its input transform.

Everything that must agree between training and prediction lives here: how the
model is built from params, how its outputs are unpacked, and how images are
normalised and resized. What a checkpoint holds is `pipeline/model/checkpoints.py`.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, NamedTuple

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
    aux = dict(classes=1, dropout=0.2, pooling=t.presence_pooling) if t.presence_head else None
    local = t.encoder_weights not in ("none", "imagenet")
    try:
        model = smp.Unet(encoder_name=t.encoder, encoder_depth=t.encoder_depth,
                         encoder_weights=None if t.encoder_weights == "none" or local else t.encoder_weights,
                         decoder_channels=list(t.decoder_channels), in_channels=in_channels, classes=1,
                         aux_params=aux)
    except Exception as exc:  # noqa: BLE001 - the download's errors (httpx, huggingface_hub, OSError) are many
        if t.encoder_weights != "imagenet":
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ParamsError(f"train.encoder_weights: imagenet: cannot get the pretrained {t.encoder} weights "
                          f"({reason[:200]}); offline? Download them where there is a network (they are then "
                          "cached), or set a local file holding the encoder's state_dict, or none") from None
    if local:
        load_encoder_weights(model, t.encoder_weights)
    if t.norm == "instance":
        instance_norm(model)
    return model


def instance_norm(model: torch.nn.Module) -> None:
    """Replace every BatchNorm2d in place by per-image, per-channel normalisation keeping its affine
    weights (nnU-Net's InstanceNorm): a batch of 8 then shares no statistics, and training and
    prediction normalise alike. Written as GroupNorm with one group per channel, which equals
    InstanceNorm2d(affine=True) but also accepts the 1x1 maps a small working size reaches at depth 5."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            norm = torch.nn.GroupNorm(child.num_features, child.num_features, eps=child.eps)
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
            setattr(model, name, norm)
        else:
            instance_norm(child)


def check_encoder_weights(value: str) -> None:
    """Refuse a `train.encoder_weights` file that does not exist, before any training work (the
    file itself is read by `load_encoder_weights`)."""
    if value not in ("none", "imagenet") and not Path(value).expanduser().is_file():
        raise ParamsError(f"train.encoder_weights: {value}: no such file (use none, imagenet, or a local file "
                          f"holding the encoder's state_dict; README \"train\")")


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local file holding the smp encoder's state_dict into `model.encoder`, with no network.

    The file is read with `weights_only=True` (plain tensors only; a pickle that would run code is
    refused). A 3-channel first convolution is adapted to the model's input channels the way smp
    adapts its own pretrained weights (summed for 1 channel, cycled and rescaled otherwise), so a
    file saved from a default `smp.Unet(...).encoder` fits gray and RGB data alike. A missing file,
    anything but a state dict, or keys/shapes that do not fit the encoder are one ParamsError."""
    where = f"train.encoder_weights: {path}"
    path = Path(path).expanduser()
    if not path.is_file():
        raise ParamsError(f"{where}: no such file (use none, imagenet, or a local file holding the encoder's "
                          f"state_dict; README \"train\")")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or code-bearing files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParamsError(f"{where}: not a readable tensor state dict ({first[:200]})") from None
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ParamsError(f"{where}: not a state dict (expected a dict of parameter names to tensors, as "
                          f"torch.save(model.encoder.state_dict(), ...) writes)")
    own = model.encoder.state_dict()
    state = {k: _adapt_first_conv(v, own[k]) if k in own else v for k, v in state.items()}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if keys]
        raise ParamsError(f"{where}: does not fit the {type(model.encoder).__name__} of train.encoder "
                          f"({'; '.join(parts)}); save the state_dict of the same encoder and encoder_depth")
    model.encoder.load_state_dict(state)


def _adapt_first_conv(saved: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A 3-input-channel convolution kernel reshaped to `own`'s input channels as smp's patch_first_conv does."""
    if saved.ndim != 4 or own.ndim != 4 or saved.shape[1] != 3 or own.shape[1] == 3 \
            or saved.shape[0] != own.shape[0] or saved.shape[2:] != own.shape[2:]:
        return saved
    if own.shape[1] == 1:
        return saved.sum(1, keepdim=True)
    return saved[:, [i % 3 for i in range(own.shape[1])]] * (3 / own.shape[1])


def input_channels(model: torch.nn.Module) -> int:
    """Channels the network takes: those of its first convolution."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


class Supervised(NamedTuple):
    """What `SideOutputs` returns in training: the U-Net's own output and the side heads' logits."""

    output: Any
    sides: list[torch.Tensor]


class SideOutputs(torch.nn.Module):
    """Deep supervision (nnU-Net's): a 1x1 convolution on each inner decoder block's output gives a
    lower-resolution mask logit map that the loss scores too, so the deep layers get a short
    gradient path early in a short run.

    Training only: the wrapped U-Net (`.model`) is what is validated, saved as best.pt and
    exported; the heads live here and in last.pt. The outermost block is the U-Net's own output and
    the innermost (coarsest) gets no head, as in nnU-Net, so depth 5 has three side heads,
    finest first."""

    def __init__(self, model: torch.nn.Module, decoder_channels: tuple[int, ...]):
        super().__init__()
        self.model = model
        inner = list(model.decoder.blocks)[1:-1][::-1]
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, kernel_size=1) for c in decoder_channels[1:-1][::-1])
        self._features: list[torch.Tensor] | None = None
        for block in inner:
            block.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._features is not None:  # only inside this wrapper's forward, not when the U-Net runs alone
            self._features.append(output)

    def forward(self, x: torch.Tensor) -> Supervised:
        self._features = []
        try:
            output, features = self.model(x), self._features[::-1]  # hooks fire coarsest first
        finally:
            self._features = None
        return Supervised(output, [head(f) for head, f in zip(self.heads, features)])


def trainable(model: torch.nn.Module, t: TrainParams) -> torch.nn.Module:
    """The module training runs: the model itself, or with `train.deep_supervision` wrapped in `SideOutputs`."""
    return SideOutputs(model, t.decoder_channels) if t.deep_supervision else model


def bare(module: torch.nn.Module) -> torch.nn.Module:
    """The U-Net inside what training runs (DistributedDataParallel and/or `SideOutputs` around it)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    return module.model if isinstance(module, SideOutputs) else module


def split_training_outputs(output: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(mask_logits, presence_logit, side logits finest first; [] without deep supervision) from what
    `trainable(...)` returns."""
    if isinstance(output, Supervised):
        return (*split_outputs(output.output), output.sides)
    return (*split_outputs(output), [])


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
