"""Benchmark: what the train stage's diagnostics cost per epoch, on the default run's data.

Trains fold 0 of the cleaned training set (the train stage's inputs, params from params.yaml)
and alternates plain epochs with epochs that run the per-epoch diagnostics exactly as
`train.fit_fold` does (gradient norms read after every backward, ReLU hooks during the
validation pass, warnings), so load from other processes hits both alike. Whole-epoch times
are noisy on a shared machine, so it also times each added part on its own (the gradient
read per step, the validation pass with and without the hooks, best of several, and the
end-of-epoch bookkeeping) and the one-off parts: the step-0 init check and the figures.

    python benchmarks/bench_diagnostics.py [--params params.yaml] [--pairs N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data import artifacts
from pipeline.diagnostics import monitor as diagnostics
from pipeline.stages import train
from pipeline.model import transforms
from pipeline.data.artifacts import open_arrays  # noqa: E402
from pipeline.model.network import build_model  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pairs", type=int, default=3, help="plain + diagnosed epoch pairs")
    args = parser.parse_args()
    p = load_params(args.params)
    t, d = p.train, p.diagnostics
    rt = train.setup_runtime(t)
    images, masks = open_arrays("data/interim", "train")
    manifest = train.read_training_manifest("data/processed/manifest.csv", len(images))
    rows = manifest.row.to_numpy()
    norm = train.pixel_stats(images[rows])
    x, y = transforms.working_arrays(images[rows], masks[rows], (t.height, t.width))
    folds = train.subject_folds(manifest.subject.to_numpy(), t.folds, p.seed)
    fold = train.Fold(0, x[folds != 0], y[folds != 0], x[folds == 0], y[folds == 0], norm, "")
    torch.manual_seed(p.seed)
    model = build_model(t).to(rt.device)
    dataset = train.Samples(fold.x_train, fold.y_train, norm, artifacts.load_augmentation("models/augment.json"), p.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=2 * args.pairs * len(loader))
    monitor = diagnostics.Monitor(d, 0, model, fold.x_val, fold.y_val, norm, p.seed, lambda _: None)
    began = time.perf_counter()
    monitor.start(model)
    init_s = time.perf_counter() - began
    plain, diagnosed, history, read_s, end_s = [], [], [], [], []

    def timed_read() -> None:
        began = time.perf_counter()
        monitor.grads()
        read_s.append(time.perf_counter() - began)

    for epoch in range(2 * args.pairs):
        on = epoch % 2 == 1
        began = time.perf_counter()
        loss = train.train_epoch(model, loader, optimizer, scheduler, t, rt, "epoch", timed_read if on else None)
        with diagnostics.relu_alive(model) if on else contextlib.nullcontext({}) as alive:
            _, presence, val = train.validate(model, fold, t, rt)
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_loss": val["loss"]})
        if on:
            mark = time.perf_counter()
            monitor.end_epoch(model, alive, history, presence, fold.y_val)
            end_s.append(time.perf_counter() - mark)
        (diagnosed if on else plain).append(time.perf_counter() - began)
    val_s = {False: [], True: []}
    for on in [False, True] * 4:
        began = time.perf_counter()
        with diagnostics.relu_alive(model) if on else contextlib.nullcontext({}):
            train.validate(model, fold, t, rt)
        val_s[on].append(time.perf_counter() - began)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        monitor.finish(model, Path(tmp))
        finish_s = time.perf_counter() - began
    a, b = np.median(plain), np.median(diagnosed)
    print(f"device: {rt.device.type}, {torch.get_num_threads()} threads; fold 0: {len(fold.x_train)} train / "
          f"{len(fold.x_val)} validation images at {t.height}x{t.width}, {len(loader)} steps per epoch")
    print(f"epoch without diagnostics: {a:.2f} s (median of {len(plain)}: {', '.join(f'{s:.2f}' for s in plain)})")
    print(f"epoch with diagnostics:    {b:.2f} s (median of {len(diagnosed)}: "
          f"{', '.join(f'{s:.2f}' for s in diagnosed)})")
    print(f"whole-epoch difference: {b - a:+.2f} s ({(b - a) / a:+.1%})")
    hooks = min(val_s[True]) - min(val_s[False])
    parts = np.mean(read_s) * len(loader) + hooks + np.mean(end_s)
    print(f"added parts: gradient read {1e3 * np.mean(read_s):.1f} ms x {len(loader)} steps, ReLU hooks "
          f"{hooks:+.3f} s on the validation pass ({min(val_s[False]):.2f} s without, best of 4), end of epoch "
          f"{1e3 * np.mean(end_s):.0f} ms: {parts:.2f} s per epoch ({parts / a:.1%})")
    print(f"one-off: step-0 init check {init_s:.2f} s, end-of-training figures and JSON {finish_s:.2f} s "
          f"(diagnostics.subset = {d.subset}, enabled = {d.enabled})")


if __name__ == "__main__":
    main()
