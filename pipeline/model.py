"""The U-Net with a mask-presence head, its input transform and its checkpoints.

Everything that must agree between training and prediction lives here: how the
model is built from params, how its outputs are unpacked, how images are
normalised and resized, and what a checkpoint holds.
"""
from __future__ import annotations

import dataclasses
import difflib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io import atomic_path
from pipeline.params import ParamsError, TrainParams, _build

MODEL_KEYS = ("encoder", "encoder_depth", "decoder_channels", "encoder_weights", "presence_head", "height", "width")


REFUSED = "not a checkpoint this pipeline wrote, or it contains code (refused for safety)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the current configuration."""


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


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as what `torch.load(weights_only=True)` accepts: tensors, numbers, strings, bytes, None,
    bools, and lists/tuples/dicts of them. numpy arrays become tensors, numpy scalars Python numbers;
    anything else is a TypeError here, when saving, instead of a refused checkpoint later."""
    if isinstance(obj, np.generic):  # before the Python types: np.float64 is a float subclass
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (it must load with "
                    f"torch.load(weights_only=True))")


def save_checkpoint(path: str | Path, model: torch.nn.Module, t: TrainParams, norm: dict[str, float],
                    **extra: Any) -> None:
    """Atomically save weights with everything needed to rebuild and feed the model.

    Only plain data is written (see `plain`), so `read_checkpoint` can load it without running code."""
    state = plain({"model": model.state_dict(), "config": model_config(t, input_channels(model)),
                   "norm": dict(norm), **extra})
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's saved dict, unpickled with `weights_only=True`: a file that would import or call
    anything (code hidden in a pickle) is refused with a CheckpointError, never run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met a global it does not allow
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(f"{path}: {REFUSED}" + (f": it needs {found.group(1)}" if found else "")) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({first[:300]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {REFUSED}")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect: TrainParams | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint; with `expect`, refuse one saved for another model config."""
    path = Path(path)
    state = read_checkpoint(path, map_location)
    if not {"model", "config", "norm"} <= set(state):
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
