"""The plan stage's training budget: how it is spent on folds and epochs, and the time estimate."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from pipeline.model import probe
from pipeline.model.losses import compute_loss
from pipeline.model.probe import Throughput
from pipeline.params import Params, TrainParams
from pipeline.stages import plan

RATES = Throughput(train_seconds_per_image=0.04, eval_seconds_per_image=0.01, setup_seconds=2.0, device="cpu",
                   threads=2)
FACTS = {"median_height": 420.0, "median_width": 580.0, "grouped": True, "groups": 12, "images": 480, "sizes": [],
         "object_fraction": 0.0171}
CPU = {"device": "cpu", "cpu_cores": 2}


def _train(**changes) -> TrainParams:
    return dataclasses.replace(TrainParams(height=96, width=128, batch_size=8, min_fold_steps=500), **changes)


def test_the_default_budget_of_a_small_dataset_trains_one_long_fold() -> None:
    t = dataclasses.replace(_train(), min_fold_steps=TrainParams().min_fold_steps)
    spent = plan.spend(t, 480, RATES)
    assert spent["train.budget"] == 24 * 480 and spent["train.train_folds"] == 1
    assert spent["train.epochs"] == 32  # 11,520 image-steps over 360 training images


def test_the_auto_budget_is_24_image_steps_per_image_spent_on_folds_of_min_fold_steps() -> None:
    spent = plan.spend(_train(), 480, RATES)
    assert spent["train.budget"] == 24 * 480
    # 11,520 image-steps at batch 8 are 1,440 optimizer steps: two folds of at least 500 each
    assert spent["train.train_folds"] == 2
    train, val, per_epoch = plan._fold_images(_train(), 480)
    assert (train, val, per_epoch) == (360, 120, 360)
    assert spent["train.epochs"] == round(11_520 / (2 * 360))


@pytest.mark.parametrize("budget, folds", [(100, 1), (3_999, 1), (4_000, 1), (8_000, 2), (16_000, 4), (10**7, 4)])
def test_a_small_budget_trains_one_long_fold_a_large_one_every_fold(budget: int, folds: int) -> None:
    spent = plan.spend(_train(budget=budget), 480, RATES)
    assert spent["train.train_folds"] == folds
    steps_per_fold = spent["train.epochs"] * 360 // 8
    assert folds == 1 or steps_per_fold >= 500 - 360 // 8  # min_fold_steps, up to the rounding to whole epochs
    assert spent["train.epochs"] >= 1


def test_explicit_folds_and_epochs_are_kept() -> None:
    spent = plan.spend(_train(train_folds=3, epochs=5), 480, RATES)
    assert (spent["train.train_folds"], spent["train.epochs"]) == (3, 5)
    assert plan.spend(_train(train_folds=3), 480, RATES)["train.epochs"] == round(11_520 / (3 * 360))


def test_a_budget_in_minutes_is_converted_with_the_measured_rates() -> None:
    fast = plan.spend(_train(budget_minutes=10.0), 480, RATES)
    slow = plan.spend(_train(budget_minutes=10.0), 480, dataclasses.replace(RATES, train_seconds_per_image=0.08,
                                                                           eval_seconds_per_image=0.02))
    per_image = 0.04 + 0.01 * 120 / 360  # a step plus its share of the validation passes
    assert fast["train.budget"] == int(600 / per_image)
    assert slow["train.budget"] == pytest.approx(fast["train.budget"] / 2, rel=0.01)
    estimate = plan.estimate(_train(train_folds=fast["train.train_folds"], epochs=fast["train.epochs"]), 480, RATES)
    assert estimate["train_seconds"] == pytest.approx(600, rel=0.1)  # what was asked for, up to rounding of epochs


SLOW = dataclasses.replace(RATES, train_seconds_per_image=0.3)  # 24 x 3,200 images: about 6.5 hours


def test_the_auto_budget_stops_at_max_minutes_of_this_device() -> None:
    spent = plan.spend(_train(), 3_200, SLOW)
    assert spent["train.budget"] == plan.minutes_budget(_train(), 3_200, SLOW, 60.0) < 24 * 3_200
    capped = _train(train_folds=spent["train.train_folds"], epochs=spent["train.epochs"])
    # about an hour, up to the rounding to whole epochs (2.5 epochs of 2,400 images become 2 here)
    assert plan.estimate(capped, 3_200, SLOW)["train_seconds"] == pytest.approx(3_600, rel=0.25)
    assert plan.spend(_train(max_minutes=30.0), 3_200, SLOW)["train.budget"] == pytest.approx(
        spent["train.budget"] / 2, rel=0.01)


@pytest.mark.parametrize("change", [{"max_minutes": 0.0}, {"budget": 24 * 3_200}, {"budget_minutes": 120.0}])
def test_no_cap_without_max_minutes_or_on_an_explicit_budget(change: dict) -> None:
    spent = plan.spend(_train(**change), 3_200, SLOW)
    assert spent["train.budget"] > plan.minutes_budget(_train(), 3_200, SLOW, 60.0)


def test_a_capped_budget_is_said_before_training(tmp_path: Path, monkeypatch) -> None:
    fingerprint = tmp_path / "fingerprint.json"
    fingerprint.write_text(json.dumps({"median_height": 101, "median_width": 101, "one_image_per_group": True,
                                       "groups": 3_200, "images": 3_200, "sizes": []}))
    monkeypatch.setattr(plan, "RECHECK_PAUSE", 0.0)
    probes = []
    monkeypatch.setattr(probe, "measure", lambda t, channels: probes.append(t) or SLOW)
    summary = plan.run(Params(), fingerprint=fingerprint, out=tmp_path / "plan.json")
    assert "train.max_minutes (60)" in summary["budget_capped"] and "76,800" in summary["budget_capped"]
    assert len(probes) == 1 + plan.RECHECKS and "timed 4 more times" in summary["probe"]  # slow every time
    estimate = json.loads((tmp_path / "plan.json").read_text())["estimate"]
    assert estimate["budget_capped_from"] == 76_800 and estimate["probe_rechecks"] == plan.RECHECKS
    minutes = Params(train=TrainParams(budget_minutes=30.0))  # asked for: a smaller budget, not a cap
    assert "budget_capped" not in plan.run(minutes, fingerprint=fingerprint, out=tmp_path / "plan.json")
    monkeypatch.setattr(probe, "measure", lambda t, channels: RATES)
    assert "budget_capped" not in plan.run(Params(), fingerprint=fingerprint, out=tmp_path / "plan.json")
    assert "budget_capped_from" not in json.loads((tmp_path / "plan.json").read_text())["estimate"]


def test_a_slow_moment_during_the_probe_does_not_cap_the_budget(monkeypatch) -> None:
    """Seen on USGRA-seg: a peer's preprocessing beside the probe timed steps 5x slower and the
    plan halved the run's training; before a cap the probe runs again and the fastest rate counts."""
    monkeypatch.setattr(plan, "RECHECK_PAUSE", 0.0)
    rates = iter([SLOW, SLOW, RATES, SLOW, SLOW])  # a burst of load that passes by the second recheck
    facts = {**FACTS, "images": 3_200}
    resolved, estimate = plan.resolve(Params(), facts, CPU, lambda t: next(rates))
    assert resolved.values["train.budget"] == 24 * 3_200 and "budget_capped_from" not in estimate
    assert estimate["probe"]["train_seconds_per_image"] == RATES.train_seconds_per_image
    assert estimate["probe_rechecks"] == plan.RECHECKS and next(rates, None) is None  # all four rechecks ran


def test_the_estimate_adds_steps_validation_and_setup() -> None:
    t = _train(train_folds=2, epochs=3)
    e = plan.estimate(t, 480, RATES)
    assert e["image_steps"] == 2 * 3 * 360
    assert e["optimizer_steps_per_fold"] == 3 * 360 // 8
    assert e["train_seconds"] == pytest.approx(2 * 2.0 + 2160 * 0.04 + 2 * 4 * 120 * 0.01)
    assert e["probe"]["train_seconds_per_image"] == 0.04


def test_resolve_times_the_resolved_network_and_keeps_explicit_values() -> None:
    seen = []

    def fake_probe(t: TrainParams) -> Throughput:
        seen.append(t)
        return RATES

    p = Params(train=TrainParams(epochs=2))
    resolved, estimate = plan.resolve(p, FACTS, CPU, fake_probe)
    assert len(seen) == 1 and "probe_rechecks" not in estimate  # no cap in sight: timed once
    assert (seen[0].height, seen[0].width, seen[0].batch_size) == (192, 256, 8)  # what it times is what trains
    assert resolved.values["train.epochs"] == 2 and "train.epochs" not in resolved.automatic
    assert "train.train_folds" in resolved.automatic and "train.budget" in resolved.automatic
    assert estimate["image_steps"] == resolved.values["train.train_folds"] * 2 * 360
    applied = resolved.apply(p).train
    assert (applied.epochs, applied.budget, applied.batch_size) == (2, 24 * 480, 8)


def test_run_writes_the_estimate_to_plan_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(probe, "measure", lambda t, channels: RATES)
    fingerprint = tmp_path / "fingerprint.json"
    fingerprint.write_text(json.dumps({"median_height": 420, "median_width": 580, "one_image_per_group": False,
                                       "groups": 12, "images": 480, "sizes": []}))
    summary = plan.run(Params(), fingerprint=fingerprint, out=tmp_path / "plan.json")
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["estimate"]["train_seconds"] > 0 and written["estimate"]["probe"]["device"] == "cpu"
    assert f"{written['estimate']['train_seconds'] / 60:.1f} min" in summary["estimated_training"]
    from pipeline.data.artifacts import read_plan
    assert read_plan(tmp_path / "plan.json").estimate == written["estimate"]  # read with the plan, one read


def test_the_probe_measures_real_steps_of_a_tiny_network() -> None:
    t = TrainParams(encoder_depth=3, decoder_channels=(16, 8, 4), height=32, width=32, batch_size=2, threads=1)
    rates = probe.measure(t, in_channels=1, steps=2, warmup=1)
    assert rates.train_seconds_per_image > 0 and rates.eval_seconds_per_image > 0
    assert rates.train_seconds_per_image > rates.eval_seconds_per_image  # a backward pass costs more than none
    assert rates.device == "cpu" and rates.threads == 1


def test_the_probe_takes_the_median_step_so_one_slow_step_does_not_set_the_rate(monkeypatch) -> None:
    calls = []

    def loss_with_one_stall(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:   # the second timed step (after one warm-up step) stalls for a second
            time.sleep(1.0)
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(probe, "compute_loss", loss_with_one_stall)
    t = TrainParams(encoder_depth=3, decoder_channels=(16, 8, 4), height=32, width=32, batch_size=2, threads=1)
    rates = probe.measure(t, in_channels=1, steps=5, warmup=1)
    assert len(calls) == 6
    assert rates.train_seconds_per_image < 1.0 / (5 * 2)  # the mean of the five steps would be at least this


@pytest.mark.parametrize("size, fraction, object_pixels, expected", [
    ((420, 580), 0.0171, 0, (96, 128)),      # off: the pixel budget alone, as before
    ((420, 580), 0.3, 400, (96, 128)),       # a large object already covers 3,686 working pixels
    ((420, 580), 0.0171, 400, (192, 256)),   # 210 pixels at 96x128: both sides doubled, the shape kept
    ((96, 100), 0.026, 400, (192, 256)),     # an image that fits the budget is enlarged past its own size
    ((48, 48), 0.107, 400, (64, 64)),        # 438 pixels at its own size: enough
    ((48, 48), 0.107, 1024, (128, 128)),
    ((48, 48), None, 1024, (64, 64)),        # every mask empty: no object size to go by
])
def test_small_objects_get_a_larger_working_size(size, fraction, object_pixels, expected) -> None:
    base = plan.working_size(*size, plan.CPU_BUDGET)
    h, w = plan.working_size(*size, plan.CPU_BUDGET, fraction, object_pixels)
    assert (h, w) == expected and h % 32 == 0 and w % 32 == 0
    assert (h, w) in (base, (2 * base[0], 2 * base[1]))
    assert ((h, w) != base) == bool(fraction and fraction * base[0] * base[1] < object_pixels)


def test_resolve_plans_the_working_size_from_the_median_object() -> None:
    p = Params(train=TrainParams(epochs=2, object_pixels=400))
    resolved, _ = plan.resolve(p, FACTS, CPU, lambda t: RATES)
    assert (resolved.values["train.height"], resolved.values["train.width"]) == (192, 256)
    no_objects = {**FACTS, "object_fraction": None}
    resolved, _ = plan.resolve(p, no_objects, CPU, lambda t: RATES)
    assert (resolved.values["train.height"], resolved.values["train.width"]) == (96, 128)


def test_the_default_threshold_doubles_objects_under_one_bottleneck_cell() -> None:
    """Default object_pixels: one 32x32 cell of the deepest feature map; USGRA-seg's empty-rich
    windows (48x48, median nerve 10.7%: 438 pixels at 64x64) are doubled, a 9% object at 96x128 is not."""
    t = Params().train
    assert t.object_pixels == (2 ** t.encoder_depth) ** 2
    windows = {**FACTS, "median_height": 48.0, "median_width": 48.0, "object_fraction": 0.107}
    resolved, _ = plan.resolve(Params(), windows, CPU, lambda t: RATES)
    assert (resolved.values["train.height"], resolved.values["train.width"]) == (128, 128)
    large = {**FACTS, "object_fraction": 0.09}
    resolved, _ = plan.resolve(Params(), large, CPU, lambda t: RATES)
    assert (resolved.values["train.height"], resolved.values["train.width"]) == (96, 128)


def test_dataset_facts_carry_the_median_object_fraction(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.data.artifacts import write_json
    from pipeline.data.fingerprint import fingerprint

    masks = [np.zeros((40, 50), bool) for _ in range(4)]
    masks[1][:10, :10] = True   # 5% of the image
    masks[2][:20, :10] = True   # 10%
    masks[3][:20, :20] = True   # 20%
    images = [np.full((40, 50), 100, np.uint8) for _ in masks]
    write_json(tmp_path / "fp.json", fingerprint(images=images, masks=masks, modes=["L"] * 4, groups=list("abcd"),
                                                 group_kind="subject"))
    assert plan.dataset_facts(tmp_path / "fp.json")["object_fraction"] == pytest.approx(0.10)
