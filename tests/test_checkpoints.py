"""Checkpoints are data, never code: every loader reads them with `weights_only=True`.

A crafted pickle whose unpickling would run a command (here: create a sentinel file) is
refused with a one-line CheckpointError by every path that reads a checkpoint (prediction,
training's resume from last.pt), and the command never runs."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from pipeline import predict, train
from pipeline.model import REFUSED, CheckpointError, build_model, load_checkpoint, read_checkpoint, save_checkpoint
from pipeline.params import TrainParams

TINY = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 4), encoder_weights="none",
                   height=64, width=64, epochs=1, batch_size=8, folds=3, train_folds=1)
NORM = {"mean": 0.3, "std": 0.2}


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
    with pytest.raises(CheckpointError, match=r"fold_1/best.pt: not a checkpoint this pipeline wrote"):
        predict.Ensemble(tmp_path / "models", torch.device("cpu"))
    assert not sentinel.exists()


def test_training_never_resumes_from_a_last_checkpoint_with_code(tmp_path, capsys) -> None:
    sentinel = tmp_path / "SENTINEL"
    last = _crafted(tmp_path / "fold_0" / "last.pt", sentinel)
    assert train._resume_state(last, "any hash", TINY.epochs, train.Runtime(torch.device("cpu"), amp=False)) is None
    err = capsys.readouterr().err
    assert f"{last}: {REFUSED}" in err and "starting this fold over" in err, err
    assert not sentinel.exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path) -> None:
    for name, content in (("list.pt", [1, 2]), ("tensor.pt", torch.zeros(2))):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{name}: {REFUSED}")):
            load_checkpoint(tmp_path / name)
