"""Plan stage: every `auto` knob resolved from what the dataset is like and the device it runs on.

nnU-Net's central idea, for Kaggle-style 2-D binary segmentation: read a fingerprint of the
data, derive the configuration from it. Explicit values in params.yaml always win; the plan
(`reports/plan/plan.json`, a DVC metrics file, so `dvc exp show` lists it) says which values
were automatic and the facts they came from. Every later stage applies it to its params.

- working size (`train.height`/`width`): the dataset's median aspect ratio in a multiple of 32
  on each side, about `train.pixel_budget` pixels (12,288 on a CPU, 262,144 on a GPU); images
  that already fit the budget keep their size, rounded up to a multiple of 32 (101 -> 128); both
  sides doubled where the dataset's median object would cover fewer than `train.object_pixels`
  there (small objects need resolution more than the network needs context);
- dedup blocks (`dedup.grid`): about 20-px blocks at the median size (420x580: [21, 29], the
  same features as 20-px blocks); `dedup.scope`: within a subject when the data has groups;
- minimum areas (`tune.min_areas`): `tune.min_area_fractions` of the median image area;
- `train.batch_size` and `train.workers` from the device (GPU memory, CPU cores);
- the training budget (`train.budget`, image-steps: images per optimizer step x steps, over all
  trained folds; auto: 24 x the training images, at most `train.max_minutes` (an hour) of this
  device's measured throughput, or `train.budget_minutes` of it) spent on `train.train_folds`
  and `train.epochs`: as many folds as get `train.min_fold_steps` optimizer steps each (one long
  model beats several short ones on a small budget; a large budget trains every fold, for the
  full out-of-fold set and the ensemble), the epochs spreading the budget over them.

Before training starts the plan times a few real training steps of the planned network on this
device (`pipeline/model/probe.py`) and writes the run's estimated training time to `plan.json`
(`estimate`); the report sets it against the actual time. Where that timing would cap the auto
budget, the plan times the steps again `RECHECKS` times over about a minute and keeps the fastest:
another process only ever slows a step, and a short burst of work beside the probe (measured: a
peer's preprocessing, 5x slower steps for 46 s) must not halve a run's training.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.data.artifacts import Plan, read_fingerprint, write_plan
from pipeline.model.probe import Throughput
from pipeline.params import Params, TrainParams

CPU_BUDGET, GPU_BUDGET = 12_288, 262_144
BLOCK = 20   # px per dedup block side at the median size
CPU_BATCH = 8  # more optimizer steps per image-step than 16; measured better on real data (README "plan")
BUDGET_PER_IMAGE = 24  # auto budget: image-steps per training image (what 4 folds x 8 epochs of 3/4 of them take)
RECHECKS, RECHECK_PAUSE = 4, 15.0  # before a cap: probes again, seconds apart (spanning about a minute)


def working_size(height: float, width: float, budget: int, object_fraction: float | None = None,
                 object_pixels: int = 0) -> tuple[int, int]:
    """Multiples of 32 with the aspect ratio of height x width closest, about `budget` pixels; an image
    that fits keeps its size. Where the median object (`object_fraction` of the image) covers fewer
    than `object_pixels` there, both sides are doubled (the shape kept, 4 x the pixels): small
    objects need resolution more than the network needs context (measured on real data, README "plan")."""
    if height * width <= budget:
        h, w = 32 * math.ceil(height / 32), 32 * math.ceil(width / 32)
    else:
        aspect = math.log(height / width)
        candidates = [(h, w) for h in range(32, 4097, 32) for w in range(32, 4097, 32)
                      if budget / 2 <= h * w <= budget * 1.25]
        h, w = min(candidates, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - aspect), 3), -hw[0] * hw[1]))
    if object_fraction and object_fraction * h * w < object_pixels:
        h, w = 2 * h, 2 * w
    return h, w


def device_facts() -> dict[str, Any]:
    """What the plan needs of the machine: the accelerator (if any), its memory, the CPU cores."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cpu_cores": cores}
    return {"device": "cpu", "cpu_cores": cores}


def resolve(params: Params, facts: dict[str, Any], device: dict[str, Any],
            probe: Callable[[TrainParams], Throughput]) -> tuple[Plan, dict[str, Any]]:
    """The plan (every planned knob's value, resolved where it is `auto` in `params`, else as
    given) and the training-time estimate; `probe` times the resolved network on this device."""
    t, values = params.train, {}
    gpu = device["device"] == "cuda"
    budget = t.pixel_budget if t.pixel_budget != "auto" else GPU_BUDGET if gpu else CPU_BUDGET
    height, width = working_size(facts["median_height"], facts["median_width"], budget, facts["object_fraction"],
                                 t.object_pixels)
    pixels = (t.height if t.height != "auto" else height) * (t.width if t.width != "auto" else width)
    values["train.pixel_budget"] = budget
    values["train.height"], values["train.width"] = height, width
    memory = device.get("gpu_memory_gib", 0)
    values["train.batch_size"] = (int(np.clip(2 ** int(math.log2(max(1.0, memory * 2**30 / (pixels * 4 * 2**10)))), 8, 64))
                                  if gpu else CPU_BATCH)  # about 4 KiB of activations per pixel, a power of two
    values["train.workers"] = min(8, device["cpu_cores"] - 1) if gpu else 0
    values["dedup.grid"] = [max(1, round(facts["median_height"] / BLOCK)), max(1, round(facts["median_width"] / BLOCK))]
    values["dedup.scope"] = "subject" if facts["grouped"] else "global"
    area = facts["median_height"] * facts["median_width"]
    values["tune.min_areas"] = sorted({round(f * area) for f in params.tune.min_area_fractions})
    sized = dataclasses.replace(t, **{k.split(".")[1]: v if _get(params, k) == "auto" else _get(params, k)
                                      for k, v in values.items() if k.startswith("train.")})
    rates = probe(sized)
    rechecked = caps(sized, facts["images"], rates)
    if rechecked:
        rates = fastest(sized, rates, probe)
    values.update(spend(sized, facts["images"], rates))
    automatic = tuple(key for key in values if _get(params, key) == "auto")
    explicit = {key: _get(params, key) for key in values if key not in automatic}
    plan = Plan({**values, **{k: list(v) if isinstance(v, tuple) else v for k, v in explicit.items()}}, automatic)
    final = dataclasses.replace(sized, train_folds=plan.values["train.train_folds"], epochs=plan.values["train.epochs"])
    time_estimate = estimate(final, facts["images"], rates)
    if caps(sized, facts["images"], rates):
        time_estimate["budget_capped_from"] = BUDGET_PER_IMAGE * facts["images"]  # the image-steps train.max_minutes cut
    if rechecked:
        time_estimate["probe_rechecks"] = RECHECKS
    return plan, time_estimate


def caps(t: TrainParams, images: int, rates: Throughput) -> bool:
    """Whether `train.max_minutes` at these rates would cut the auto budget (24 x the training images)."""
    return (t.budget == "auto" and t.budget_minutes == 0 and t.max_minutes > 0
            and minutes_budget(t, images, rates, t.max_minutes) < BUDGET_PER_IMAGE * images)


def fastest(t: TrainParams, rates: Throughput, probe: Callable[[TrainParams], Throughput]) -> Throughput:
    """The fastest training rate of `rates` and `RECHECKS` more probes `RECHECK_PAUSE` seconds apart:
    the machine's own speed, not that of a moment when something else ran beside the probe."""
    for _ in range(RECHECKS):
        time.sleep(RECHECK_PAUSE)
        again = probe(t)
        if again.train_seconds_per_image < rates.train_seconds_per_image:
            rates = again
    return rates


def _fold_images(t: TrainParams, images: int) -> tuple[int, int, int]:
    """(training images of a fold, its validation images, image-steps of one of its epochs): subject
    folds hold about 1/folds of the images each; the loader drops a last partial batch."""
    val = max(1, round(images / t.folds))
    train = max(1, images - val)
    return train, val, (train // t.batch_size) * t.batch_size if train > t.batch_size else train


def minutes_budget(t: TrainParams, images: int, rates: Throughput, minutes: float) -> int:
    """Image-steps that take about `minutes` here: a second of training buys 1 / (a step's time + its
    share of the validation passes)."""
    _, val, per_epoch = _fold_images(t, images)
    per_image = rates.train_seconds_per_image + rates.eval_seconds_per_image * val / per_epoch
    return max(1, int(minutes * 60 / per_image))


def spend(t: TrainParams, images: int, rates: Throughput) -> dict[str, int]:
    """`train.budget` (image-steps), `train.train_folds` and `train.epochs`: the budget spent on as many
    folds as get `min_fold_steps` optimizer steps each, at least one; explicit values are kept.

    The auto budget stops at `max_minutes` of this device: 24 x the 5,635 Kaggle images is about
    85 minutes on a 2-core CPU, longer than a default run should take unasked."""
    per_epoch = _fold_images(t, images)[2]
    if t.budget != "auto":
        budget = t.budget
    elif t.budget_minutes > 0:
        budget = minutes_budget(t, images, rates, t.budget_minutes)
    else:
        budget = BUDGET_PER_IMAGE * images
        if t.max_minutes > 0:
            budget = min(budget, minutes_budget(t, images, rates, t.max_minutes))
    folds = (t.train_folds if t.train_folds != "auto"
             else int(np.clip(budget // (t.batch_size * t.min_fold_steps), 1, t.folds)))
    epochs = t.epochs if t.epochs != "auto" else max(1, round(budget / (folds * per_epoch)))
    return {"train.budget": budget, "train.train_folds": folds, "train.epochs": epochs}


def estimate(t: TrainParams, images: int, rates: Throughput) -> dict[str, Any]:
    """The training time the resolved plan will take here: each trained fold builds its model, runs its
    image-steps, and predicts its validation images after every epoch and once more with best.pt."""
    train, val, per_epoch = _fold_images(t, images)
    image_steps = t.train_folds * t.epochs * per_epoch
    seconds = (t.train_folds * rates.setup_seconds + image_steps * rates.train_seconds_per_image
               + t.train_folds * (t.epochs + 1) * val * rates.eval_seconds_per_image)
    return {"train_seconds": round(seconds, 1), "image_steps": image_steps,
            "optimizer_steps_per_fold": t.epochs * per_epoch // t.batch_size,
            "probe": {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(rates).items()}}


def _get(params: Params, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(params, section), name)


def dataset_facts(fingerprint: str | Path) -> dict[str, Any]:
    """The facts the plan uses, from the load stage's fingerprint of the training images."""
    fp = read_fingerprint(fingerprint)   # checked there: no NaN or 0 size can plan `train.height: 0`
    return {"median_height": float(fp["median_height"]), "median_width": float(fp["median_width"]),
            "grouped": not fp["one_image_per_group"], "groups": int(fp["groups"]), "images": int(fp["images"]),
            "sizes": fp["sizes"],
            "object_fraction": (fp.get("mask_area_fraction") or {}).get("q50")}  # median non-empty mask; None: all empty


def run(params: Params, *, fingerprint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write `out` (plan.json); returns the resolved values and the estimated training time."""
    from pipeline.model.probe import measure

    facts, device = dataset_facts(fingerprint), device_facts()
    channels = 3 if params.data.channels == "rgb" else 1
    plan, time_estimate = resolve(params, facts, device, lambda t: measure(t, channels))
    write_plan(out, plan, {"dataset": facts, "device": device}, time_estimate)
    minutes = time_estimate["train_seconds"] / 60
    summary = {**plan.values, "automatic": ", ".join(plan.automatic) or "none",
               "estimated_training": f"{minutes:.1f} min on this device ({time_estimate['image_steps']:,} image-steps, "
                                     f"{time_estimate['optimizer_steps_per_fold']} optimizer steps per fold)"}
    if "probe_rechecks" in time_estimate:
        summary["probe"] = (f"the first timing would have capped the budget: timed {RECHECKS} more times over "
                            f"{RECHECKS * RECHECK_PAUSE:g} s, the fastest kept")
    if "budget_capped_from" in time_estimate:
        summary["budget_capped"] = (f"at train.max_minutes ({params.train.max_minutes:g}) of this device, "
                                    f"{plan.values['train.budget']:,} of the {time_estimate['budget_capped_from']:,} "
                                    f"image-steps that {BUDGET_PER_IMAGE} x the training images would be; set train.budget or "
                                    f"train.max_minutes to train longer")
    return summary
