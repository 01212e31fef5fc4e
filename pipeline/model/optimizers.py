"""The optimizer and its learning-rate schedule, one place for training and the throughput probe.

adamw: AdamW with a one-cycle schedule (20% warm-up to `lr`, cosine down), this pipeline's own.
sgd:   nnU-Net's recipe: SGD with Nesterov momentum 0.99 and a polynomial decay
       lr x (1 - step / steps) ** 0.9, stepped per optimizer step rather than per epoch.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.params import TrainParams

POLY_EXPONENT = 0.9
SGD_MOMENTUM = 0.99


def build_optimizer(model: torch.nn.Module, t: TrainParams, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, scheduler) for `total_steps` optimizer steps; the scheduler steps after each one."""
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=SGD_MOMENTUM, nesterov=True,
                                    weight_decay=t.weight_decay)
        steps = max(1, total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1.0 - min(step, steps) / steps) ** POLY_EXPONENT)
        return optimizer, scheduler
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=max(1, total_steps),
                                                    pct_start=0.2)
    return optimizer, scheduler
