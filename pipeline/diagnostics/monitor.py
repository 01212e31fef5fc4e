"""Model diagnostics, the train stage's glue: is the network learning, is it healthy, what did it learn.

`Monitor` is what the train stage calls: per epoch it reads the gradients the optimizer already
has (no extra backward pass) and watches the ReLUs during the validation pass it already runs (no
extra forward pass), and applies the warning rules; at the end it draws the heavier figures from
a small fixed validation subset and writes `fold_K.json`. Nothing here changes the model, its
gradients, its BatchNorm statistics or the random streams, so training is bit-identical with
diagnostics on or off.

The parts: `diag_measures.py` (the measurements), `diag_rules.py` (when they mean trouble),
`diag_figures.py` (the figures and their captions).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.diagnostics.figures import CAPTIONS, bottleneck_figure, features_figure, filters_figure, health_figure
from pipeline.diagnostics.measures import (GradTracker, bottleneck_features, capture, dead_fractions, dead_overall,
                                    init_stds, pca_spectrum, presence_attribution, relu_alive, top_channels,
                                    total_norm, weight_norms)
from pipeline.diagnostics.rules import gradient_warnings, init_warnings, one_class, plateau_epochs
from pipeline.data.io import save_figure, write_json
from pipeline.model.network import channels_first
from pipeline.params import DiagnosticsParams


def pick_subset(masks: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` validation images, half with a nerve where possible; fixed by `seed`."""
    present = np.asarray(masks).reshape(len(masks), -1).any(axis=1)
    pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
    rng = np.random.default_rng(seed)
    k = min(len(pos), max(n - len(neg), (n + 1) // 2))
    chosen = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, min(len(neg), n - k), replace=False)])
    return np.sort(chosen.astype(np.int64))


class Monitor:
    """One fold's diagnostics while it trains: per-epoch health, warnings, end-of-training artefacts.

    Its `state()` goes into last.pt and done.json, so a resumed run keeps its history and warnings.
    """

    def __init__(self, d: DiagnosticsParams, fold: int, model: torch.nn.Module, x_val: np.ndarray,
                 y_val: np.ndarray, norm: dict[str, float], seed: int, log: Callable[[str], None]) -> None:
        self.d, self.fold, self.log = d, fold, log
        self.device = next(model.parameters()).device
        self.subset = pick_subset(y_val, d.subset, seed)
        self.x = ((channels_first(x_val[self.subset]) - norm["mean"]) / norm["std"]).to(self.device)
        self.images, self.masks = x_val[self.subset], y_val[self.subset]
        self.grads = GradTracker(model)
        self.epochs: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.init: dict[str, float] = {}

    def state(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "warnings": self.warnings, "init": self.init}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.epochs, self.warnings, self.init = state["epochs"], state["warnings"], state["init"]

    def watch(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """Around the validation pass: which ReLU channels fire (for `end_epoch`)."""
        return relu_alive(model)

    def _warn(self, epoch: int, kind: str, message: str) -> None:
        self.warnings.append({"fold": self.fold, "epoch": epoch, "kind": kind, "message": message})
        self.log(f"warning: fold {self.fold} epoch {epoch}: {message}")

    def start(self, model: torch.nn.Module) -> None:
        """Step 0: activation std per layer for the subset as one training-mode batch."""
        self.init = init_stds(model, self.x)
        for message in init_warnings(self.init, float(self.x.float().std())):
            self._warn(0, "init", message)

    def end_epoch(self, model: torch.nn.Module, alive: dict[str, torch.Tensor], history: list[dict[str, Any]],
                  presence_prob: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        """Record the epoch, log its warnings; returns the scalars to log per epoch."""
        epoch = history[-1]["epoch"]
        grads, whole, peak = self.grads.summary()
        weights = {k: v for k, v in weight_norms(model).items() if not grads or k in grads}  # layers in use
        self.epochs.append({"epoch": epoch, "grad_norm": grads, "grad_mean": whole, "grad_peak": peak,
                            "weight_norm": weights,
                            "dead": dead_fractions(alive)})
        for key in ("train_loss", "val_loss"):
            if epoch in plateau_epochs([row[key] for row in history], self.d.patience):
                self._warn(epoch, "plateau", f"{key} has not improved for {self.d.patience} epochs "
                                             f"(best {min(row[key] for row in history):.4f})")
        for kind, message in gradient_warnings(grads, peak, self.d.grad_vanish, self.d.grad_explode):
            self._warn(epoch, kind, message)
        present = y_val.reshape(len(y_val), -1).any(axis=1)
        message = one_class(presence_prob, present)
        self.epochs[-1]["one_class"] = message is not None
        streak = next((i for i, e in enumerate(reversed(self.epochs)) if not e.get("one_class")), len(self.epochs))
        if message and streak == self.d.patience:  # early epochs often say one class: warn when it sticks
            self._warn(epoch, "one_class", f"{message}, {streak} epochs in a row")
        return {"train_grad_norm": whole, "weight_norm": total_norm(weights),
                "val_dead_fraction": dead_overall(alive),
                "val_presence_positive": float((np.asarray(presence_prob) > 0.5).mean())}

    def finish(self, model: torch.nn.Module, out_dir: Path) -> int:
        """Write fold_K.json (history, warnings, and each figure's file and caption) and, when enabled,
        the figures of `model`.

        Returns the number of warnings."""
        model.eval()
        prefix = f"fold_{self.fold}"
        result: dict[str, Any] = {"fold": self.fold, "subset": self.subset.tolist(), "init_std": self.init,
                                  "epochs": self.epochs, "warnings": self.warnings, "figures": []}
        if self.d.enabled and len(self.subset):
            result |= self._artefacts(model, out_dir, prefix)
        write_json(out_dir / f"{prefix}.json", result)
        return len(self.warnings)

    def _artefacts(self, model: torch.nn.Module, out_dir: Path, prefix: str) -> dict[str, Any]:
        figures = []

        def save(fig: Any, name: str) -> None:
            save_figure(fig, out_dir / f"{prefix}_{name}.png")
            figures.append({"file": f"{prefix}_{name}.png", "caption": CAPTIONS[name]})

        if self.epochs or self.init:
            save(health_figure(self.epochs, self.init), "health")
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        save(filters_figure(first.weight), "filters")
        present = self.masks.reshape(len(self.masks), -1).any(axis=1)
        pair = [int(np.argmax(present)), int(np.argmax(~present))] if 0 < present.sum() < len(present) else [0]
        out = capture(model, self.x[pair], {"encoder": model.encoder, "decoder": model.decoder})
        stages = out["encoder"][1:]
        picks = sorted({0, len(stages) // 2, len(stages) - 1})
        maps = {f"encoder stage {i + 1}": stages[i] for i in picks} | {"decoder": out["decoder"]}
        titles = ["with a nerve (red)" if present[i] else "no nerve" for i in pair]
        save(features_figure(self.images[pair], self.masks[pair], maps, titles), "features")
        pca = pca_spectrum(bottleneck_features(model, self.x, model.encoder))
        contrib = presence_attribution(model, self.x, model.encoder)
        save(bottleneck_figure(pca, contrib, present), "bottleneck")
        order = top_channels(contrib)
        nerve, empty = (contrib[rows].mean(axis=0) if rows.any() else np.full(contrib.shape[1], np.nan)
                        for rows in (present, ~present))
        return {"figures": figures,
                "pca": {k: pca[k] for k in ("components_90", "components_99", "rank", "samples", "channels")}
                | {"explained": np.round(pca["explained"][:64], 6).tolist()},
                "attribution": [{"channel": int(c), "mean_abs": float(np.abs(contrib[:, c]).mean()),
                                 "mean_nerve": float(nerve[c]), "mean_empty": float(empty[c])} for c in order]}
