"""Benchmark: training throughput of the configured U-Net + presence head, in images per second.

Times `pipeline.stages.train.train_epoch` (forward, loss, NaN check, backward, AdamW step, scheduler)
on batches already on the device, so the model step is measured without data loading, at
the working size from params.yaml and at full resolution (416x576: 420x580 rounded down to
a multiple of 32). CUDA is used when present (bf16 autocast, channels_last), else the CPU
with the stage's thread count. It then times the data path of one DataLoader worker
(augment + normalise one sample, `pipeline.stages.train.Samples`) at both sizes, to show how many
workers training needs to keep the model step fed.

    python benchmarks/bench_train.py [--params params.yaml] [--batch N] [--iters N] [--warmup N]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.stages import train
from pipeline.model import transforms
from pipeline.model.network import build_model  # noqa: E402
from pipeline.params import TrainParams, load_params  # noqa: E402

FULL = (416, 576)


def step_rate(t: TrainParams, rt: train.Runtime, size: tuple[int, int], batch: int, iters: int, warmup: int) -> float:
    """Images per second of training steps on one fixed batch held on the device."""
    torch.manual_seed(0)
    model = build_model(t).to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    x = torch.randn(batch, 1, *size)
    y = (torch.rand(batch, 1, *size) > 0.9).float()
    x = x.to(rt.device, memory_format=torch.channels_last) if rt.device.type == "cuda" else x
    batches = [(x, y.to(rt.device))]
    for _ in range(warmup):
        train.train_epoch(model, batches, optimizer, scheduler, t, rt, "warmup")
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    train.train_epoch(model, batches * iters, optimizer, scheduler, t, rt, "timed")  # ends with a host sync
    return batch * iters / (time.perf_counter() - began)


def loader_rate(transform: object, size: tuple[int, int], samples: int) -> float:
    """Images per second of one worker producing augmented, normalised samples."""
    rng = np.random.default_rng(0)
    x = rng.random((8, *size), dtype=np.float32)
    y = (rng.random((8, *size)) > 0.9).astype(np.uint8)
    data = train.Samples(x, y, {"mean": 0.4, "std": 0.2}, transform, seed=0)
    began = time.perf_counter()
    for i in range(samples):
        data.epoch = i // len(data)  # a fresh draw for every sample
        data[i % len(data)]
    return samples / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, help="images per step (default: train.batch_size on CPU, 64 on CUDA)")
    parser.add_argument("--iters", type=int, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    args = parser.parse_args()
    p = load_params(args.params)
    t = p.train
    rt = train.setup_runtime(t)
    cuda = rt.device.type == "cuda"
    name = torch.cuda.get_device_name(rt.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; model: {t.encoder} depth {t.encoder_depth}, decoder {list(t.decoder_channels)}, "
          f"presence head {t.presence_head}" + (", bf16 autocast, channels_last" if rt.amp else ""))
    transform = transforms.build(p.augment, p.seed)
    for size in [(t.height, t.width), FULL]:
        batch = args.batch or (64 if cuda else (t.batch_size if size != FULL else 4))
        iters = args.iters or (20 if cuda else 3)
        rate = step_rate(dataclasses.replace(t, height=size[0], width=size[1]), rt, size, batch,
                         iters, args.warmup if args.warmup is not None else (5 if cuda else 1))
        feed = loader_rate(transform, size, 200)
        print(f"{size[0]}x{size[1]}: train step {rate:8.1f} img/s (batch {batch}, {iters} steps); "
              f"one loader worker {feed:7.1f} img/s -> {int(np.ceil(rate / feed))} worker(s) to keep up")


if __name__ == "__main__":
    main()
