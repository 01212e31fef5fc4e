"""Export stage: the trained folds, their flip views and the tuned thresholds -> one self-describing bundle.

`models/export/` (format: `pipeline/deploy/bundle.py`) holds `model.onnx`, the whole ensemble as
predict runs it on the CPU (each fold's normalisation, the model, the horizontal mirror flipped
back, every view's sigmoid averaged in the same order), exported with `torch.onnx` (the
torch.export-based exporter) with a dynamic batch axis and checked with `onnx.checker`;
`bundle.json`, everything else predict applies (working size and resize mode, channels, the
tuned thresholds, the RLE conventions), with the SHA-256 of model.onnx; and a README.md.

Before the bundle is published, ONNX Runtime runs the exported graph on a seeded probe batch
and its probabilities must equal PyTorch's within `TOLERANCE`; the largest differences go into
bundle.json (`export_check`) and the summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.artifacts import read_thresholds
from pipeline.data.ids import numeric_ids
from pipeline.data.io import atomic_dir
from pipeline.deploy.bundle import INPUT, MASK_OUTPUT, MODEL_FILE, PRESENCE_OUTPUT, BundleError, write_bundle
from pipeline.model.checkpoints import CheckpointError, load_checkpoint, trained_fold_checkpoints
from pipeline.model.network import input_channels, split_outputs
from pipeline.params import Params

OPSET = 18
TOLERANCE = 1e-4  # ONNX Runtime vs PyTorch, absolute, on probabilities (measured: ~1e-6)
PROBE_IMAGES = 2


class FlipEnsemble(torch.nn.Module):
    """The folds and their horizontal mirrors as one module: [0, 1]-scaled input at the working size ->
    (mask probabilities (N,1,h,w), presence probabilities (N,)), averaged in predict's order."""

    def __init__(self, models: list[torch.nn.Module], norms: list[dict[str, float]], tta_flip: bool) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(models)
        self.norms = [(float(n["mean"]), float(n["std"])) for n in norms]
        self.flips = (False, True) if tta_flip else (False,)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = presence = None
        views = 0
        for model, (mean, std) in zip(self.models, self.norms):
            normalised = (x - mean) / std
            for flip in self.flips:
                logits, label = split_outputs(model(torch.flip(normalised, [-1]) if flip else normalised))
                prob = torch.sigmoid(logits)
                prob = torch.flip(prob, [-1]) if flip else prob
                mask = prob if mask is None else mask + prob
                p = torch.sigmoid(label)
                presence = p if presence is None else presence + p
                views += 1
        return mask / views, presence / views


def load_folds(models: str | Path) -> tuple[list[Path], list[tuple[torch.nn.Module, dict[str, Any]]]]:
    """The folds predict averages: those the models folder's `folds.json` lists, each finished by that
    train run; refuses folds trained at different sizes or resize modes."""
    paths = trained_fold_checkpoints(models)
    loaded = [load_checkpoint(path, map_location="cpu") for path in paths]
    for what, key in (("sizes", lambda c: (c["height"], c["width"])), ("resize modes", lambda c: c.get("resize", "stretch"))):
        values = {key(state["config"]) for _, state in loaded}
        if len(values) > 1:
            raise CheckpointError(f"{models}: folds were trained at different {what} {sorted(values)}")
    return paths, loaded


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    found = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for package in ("nerveseg", "segmentation-models-pytorch", "onnxscript"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def params_sha256(params: Params) -> str:
    """SHA-256 of the validated params (every section) as canonical JSON: which settings made the bundle."""
    text = json.dumps(dataclasses.asdict(params), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _export(module: FlipEnsemble, example: torch.Tensor, path: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
        torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[MASK_OUTPUT, PRESENCE_OUTPUT],
                          dynamic_shapes={"x": {0: batch}}, verbose=False, report=False)
    onnx.checker.check_model(str(path), full_check=True)


def _check(path: Path, module: FlipEnsemble, probe: torch.Tensor) -> dict[str, float]:
    """ONNX Runtime vs PyTorch on the probe batch: the largest absolute differences; refuses beyond TOLERANCE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mask, presence = session.run([MASK_OUTPUT, PRESENCE_OUTPUT], {INPUT: probe.numpy()})
    with torch.inference_mode():
        want_mask, want_presence = module(probe)
    diffs = {"max_abs_diff_mask": float(np.abs(mask - want_mask.numpy()).max()),
             "max_abs_diff_presence": float(np.abs(presence - want_presence.numpy()).max())}
    if max(diffs.values()) > TOLERANCE or not all(np.isfinite(v) for v in diffs.values()):
        raise BundleError(f"{path}: ONNX Runtime differs from PyTorch by {max(diffs.values()):.3g} on the probe batch "
                          f"(tolerance {TOLERANCE}); not exported")
    return {**diffs, "probe_images": len(probe), "tolerance": TOLERANCE}


def run(params: Params, *, models: str | Path, thresholds: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the bundle folder `out` (replaced as a whole); returns the summary."""
    data = params.data
    gates = read_thresholds(thresholds)
    paths, loaded = load_folds(models)
    config = loaded[0][1]["config"]
    size, resize = (int(config["height"]), int(config["width"])), config.get("resize", "stretch")
    channels = {input_channels(model) for model, _ in loaded}
    want = 1 if data.channels == "gray" else 3
    if channels != {want}:
        raise CheckpointError(f"{models}: trained on {sorted(channels)}-channel input, but data.channels: "
                              f"{data.channels} reads {want} (data.channels changed since training?)")
    members = [model.eval() for model, _ in loaded]
    norms = [state["norm"] for _, state in loaded]
    module = FlipEnsemble(members, norms, params.predict.tta_flip).eval()
    probe = torch.rand(PROBE_IMAGES, want, *size, generator=torch.Generator().manual_seed(params.seed))
    views = len(members) * len(module.flips)
    with atomic_dir(out) as tmp:
        _export(module, probe[:1], tmp / MODEL_FILE)
        check = _check(tmp / MODEL_FILE, module, probe)
        meta = write_bundle(tmp, {
            "model": {"opset": OPSET, "input": {"name": INPUT, "shape": ["batch", want, *size], "dtype": "float32"},
                      "outputs": {MASK_OUTPUT: ["batch", 1, *size], PRESENCE_OUTPUT: ["batch"]}},
            "preprocess": {"channels": data.channels, "in_channels": want, "height": size[0], "width": size[1],
                           "resize": resize, "scale": 1 / 255, "interpolation": "bilinear, antialiased",
                           "normalisation": "inside the graph, per fold: (x - mean) / std",
                           "folds": [{"checkpoint": str(p.relative_to(models)), "mean": float(n["mean"]),
                                      "std": float(n["std"])} for p, n in zip(paths, norms)]},
            "ensemble": {"folds": len(members), "tta_flip": params.predict.tta_flip, "views": views},
            "postprocess": gates.to_dict(),
            "rle": {"order": data.rle_order, "start": data.rle_start,
                    "submission_columns": list(data.submission_columns), "numeric_ids": numeric_ids(data)},
            "object_name": data.object_name,
            "params_sha256": params_sha256(params),
            "versions": _versions(),
            "export_check": check,
        })
    return {"folds": len(members), "views": views, "height": size[0], "width": size[1], "resize": resize,
            "model_sha256": meta["model"]["sha256"][:16], **{k: check[k] for k in ("max_abs_diff_mask",
                                                                                  "max_abs_diff_presence")}}
