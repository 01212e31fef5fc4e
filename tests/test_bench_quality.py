"""The quality benchmark calls every stage as the stages are now: the cheap stages for real on a tiny
generated dataset, train / tune / predict as stand-ins that bind the real signatures (no training)."""
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest

from pipeline.data.artifacts import read_plan
from pipeline.model import probe
from pipeline.stages import predict, train, tune

ROOT = Path(__file__).resolve().parents[1]
RATES = probe.Throughput(train_seconds_per_image=0.01, eval_seconds_per_image=0.002, setup_seconds=1.0,
                         device="cpu", threads=1)


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_quality", module)
    spec.loader.exec_module(module)
    return module


def _stand_in(real, calls: list, effect):
    def fake(*args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)  # a stale call fails here, as it would for real
        calls.append((real.__module__, kwargs))
        return effect(*args, **kwargs)
    return fake


def test_every_row_runs_the_current_stage_signatures_with_one_plan(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "measure", lambda t, channels: RATES)
    calls: list = []

    def fake_tune(p, *, out, **_):
        Path(out).write_text(json.dumps({"pixel": 0.5, "presence": 0.5, "min_area": 0}))

    monkeypatch.setattr(bench.train, "run", _stand_in(train.run, calls, lambda *a, **k: {"dice": 0.5}))
    monkeypatch.setattr(bench.tune, "run", _stand_in(tune.run, calls, fake_tune))
    monkeypatch.setattr(bench.predict, "run", _stand_in(predict.run, calls, lambda *a, **k: {
        "synthetic_test_dice": 0.75, "synthetic_test_all_empty_dice": 0.5}))
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", "--subjects", "2", "--frames", "4", "--test-images", "2",
                                      "--budget", "16", "--seeds", "3", "--out", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    assert "seed 3: plan: budget 16 image-steps" in out
    assert "| 4. + tuned thresholds | 0.7500 | - |" in out and "| all-empty prediction | 0.5000 |" in out
    trains = [k for m, k in calls if m.endswith(".train")]
    assert len(trains) == 3 and {str(k["plan"]) for k in trains} == {str(tmp_path / "seed_3" / "plan.json")}
    assert read_plan(tmp_path / "seed_3" / "plan.json").values["train.budget"] == 16
