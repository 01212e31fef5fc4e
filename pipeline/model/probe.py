"""How fast this device trains the planned network: a few real steps, timed.

The plan turns a training budget into folds and epochs and estimates the run's time before it
starts; the rates come from timing real optimizer steps (the configured optimizer, the configured loss, bf16
autocast on CUDA, the same thread count as training) and forward passes of the planned model at
the working size and batch, on random data. Measuring beats a table of constants: CPUs,
encoders and sizes differ by more than any table could say.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from pipeline.model.losses import compute_loss
from pipeline.model.network import build_model, split_outputs, split_training_outputs, trainable
from pipeline.model.optimizers import build_optimizer
from pipeline.model.runtime import setup_runtime
from pipeline.params import TrainParams


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Seconds per image of a training step (forward, backward, optimizer) and of a forward pass."""

    train_seconds_per_image: float
    eval_seconds_per_image: float
    setup_seconds: float   # building the model and optimizer once (each trained fold does it)
    device: str
    threads: int


def measure(t: TrainParams, in_channels: int, steps: int = 8, warmup: int = 3) -> Throughput:
    """Time `steps` training steps and forward passes, one by one, after `warmup` untimed ones; each rate
    is the median step, so one step slowed by another process does not set the estimate.

    `t` must have its working size and batch size resolved (no `auto`). The caller's thread count is
    restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return _measure(t, in_channels, steps, warmup)
    finally:
        torch.set_num_threads(threads)


def _measure(t: TrainParams, in_channels: int, steps: int, warmup: int) -> Throughput:
    rt = setup_runtime(t)
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    model = build_model(dataclasses.replace(t, encoder_weights="none"), in_channels)
    trained = trainable(model, t).to(rt.device)  # as training builds it: side heads too with deep supervision
    if rt.device.type == "cuda":
        trained = trained.to(memory_format=torch.channels_last)
    optimizer, _ = build_optimizer(trained, t, steps + warmup)
    setup = time.perf_counter() - began
    x = torch.randn(t.batch_size, in_channels, t.height, t.width, generator=generator).to(rt.device)
    y = (torch.rand(t.batch_size, 1, t.height, t.width, generator=generator) > 0.9).float().to(rt.device)

    def train_step() -> None:
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            mask_logits, presence_logit, sides = split_training_outputs(trained(x))
        loss = compute_loss(mask_logits, presence_logit, y, t, sides)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def eval_step() -> None:
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            split_outputs(model(x))

    def timed(step, mode: bool) -> float:
        trained.train(mode)
        for _ in range(warmup):
            step()
        _sync(rt.device)
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            _sync(rt.device)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds) / t.batch_size

    train_rate = timed(train_step, True)
    eval_rate = timed(eval_step, False)
    return Throughput(train_rate, eval_rate, setup, rt.device.type, torch.get_num_threads())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
