"""Predict stage: trained folds -> thresholded test masks -> a validated run-length submission.

The folds of the last train run (its `folds.json`) are averaged (optionally with their horizontal-flip views) in
probability space at the working size, mapped back to the native grid with the same
`to_native` the OOF scores used, and thresholded by the tuned `postprocess` rules.
The file is validated before it is moved into place, so an invalid submission never
appears at the output path. On synthetic data the generator's true test masks exist,
and the submission is scored against them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import layouts, rle
from pipeline.data.ids import id_sort_key, numeric_ids
from pipeline.data.artifacts import (TEST_TRUTH, Thresholds, check_probabilities, open_arrays, read_manifest,
                                     read_thresholds, size_chunks)
from pipeline.data.io import InputError, atomic_path, read_mask, write_json
from pipeline.model.metrics import dice_per_image
from pipeline.model.checkpoints import CheckpointError, load_checkpoint, trained_fold_checkpoints
from pipeline.model.network import input_channels, preprocess, split_outputs, to_native
from pipeline.params import DataParams, Params
from pipeline.model.postprocess import apply



class Ensemble:
    """The fold models, each with its own normalisation, sharing one working size: exactly the
    folds of the last train run (its `folds.json`), each finished by that run."""

    def __init__(self, models_dir: str | Path, device: torch.device) -> None:
        self.paths = trained_fold_checkpoints(models_dir)
        loaded = [load_checkpoint(path, map_location="cpu") for path in self.paths]
        sizes = {(state["config"]["height"], state["config"]["width"]) for _, state in loaded}
        if len(sizes) > 1:
            raise CheckpointError(f"{models_dir}: folds were trained at different sizes {sorted(sizes)}")
        self.size = sizes.pop()
        self.resize = {state["config"].get("resize", "stretch") for _, state in loaded}.pop()
        self.channels = {path: input_channels(model) for path, (model, _) in zip(self.paths, loaded)}
        self.device = device
        self.members = [(model.to(device).eval(), state["norm"]) for model, state in loaded]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images of one native size -> (mask probabilities (N,1,h,w), presence probabilities (N,)),
        averaged over the folds (and the mirror views)."""
        mask, presence, views = 0.0, 0.0, 0
        for model, norm in self.members:
            x = preprocess(images, self.size, norm["mean"], norm["std"], self.resize).to(self.device)
            for flip in (False, True) if tta_flip else (False,):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    logits, label = split_outputs(model(x.flip(-1) if flip else x))
                prob = torch.sigmoid(logits.float())
                mask = mask + (prob.flip(-1) if flip else prob)
                presence = presence + torch.sigmoid(label.float())
                views += 1
        return mask / views, presence / views


def _truth(raw_dir: str | Path, data: DataParams, ids: list[str], shapes: dict[str, tuple[int, int]]
           ) -> tuple[str, dict[str, np.ndarray]] | None:
    """("test", true masks) from the dataset's `test/masks/` (folders layout), ("synthetic_test", ...)
    from the generator's `truth/test_masks.csv`, else None (real test labels are usually hidden)."""
    paths = layouts.test_mask_paths(raw_dir, data)
    if paths is not None:
        masks = {i: read_mask(paths[i], data.foreground) for i in ids if i in paths}
        wrong = [f"{paths[i]}: mask size {m.shape[0]}x{m.shape[1]}, image {shapes[i][0]}x{shapes[i][1]}"
                 for i, m in masks.items() if m.shape != shapes[i]]
        if wrong or len(masks) != len(ids):
            raise InputError(f"{Path(raw_dir) / 'test' / 'masks'}: masks do not match the test images: "
                             + "; ".join(wrong[:5] or [f"{len(ids) - len(masks)} test image(s) without a mask"]))
        return "test", masks
    path = Path(raw_dir) / TEST_TRUTH
    if not path.exists():
        return None
    rle.validate_submission(path, ids, next(iter(shapes.values())), numeric_ids=False, shapes=shapes)
    return "synthetic_test", {i: rle.decode(r, shapes[i]) for i, r in rle.read_rows(path)[1:]}


def run(params: Params, *, interim: str | Path, models: str | Path, thresholds: str | Path, raw: str | Path,
        out: str | Path, metrics: str | Path) -> dict[str, float]:
    """Write the validated submission to `out` and the summary to `metrics`."""
    p, data = params.predict, params.data
    gates: Thresholds = read_thresholds(thresholds)
    manifest = read_manifest(interim)
    test = manifest[manifest.split == "test"].sort_values("row")
    images, _ = open_arrays(interim, "test")
    if len(test) != len(images):
        raise InputError(f"{interim}: manifest lists {len(test)} test images, test_images.npy holds {len(images)}")
    ids = test.id.tolist()
    numeric = numeric_ids(data)
    rle.check_ids(ids, numeric, f"{Path(interim) / 'manifest.csv'} (test images)")  # before any model runs
    shapes = {i: (int(h), int(w)) for i, h, w in zip(ids, test.height, test.width)}
    order, start = ("F" if data.rle_order == "column" else "C"), data.rle_start
    truth = _truth(raw, data, ids, shapes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ensemble = Ensemble(models, device)
    channels = 1 if images.ndim == 3 else images.shape[3]
    for path, c in ensemble.channels.items():
        if c != channels:
            raise CheckpointError(f"{path}: trained on {c}-channel input, but the test images have {channels} "
                                  f"(data.channels changed since training?)")

    encoded: dict[str, str] = {}
    dice, truth_empty = [], []
    batches = size_chunks(test.height.to_numpy(), test.width.to_numpy(), p.batch_size)
    for (h, w), part in tqdm(batches, desc="predict test", unit="batch", mininterval=1.0):
        batch_ids = [ids[k] for k in part]
        batch = np.array(images[part])[:, :h, :w]  # a writable copy of the memory-mapped rows, native size
        mask_prob, presence = ensemble(batch, p.tta_flip)
        native, presence = to_native(mask_prob, (h, w), ensemble.resize).cpu().numpy(), presence.cpu().numpy()
        for name, values in (("mask", native), ("presence", presence)):  # NaN would silently mean "empty"
            check_probabilities(values, f"{models}: {name} probabilities of the test images", batch_ids)
        masks = apply(native, presence, gates)
        encoded.update((i, rle.encode(m, order, start)) for i, m in zip(batch_ids, masks))
        if truth is not None:
            true = np.stack([truth[1][i] for i in batch_ids])
            dice.append(dice_per_image(masks, true))
            truth_empty.append(~true.any(axis=(1, 2)))

    rows = sorted(encoded.items(), key=lambda kv: id_sort_key(kv[0]))
    with atomic_path(out) as tmp:
        rle.write_submission(tmp, rows, data.submission_columns)
        try:
            rle.validate_submission(tmp, ids, next(iter(shapes.values())), columns=data.submission_columns,
                                    start=start, numeric_ids=numeric, shapes=shapes)
        except rle.SubmissionError as exc:  # name the output, not the temporary it was checked in
            raise rle.SubmissionError(str(exc).replace(str(tmp), f"{out} (not written)", 1)) from None
    empty = sum(r == "" for _, r in rows)
    summary: dict[str, float] = {"test_images": len(rows), "predicted_empty": empty,
                                 "predicted_empty_fraction": round(empty / len(rows), 5),
                                 "models": len(ensemble.paths), "tta_views": 2 if p.tta_flip else 1}
    if truth is not None:  # synthetic data, or a dataset that ships its test masks
        kind = truth[0]
        summary |= {f"{kind}_dice": round(float(np.concatenate(dice).mean()), 5),
                    f"{kind}_all_empty_dice": round(float(np.concatenate(truth_empty).mean()), 5),
                    f"{kind}_images": len(rows)}
    write_json(metrics, summary)
    return summary
