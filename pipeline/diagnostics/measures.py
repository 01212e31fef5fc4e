"""Diagnostic measurements: plain functions of a model and a batch, each checked on a tiny model with
a known answer (tests/test_diagnostics.py).

None of them changes the model, its gradients, its BatchNorm statistics or the random streams.
A "layer" is a module that owns parameters (a convolution, a BatchNorm, a linear layer), named by
its path in the model; an "activation site" is one call of a ReLU module (ResNet blocks call
theirs twice: `name` and `name#2`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.model.network import split_outputs

TOP_CHANNELS = 20   # bottleneck channels listed by attribution


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

    With smp's presence head (average or max pool, then linear; dropout is off in eval) this is
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


def top_channels(contrib: np.ndarray, n: int = TOP_CHANNELS) -> np.ndarray:
    """The `n` channels of a (images, channels) attribution with the largest mean |contribution|."""
    return np.argsort(-np.abs(contrib).mean(axis=0))[:n]
