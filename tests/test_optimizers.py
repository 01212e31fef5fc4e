"""The optimizer and schedule each `train.optimizer` names (pipeline/model/optimizers.py)."""
import dataclasses

import pytest
import torch

from pipeline.model.optimizers import POLY_EXPONENT, build_optimizer
from pipeline.params import TrainParams


def _lrs(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_sgd_is_nesterov_with_nnunets_poly_decay():
    model = torch.nn.Linear(3, 1)
    t = dataclasses.replace(TrainParams(), optimizer="sgd", lr=0.01, weight_decay=3e-5)
    optimizer, scheduler = build_optimizer(model, t, total_steps=10)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert group["nesterov"] and group["momentum"] == 0.99 and group["weight_decay"] == 3e-5
    lrs = _lrs(optimizer, scheduler, 10)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs == pytest.approx([0.01 * (1 - k / 10) ** POLY_EXPONENT for k in range(10)])
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_adamw_warms_up_to_its_peak_and_anneals():
    model = torch.nn.Linear(3, 1)
    optimizer, scheduler = build_optimizer(model, TrainParams(), total_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = _lrs(optimizer, scheduler, 100)
    peak = max(range(100), key=lrs.__getitem__)
    assert 15 <= peak <= 25 and lrs[peak] == pytest.approx(TrainParams().lr, rel=1e-3)
    assert lrs[0] < lrs[peak] / 10 and lrs[-1] < lrs[peak] / 100
