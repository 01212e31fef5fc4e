"""Checkpoints: what they hold, that they are data and never code, and one training fold's files.

A crafted pickle whose unpickling would run a command (here: create a sentinel file) is
refused with a one-line CheckpointError by every path that reads a checkpoint (prediction,
training's resume from last.pt), and the command never runs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NORM, mark_trained
from helpers import TINY_TRAIN as TINY
from pipeline.stages import predict
from pipeline.model.checkpoints import (REFUSED, CheckpointError, FoldFiles, load_checkpoint, read_checkpoint,
                                  save_checkpoint)
from pipeline.model.network import build_model, split_outputs


class _RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch '{self.sentinel}'",)


def _crafted(path: Path, sentinel: Path) -> Path:
    """A file that looks like a pipeline checkpoint, with code hidden in its pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": build_model(TINY).state_dict(), "config": {}, "norm": NORM, "payload": _RunsCode(sentinel)}
    torch.save(state, path)
    return path


def test_the_crafted_file_would_run_code_with_a_plain_torch_load(tmp_path) -> None:
    """The test file is a real threat: the old `weights_only=False` load runs its command."""
    sentinel = tmp_path / "SENTINEL"
    torch.load(_crafted(tmp_path / "evil.pt", sentinel), weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("loader", [load_checkpoint, read_checkpoint])
def test_a_checkpoint_with_code_is_refused_and_never_run(loader, tmp_path) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = _crafted(tmp_path / "fold_0" / "best.pt", sentinel)
    with pytest.raises(CheckpointError) as err:
        loader(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {REFUSED}") and "\n" not in message, message
    assert "system" in message  # names what it wanted to call
    assert not sentinel.exists()


def test_prediction_refuses_a_fold_checkpoint_with_code(tmp_path) -> None:
    sentinel = tmp_path / "SENTINEL"
    save_checkpoint(tmp_path / "models" / "fold_0" / "best.pt", build_model(TINY), TINY, NORM)
    _crafted(tmp_path / "models" / "fold_1" / "best.pt", sentinel)
    mark_trained(tmp_path / "models", [0, 1])
    with pytest.raises(CheckpointError, match=r"fold_1/best.pt: not a checkpoint this pipeline wrote"):
        predict.Ensemble(tmp_path / "models", torch.device("cpu"))
    assert not sentinel.exists()


def test_training_never_resumes_from_a_last_checkpoint_with_code(tmp_path) -> None:
    sentinel = tmp_path / "SENTINEL"
    last = _crafted(tmp_path / "fold_0" / "last.pt", sentinel)
    log: list[str] = []
    files = FoldFiles(tmp_path / "fold_0", "any hash")
    assert files.resume(TINY.epochs, log.append) is None
    assert len(log) == 1 and log[0].startswith(f"{last}: {REFUSED}") and "starting this fold over" in log[0], log
    files.settle(None)  # starting over: the file is removed, never run
    assert not last.exists() and not sentinel.exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path) -> None:
    for name, content in (("list.pt", [1, 2]), ("tensor.pt", torch.zeros(2))):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{name}: {REFUSED}")):
            load_checkpoint(tmp_path / name)


def test_checkpoint_roundtrip_gives_the_same_outputs(tmp_path) -> None:
    torch.manual_seed(1)
    model = build_model(TINY).eval()
    save_checkpoint(tmp_path / "m.pt", model, TINY, {"mean": 0.3, "std": 0.2}, epoch=3)
    loaded, state = load_checkpoint(tmp_path / "m.pt", expect=TINY)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(split_outputs(model(x)), split_outputs(loaded.eval()(x))):
            assert torch.equal(a, b)
    assert state["norm"] == {"mean": 0.3, "std": 0.2} and state["epoch"] == 3


def test_checkpoint_for_another_config_is_refused(tmp_path) -> None:
    save_checkpoint(tmp_path / "m.pt", build_model(TINY), TINY, {"mean": 0.3, "std": 0.2})
    other = dataclasses.replace(TINY, decoder_channels=(32, 16, 8))
    with pytest.raises(CheckpointError, match="decoder_channels"):
        load_checkpoint(tmp_path / "m.pt", expect=other)


def test_checkpoints_hold_plain_data_only(tmp_path) -> None:
    """numpy values are converted when saving; objects that would need code to unpickle are refused then."""
    model = build_model(TINY)
    save_checkpoint(tmp_path / "m.pt", model, TINY, {"mean": np.float64(0.3), "std": 0.2},
                    extra={"a": np.arange(3), "b": np.int64(4), "c": (1, None, "x")})
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert type(state["norm"]["mean"]) is float and state["extra"]["b"] == 4 and type(state["extra"]["b"]) is int
    assert torch.equal(state["extra"]["a"], torch.arange(3)) and state["extra"]["c"] == (1, None, "x")
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]: a TrainParams cannot go into a checkpoint"):
        save_checkpoint(tmp_path / "bad.pt", model, TINY, {"mean": 0.3, "std": 0.2}, extra=TINY)
    assert not (tmp_path / "bad.pt").exists()


# ---------------------------------------------------------------- one training fold's files

def _training(t=TINY):
    torch.manual_seed(0)
    model = build_model(t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=10)
    return model, optimizer, scheduler


def test_fold_files_resume_mid_fold_from_last_and_a_finished_fold_from_done(tmp_path) -> None:
    log: list[str] = []
    files = FoldFiles(tmp_path / "fold_0", "hash A")
    assert files.resume(2, log.append) is None and log == []  # nothing yet: a fresh start, nothing to say
    model, optimizer, scheduler = _training()
    history = [{"epoch": 1, "val_dice": 0.5, "val_presence_auc": float("nan"), "lr": 1e-3}]
    files.save_best(model, TINY, NORM, epoch=1, metrics={"dice": 0.5})
    files.save_last(model, TINY, NORM, epoch=1, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                    history=history, best_dice=0.5, diagnostics={"epochs": [], "warnings": [], "init": {}})
    state = files.resume(2, log.append)
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng"} <= set(state) and log == []
    assert FoldFiles(files.folder, "hash B").resume(2, log.append) is None
    assert log == [f"{files.last}: saved for other train params or inputs; starting this fold over"]

    history.append({"epoch": 2, "val_dice": 0.75, "val_presence_auc": 0.9, "lr": 1e-4})
    files.finish(epoch=2, history=history, best_dice=0.75, diagnostics={"epochs": [{"epoch": 1}], "warnings": [],
                                                                        "init": {"encoder.conv1": 1.5}})
    assert sorted(p.name for p in files.folder.iterdir()) == ["best.pt", "done.json"]
    assert files.done.stat().st_size < 0.01 * files.best.stat().st_size
    done = files.resume(2, log.append)
    assert "model" not in done and done["epoch"] == 2 and done["best_dice"] == 0.75 and done["run_hash"] == "hash A"
    assert [list(row) for row in done["history"]] == [list(row) for row in history]  # key order: re-logged as saved
    assert np.isnan(done["history"][0]["val_presence_auc"]) and done["history"][1] == history[1]
    assert done["diagnostics"]["init"] == {"encoder.conv1": 1.5}
    assert files.resume(3, log.append) is None  # another epoch count is another run (it is in the hash too)


def test_fold_files_never_trust_another_runs_progress(tmp_path) -> None:
    log: list[str] = []
    a, b = FoldFiles(tmp_path, "hash A"), FoldFiles(tmp_path, "hash B")
    model, optimizer, scheduler = _training()
    a.save_best(model, TINY, NORM, epoch=1, metrics={})
    a.finish(epoch=2, history=[], best_dice=0.5, diagnostics=None)
    assert b.resume(2, log.append) is None
    assert log == [f"{a.done}: saved for other train params or inputs; starting this fold over"]
    b.settle(None)  # starting over removes A's marker: B's best.pt must never pass for A's finished fold
    assert not a.done.exists() and a.resume(2, log.append) is None

    # a kill between finish's two steps leaves done.json and last.pt: done.json wins, settle tidies last.pt
    a.save_last(model, TINY, NORM, epoch=1, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                history=[], best_dice=0.5, diagnostics=None)
    a.done.write_text(json.dumps({"run_hash": "hash A", "epoch": 2, "history": [], "best_dice": 0.5}))
    state = a.resume(2, log.append)
    assert "model" not in state
    a.settle(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "done.json"]

    a.best.unlink()  # a finished fold without its weights is trained again
    assert a.resume(2, log.append) is None and "best.pt: missing" in log[-1]


def _norm(model: torch.nn.Module) -> str | None:
    kinds = {type(m) for m in model.modules()}
    return "instance" if torch.nn.GroupNorm in kinds else "batch" if torch.nn.BatchNorm2d in kinds else None


def _pooling(model: torch.nn.Module) -> str | None:
    return {torch.nn.AdaptiveMaxPool2d: "max", torch.nn.AdaptiveAvgPool2d: "avg"}.get(type(model.classification_head[0]))


# A model setting that is not a weight shape: its non-default value, and which value a loaded model has.
SETTINGS = {"norm": ("instance", _norm), "presence_pooling": ("max", _pooling)}


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_a_non_default_model_setting_round_trips_and_is_refused_for_the_default(key: str, tmp_path) -> None:
    """`train.norm: instance` and `train.presence_pooling: max` leave state-dict shapes alone (pooling has no
    weights at all), so only the saved config keeps the checkpoint from loading as the default."""
    value, shows = SETTINGS[key]
    t = dataclasses.replace(TINY, **{key: value})
    torch.manual_seed(2)
    model = build_model(t).eval()
    save_checkpoint(tmp_path / "m.pt", model, t, NORM)
    loaded, _ = load_checkpoint(tmp_path / "m.pt", expect=t)
    assert shows(loaded) == value
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for want, got in zip(split_outputs(model(x)), split_outputs(loaded.eval()(x))):
            assert torch.equal(want, got)
    default = getattr(TINY, key)
    with pytest.raises(CheckpointError, match=f"train.{key} was {value!r}, params say {default!r}"):
        load_checkpoint(tmp_path / "m.pt", expect=TINY)


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_a_checkpoint_from_before_a_model_setting_loads_with_its_default(key: str, tmp_path) -> None:
    save_checkpoint(tmp_path / "m.pt", build_model(TINY), TINY, NORM)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["config"][key]
    torch.save(state, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt", expect=TINY)
    assert SETTINGS[key][1](loaded) == getattr(TINY, key)
