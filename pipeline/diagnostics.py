"""Model diagnostics: is the network learning, is it healthy, and what did it learn.

The measurements are plain functions of a model and a batch, each checked on a tiny
model with a known answer (tests/test_diagnostics.py). `Monitor` is the glue the train
stage calls: per epoch it reads the gradients the optimizer already has (no extra
backward pass) and watches the ReLUs during the validation pass it already runs (no
extra forward pass); at the end it draws the heavier figures from a small fixed
validation subset. Nothing here changes the model, its gradients, its BatchNorm
statistics or the random streams, so training is bit-identical with diagnostics on or
off, which is why neither this file nor the `diagnostics` params are in the resume hash.

A "layer" is a module that owns parameters (a convolution, a BatchNorm, a linear
layer), named by its path in the model; an "activation site" is one call of a ReLU
module (ResNet blocks call theirs twice: `name` and `name#2`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import save_figure, write_json
from pipeline.model import channels_first, split_outputs
from pipeline.params import DiagnosticsParams

REL_TOL = 1e-3     # a loss must fall 0.1% below its best so far to count as an improvement
INIT_RATIO = 100.0  # at step 0, a layer output std this many times above or below the input's is flagged
TOP_CHANNELS = 20   # bottleneck channels listed by attribution
SHOWN_CHANNELS = 3  # feature-map channels drawn per layer and image


def layer_of(param_name: str) -> str:
    """The owning module's path: 'encoder.conv1.weight' -> 'encoder.conv1' ('model' for the root's own)."""
    return param_name.rpartition(".")[0] or "model"


def _param_layers(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter], torch.Tensor]:
    """(layer names in model order, trainable parameters, each parameter's layer index)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = list(dict.fromkeys(layer_of(n) for n, _ in named))
    where = {name: i for i, name in enumerate(layers)}
    return layers, [p for _, p in named], torch.tensor([where[layer_of(n)] for n, _ in named])


def _per_layer(tensors: Sequence[torch.Tensor], index: torch.Tensor, n_layers: int) -> torch.Tensor:
    """L2 norm per layer over all of its tensors, in float32 on the tensors' device."""
    squares = torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors]) ** 2
    return torch.zeros(n_layers, device=squares.device).index_add_(0, index.to(squares.device), squares).sqrt()


def weight_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of each layer's parameters (weight and bias together)."""
    layers, params, index = _param_layers(model)
    return dict(zip(layers, _per_layer(params, index, len(layers)).tolist()))


class GradTracker:
    """Per-layer gradient norms of the real training steps, read after each backward.

    Called once per step (`tracker()`); `summary()` gives each layer's mean norm over
    the steps and the mean and largest whole-model norm, then starts over. Layers that never get
    a gradient (smp keeps the encoder stages deeper than `encoder_depth`) are left out
    rather than reported as vanishing. Sums stay on the device: no sync per step.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers, self.params, self.index = _param_layers(model)
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.seen: torch.Tensor | float = 0.0
        self.whole: torch.Tensor | float = 0.0
        self.peak: torch.Tensor | float = 0.0
        self.steps = 0

    def __call__(self) -> None:
        used = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not used:
            return
        index = self.index[used]
        norms = _per_layer([self.params[i].grad for i in used], index, len(self.layers))
        seen = torch.zeros(len(self.layers), device=norms.device).index_fill_(0, index.to(norms.device), 1.0)
        self.total = self.total + norms
        self.seen = self.seen + seen
        whole = norms.square().sum().sqrt()
        self.whole = self.whole + whole
        self.peak = torch.maximum(torch.as_tensor(self.peak, device=norms.device), whole)
        self.steps += 1

    def summary(self) -> tuple[dict[str, float], float, float]:
        """({layer: mean gradient norm over this epoch's steps}, mean and largest whole-model norm); resets."""
        if not self.steps:
            return {}, float("nan"), float("nan")
        mean = (self.total / torch.clamp(torch.as_tensor(self.seen), min=1.0)).tolist()
        seen = torch.as_tensor(self.seen).tolist()
        out = ({name: m for name, m, s in zip(self.layers, mean, seen) if s > 0}, float(self.whole) / self.steps,
               float(self.peak))
        self.reset()
        return out


def total_norm(norms: dict[str, float]) -> float:
    """Whole-model norm from per-layer norms."""
    return math.sqrt(sum(v * v for v in norms.values()))


@contextlib.contextmanager
def relu_alive(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, record for every activation site which channels were ever positive.

    Works with whatever forwards run inside (e.g. the validation pass), in any number of
    batches: a channel is alive once any pixel of any image made it positive.
    """
    alive: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def reset(*_: Any) -> None:
        calls.clear()

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            site = name if calls[name] == 1 else f"{name}#{calls[name]}"
            dims = tuple(d for d in range(output.ndim) if d != 1)
            positive = (output.detach().amax(dim=dims) if dims else output.detach()) > 0  # max: no bool copy
            alive[site] = alive[site] | positive if site in alive else positive
        return record

    handles = [model.register_forward_pre_hook(reset)]
    handles += [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    try:
        yield alive
    finally:
        for h in handles:
            h.remove()


def dead_fractions(alive: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of each site's channels that were never positive."""
    return {site: float((~a).float().mean()) for site, a in alive.items()}


def dead_overall(alive: dict[str, torch.Tensor]) -> float:
    """Dead channels over all channels of all sites."""
    if not alive:
        return float("nan")
    flags = torch.cat([a.flatten().cpu() for a in alive.values()])
    return float((~flags).float().mean())


@torch.no_grad()
def init_stds(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Output std of every layer for one batch in training mode, as training's first step sees it.

    Runs on a copy under a forked RNG: the real model's BatchNorm statistics and the
    dropout stream are untouched.
    """
    probe = copy.deepcopy(model).train()
    stds: dict[str, float] = {}
    layers = set(_param_layers(probe)[0])

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            stds.setdefault(name, float(output.detach().float().std()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probe.named_modules() if n in layers]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        probe(x)
    for h in handles:
        h.remove()
    return stds


@torch.no_grad()
def capture(model: torch.nn.Module, x: torch.Tensor, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Outputs of the given modules for one forward pass (a list output, like smp's encoder, stays a list)."""
    out: dict[str, Any] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o))
               for name, m in modules.items()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _last(output: Any) -> torch.Tensor:
    return output[-1] if isinstance(output, (list, tuple)) else output


def bottleneck_features(model: torch.nn.Module, x: torch.Tensor, bottleneck: torch.nn.Module,
                        batch: int = 16) -> torch.Tensor:
    """The bottleneck's activations as one row per image position: (N*h*w, C)."""
    rows = [_last(capture(model, x[s:s + batch], {"b": bottleneck})["b"]) for s in range(0, len(x), batch)]
    feats = torch.cat(rows).float()
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]) if feats.ndim == 4 else feats


def pca_spectrum(features: torch.Tensor, rel_rank_tol: float = 1e-9) -> dict[str, Any]:
    """Eigenvalues of the features' covariance, explained-variance ratios, components for 90% / 99%,
    and the numerical rank (eigenvalues above `rel_rank_tol` of the largest)."""
    x = features.double()
    x = x - x.mean(dim=0)
    eig = torch.linalg.svdvals(x) ** 2 / max(len(x) - 1, 1)
    ratio = (eig / eig.sum().clamp(min=1e-300)).cpu().numpy()
    cum = np.cumsum(ratio)
    return {"eigenvalues": eig.cpu().numpy(), "explained": ratio,
            "components_90": int(np.searchsorted(cum, 0.9 - 1e-12) + 1),
            "components_99": int(np.searchsorted(cum, 0.99 - 1e-12) + 1),
            "rank": int((eig > eig[0] * rel_rank_tol).sum()) if len(eig) else 0,
            "samples": int(len(x)), "channels": int(x.shape[1])}


def presence_attribution(model: torch.nn.Module, x: torch.Tensor, bottleneck: torch.nn.Module,
                         presence: Callable[[Any], torch.Tensor] = lambda out: split_outputs(out)[1],
                         batch: int = 16) -> np.ndarray:
    """Per image and bottleneck channel, gradient x activation of the presence logit: (N, C).

    With smp's presence head (average pool, then linear; dropout is off in eval) this is
    exact: the logit's change when that channel is zeroed (ablation), for every channel
    from one backward pass.
    """
    parts = []
    for s in range(0, len(x), batch):
        held: dict[str, torch.Tensor] = {}
        handle = bottleneck.register_forward_hook(lambda _m, _i, o: held.__setitem__("b", _last(o)))
        try:
            with torch.enable_grad():
                logit = presence(model(x[s:s + batch]))
                grad, = torch.autograd.grad(logit.float().sum(), held["b"])
        finally:
            handle.remove()
        contrib = (grad * held["b"]).detach().float()
        parts.append(contrib.sum(dim=tuple(range(2, contrib.ndim))) if contrib.ndim > 2 else contrib)
    return torch.cat(parts).cpu().numpy()


def filter_grid(weight: torch.Tensor, pad: int = 1) -> np.ndarray:
    """First-layer filters tiled in a square-ish grid, each scaled by its own largest |weight|
    so 0.5 is zero: (H, W) for one or many input channels (averaged), (H, W, 3) for three."""
    w = weight.detach().float().cpu()
    w = w if w.shape[1] == 3 else w.mean(dim=1, keepdim=True)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    tiles = (0.5 + 0.5 * w / scale).permute(0, 2, 3, 1).numpy()  # (O, k, k, c)
    n, kh, kw, c = tiles.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, c), np.float32)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        grid[pad + r * (kh + pad):pad + r * (kh + pad) + kh, pad + q * (kw + pad):pad + q * (kw + pad) + kw] = tile
    return grid[..., 0] if c == 1 else grid


# ---------------------------------------------------------------- warnings

def plateau_epochs(losses: Sequence[float], patience: int, rel_tol: float = REL_TOL) -> list[int]:
    """1-based epochs at which the loss has gone exactly `patience` epochs without improving on its best.

    Fires once per plateau: a long plateau is one warning, a new best re-arms it.
    """
    fired, best, since = [], math.inf, 0
    for epoch, loss in enumerate(losses, start=1):
        if epoch == 1 or loss < best - rel_tol * abs(best):
            best, since = loss, 0
        else:
            since += 1
            if since == patience:
                fired.append(epoch)
    return fired


def gradient_warnings(grad_norms: dict[str, float], peak: float, vanish: float,
                      explode: float) -> list[tuple[str, str]]:
    """(kind, message) for layers whose mean gradient norm is below `vanish` and a whole-model norm above `explode`."""
    out = []
    low = {k: v for k, v in grad_norms.items() if v < vanish}
    if low:
        shown = ", ".join(f"{k} {v:.1e}" for k, v in sorted(low.items(), key=lambda kv: kv[1])[:5])
        out.append(("vanishing", f"vanishing gradients: {len(low)} of {len(grad_norms)} layers have a mean "
                                 f"gradient norm below {vanish:g} ({shown})"))
    if peak > explode:
        out.append(("exploding", f"exploding gradients: the whole-model gradient norm reached {peak:.3g} "
                                 f"(> {explode:g})"))
    return out


def one_class(presence_prob: np.ndarray, truth_present: np.ndarray, gate: float = 0.5) -> str | None:
    """A message when the presence head says the same thing for every image although the truth has both."""
    said = np.asarray(presence_prob) > gate
    truth = np.asarray(truth_present, bool)
    if len(said) == 0 or truth.all() or not truth.any() or said.any() != said.all():
        return None
    return (f"the presence head predicts {'nerve' if said[0] else 'empty'} for all {len(said)} validation images "
            f"({int(truth.sum())} have a nerve); presence probabilities {float(np.min(presence_prob)):.3f}.."
            f"{float(np.max(presence_prob)):.3f}")


def init_warnings(stds: dict[str, float], input_std: float, ratio: float = INIT_RATIO) -> list[str]:
    """Layers whose step-0 output std is non-finite or `ratio` times above or below the input's."""
    bad = {k: v for k, v in stds.items() if not math.isfinite(v) or not input_std / ratio <= v <= input_std * ratio}
    if not bad:
        return []
    shown = ", ".join(f"{k} {v:.3g}" for k, v in list(bad.items())[:5])
    return [f"initialisation: {len(bad)} layer outputs are exploding or collapsing at step 0 "
            f"(input std {input_std:.3g}): {shown}"]


def pick_subset(masks: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` validation images, half with a nerve where possible; fixed by `seed`."""
    present = np.asarray(masks).reshape(len(masks), -1).any(axis=1)
    pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
    rng = np.random.default_rng(seed)
    k = min(len(pos), max(n - len(neg), (n + 1) // 2))
    chosen = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, min(len(neg), n - k), replace=False)])
    return np.sort(chosen.astype(np.int64))


# ---------------------------------------------------------------- figures

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def filters_figure(weight: torch.Tensor) -> Any:
    plt = _plt()
    grid = filter_grid(weight)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"first convolution: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]} "
                 f"(each scaled to its own max; gray = 0)", fontsize=9)
    return fig


def features_figure(images: np.ndarray, masks: np.ndarray, maps: dict[str, torch.Tensor], titles: Sequence[str]) -> Any:
    """Rows: the input, then each layer; columns: for each image, the layer's most active channels."""
    plt = _plt()
    k = SHOWN_CHANNELS
    fig, axes = plt.subplots(1 + len(maps), k * len(images), figsize=(1.9 * k * len(images), 1.6 * (1 + len(maps))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, (image, mask, title) in enumerate(zip(images, masks, titles)):
        ax = axes[0, j * k]
        ax.imshow(image, cmap="gray")
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(title, fontsize=8, loc="left")
    for r, (name, fmap) in enumerate(maps.items(), start=1):
        fmap = fmap.float().cpu()
        top = fmap.abs().mean(dim=(0, 2, 3)).argsort(descending=True)[:k].tolist()
        for j in range(len(images)):
            for q, c in enumerate(top):
                ax = axes[r, j * k + q]
                ax.imshow(fmap[j, c].numpy(), cmap="viridis")
                ax.set_title(f"{name} ch {c}" if q == 0 else f"ch {c}", fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def health_figure(epochs: list[dict[str, Any]], init: dict[str, float]) -> Any:
    """Per-layer gradient and weight norms and per-site dead fractions over epochs, and the step-0 stds."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 11))
    panels = (("grad_norm", "log10 mean gradient norm per layer (training steps)", True, axes[0, 0]),
              ("weight_norm", "log10 weight norm per layer", True, axes[0, 1]),
              ("dead", "dead fraction per ReLU site (validation pass)", False, axes[1, 0]))
    for key, title, log, ax in panels:
        names = list(dict.fromkeys(n for e in epochs for n in e.get(key, {})))
        if not names:
            ax.set_axis_off()
            continue
        table = np.array([[e.get(key, {}).get(n, np.nan) for e in epochs] for n in names], np.float64)
        if log:
            table = np.log10(np.maximum(table, 1e-30))
        im = ax.imshow(table, aspect="auto", cmap="magma" if log else "Reds", vmin=None if log else 0,
                       vmax=None if log else 1, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=max(3, 9 - len(names) // 12))
        ax.set_xticks(range(len(epochs)), [e["epoch"] for e in epochs], fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[1, 1]
    if init:
        ax.barh(range(len(init)), list(init.values()), color="#2c5cc5")
        ax.set_xscale("log")
        ax.set_yticks(range(len(init)), list(init), fontsize=max(3, 9 - len(init) // 12))
        ax.invert_yaxis()
        ax.set_title("step 0: output std per layer (training mode, one batch)", fontsize=9)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def bottleneck_figure(pca: dict[str, Any], contrib: np.ndarray, present: np.ndarray) -> Any:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    cum = np.cumsum(pca["explained"])
    a.plot(np.arange(1, len(cum) + 1), cum, color="#2c5cc5")
    for level, key, color in ((0.9, "components_90", "#e8a33d"), (0.99, "components_99", "#d2452f")):
        a.axvline(pca[key], color=color, ls="--", label=f"{level:.0%}: {pca[key]} components")
    a.set_xscale("log")
    a.set_xlabel("principal components")
    a.set_ylabel("cumulative explained variance")
    a.set_title(f"bottleneck PCA: {pca['channels']} channels, {pca['samples']} positions", fontsize=9)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    order = np.argsort(-np.abs(contrib).mean(axis=0))[:TOP_CHANNELS]
    xs = np.arange(len(order))
    for offset, rows, label, color in ((-0.2, present, "images with a nerve", "#d2452f"),
                                       (0.2, ~present, "empty images", "#2c5cc5")):
        if rows.any():
            b.bar(xs + offset, contrib[rows][:, order].mean(axis=0), width=0.4, label=label, color=color)
    b.axhline(0, color="black", lw=0.6)
    b.set_xticks(xs, [str(c) for c in order], fontsize=7, rotation=90)
    b.set_xlabel("bottleneck channel")
    b.set_ylabel("mean change of the presence logit")
    b.set_title("channels that move the presence logit most (gradient x activation = ablation)", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the train stage's glue

class Monitor:
    """One fold's diagnostics while it trains: per-epoch health, warnings, end-of-training artefacts.

    Its `state()` goes into last.pt, so a resumed run keeps its history and warnings.
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
        """Write fold_K.json (history, warnings) and, when enabled, the figures of `model`.

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
            figures.append(f"{prefix}_{name}.png")

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
        order = np.argsort(-np.abs(contrib).mean(axis=0))[:TOP_CHANNELS]
        nerve, empty = (contrib[rows].mean(axis=0) if rows.any() else np.full(contrib.shape[1], np.nan)
                        for rows in (present, ~present))
        return {"figures": figures,
                "pca": {k: pca[k] for k in ("components_90", "components_99", "rank", "samples", "channels")}
                | {"explained": np.round(pca["explained"][:64], 6).tolist()},
                "attribution": [{"channel": int(c), "mean_abs": float(np.abs(contrib[:, c]).mean()),
                                 "mean_nerve": float(nerve[c]), "mean_empty": float(empty[c])} for c in order]}
