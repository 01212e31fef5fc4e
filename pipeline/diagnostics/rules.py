"""Diagnostic warning rules: when a history of measurements means trouble.

Each rule is a pure function of numbers the measurements produced; `Monitor` (pipeline/diagnostics/monitor.py)
applies them per epoch and logs what they return.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

REL_TOL = 1e-3     # a loss must fall 0.1% below its best so far to count as an improvement
INIT_RATIO = 100.0  # at step 0, a layer output std this many times above or below the input's is flagged


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
