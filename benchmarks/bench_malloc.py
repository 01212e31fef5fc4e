"""Benchmark: CPU training steps with glibc's default allocator against `steady_malloc`, and what the
plan's throughput probe reads in a fresh process under each.

Each run is a new process (the allocator's state is per process), alternating the two arms. In it,
`pipeline.model.probe.measure` first times the planned network exactly as the plan stage does
(cold), then a fresh model trains `--steps` steps through the train stage's own loop on one batch
(`bench_train.step_rate`):
the mean time per image a fold pays, its first steps included. The "glibc default" arm replaces
`steady_malloc` with a no-op before the runtime is set up. Printed: both rates per run, their means
and spread per arm, the training speed-up, and the probe's error against the training rate.

    python benchmarks/bench_malloc.py [--params params.yaml] [--size 96 128] [--batch 8] [--runs 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ARMS = ("glibc default", "steady_malloc")


def child(arm: str, params: str, size: list[int], batch: int, steps: int) -> None:
    """One run in this process: the cold probe, then `steps` training steps of a fresh model; prints one JSON line."""
    from bench_train import step_rate   # this script's folder is on sys.path

    from pipeline.model import probe, runtime
    from pipeline.params import load_params

    if arm == ARMS[0]:
        runtime.steady_malloc = lambda: False
    t = dataclasses.replace(load_params(params).train, height=size[0], width=size[1], batch_size=batch,
                            encoder_weights="none")
    cold = probe.measure(t, in_channels=1)
    trained = 1 / step_rate(t, runtime.setup_runtime(t), tuple(size), batch, steps, warmup=0)
    print(json.dumps({"probe": cold.train_seconds_per_image, "steady": trained, "threads": cold.threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("HEIGHT", "WIDTH"),
                        help="working size (default: the plan's on the synthetic data on a CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="processes per arm")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per run")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.params, args.size, args.batch, args.steps)
        return
    rates: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for run in range(args.runs):
        for arm in ARMS:
            out = subprocess.run([sys.executable, __file__, "--child", arm, "--params", args.params,
                                  "--size", *map(str, args.size), "--batch", str(args.batch),
                                  "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rates[arm].append(r)
            print(f"run {run + 1} {arm:>14}: probe {1000 * r['probe']:.1f} ms/image, "
                  f"training {1000 * r['steady']:.1f} ms/image ({r['threads']} threads)", flush=True)
    print(f"\n{args.size[0]}x{args.size[1]}, batch {args.batch}, {args.runs} processes per arm")
    for arm in ARMS:
        probes = [1000 * r["probe"] for r in rates[arm]]
        steadies = [1000 * r["steady"] for r in rates[arm]]
        errors = [p / s for p, s in zip(probes, steadies)]
        print(f"{arm:>14}: training {statistics.mean(steadies):.1f} ms/image (range {min(steadies):.1f}-{max(steadies):.1f}); "
              f"probe / training {statistics.mean(errors):.2f} (range {min(errors):.2f}-{max(errors):.2f})")
    base = statistics.mean(r["steady"] for r in rates[ARMS[0]])
    ours = statistics.mean(r["steady"] for r in rates[ARMS[1]])
    print(f"training speed-up of steady_malloc: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
