"""Checkpoints: what a saved model holds, how it is written and read, and one fold's files on disk.

A checkpoint is a dict of plain data (weights, the model config, the input normalisation, and
whatever the caller adds), written atomically and read with `weights_only=True`: a file that
would import or call anything is refused with a CheckpointError, never run.

A training fold's folder (`FoldFiles`) holds:

- `best.pt`: the weights with the best validation Dice; prediction reads it.
- `last.pt`, while the fold is unfinished: the weights after the last finished epoch with the
  optimizer, scheduler, RNG state, history and the run hash, so a killed run resumes there.
- `done.json`, once the fold is finished: the run hash, the history and the diagnostics state,
  a few kB that tell a re-run with the same inputs to skip the fold. `last.pt` is removed then
  (with AdamW's two moments it is about three times the weights).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.artifacts import TRAINED_FOLDS, read_trained_folds
from pipeline.data.io import atomic_path, write_text
from pipeline.model.network import build_model, input_channels
from pipeline.params import TrainParams, _build

MODEL_KEYS = ("encoder", "encoder_depth", "decoder_channels", "encoder_weights", "presence_head", "presence_pooling",
              "norm", "height", "width")
SINCE_ADDED = {"norm": "batch", "presence_pooling": "avg"}  # model keys older checkpoints lack: their value then
REFUSED = "not a checkpoint this pipeline wrote, or it contains code (refused for safety)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the current configuration."""


def model_config(t: TrainParams, in_channels: int = 1) -> dict[str, Any]:
    """The params that decide the network's shape: a checkpoint is only valid for the same ones."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(t).items() if k in MODEL_KEYS}
    return {**config, "in_channels": in_channels}


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as what `torch.load(weights_only=True)` accepts: tensors, numbers, strings, bytes, None,
    bools, and lists/tuples/dicts of them. numpy arrays become tensors, numpy scalars Python numbers;
    anything else is a TypeError here, when saving, instead of a refused checkpoint later."""
    if isinstance(obj, np.generic):  # before the Python types: np.float64 is a float subclass
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (it must load with "
                    f"torch.load(weights_only=True))")


def save_checkpoint(path: str | Path, model: torch.nn.Module, t: TrainParams, norm: dict[str, float],
                    **extra: Any) -> None:
    """Atomically save weights with everything needed to rebuild and feed the model.

    Only plain data is written (see `plain`), so `read_checkpoint` can load it without running code."""
    state = plain({"model": model.state_dict(), "config": model_config(t, input_channels(model)),
                   "norm": dict(norm), **extra})
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's saved dict, unpickled with `weights_only=True`: a file that would import or call
    anything (code hidden in a pickle) is refused with a CheckpointError, never run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met a global it does not allow
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(f"{path}: {REFUSED}" + (f": it needs {found.group(1)}" if found else "")) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({first[:300]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {REFUSED}")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect: TrainParams | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint; with `expect`, refuse one saved for another model config."""
    path = Path(path)
    state = read_checkpoint(path, map_location)
    if not {"model", "config", "norm"} <= set(state):
        raise CheckpointError(f"{path}: not a pipeline checkpoint (missing model/config/norm)")
    config = {**SINCE_ADDED, **state["config"]}
    in_channels = config.pop("in_channels", 1)
    if expect is not None and config != {k: v for k, v in model_config(expect).items() if k != "in_channels"}:
        diff = {k: (config.get(k), v) for k, v in model_config(expect).items() if k in config and config[k] != v}
        raise CheckpointError(f"{path}: saved for a different model config: "
                              + ", ".join(f"train.{k} was {a!r}, params say {b!r}" for k, (a, b) in diff.items()))
    try:
        t = _build(TrainParams, config, "train")
        model = build_model(dataclasses.replace(t, encoder_weights="none"), in_channels)
        model.load_state_dict(state["model"])
    except Exception as exc:  # noqa: BLE001 - unknown encoder, config keys or weights that do not fit it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its weights do not fit its saved model config ({first[:300]})") from None
    return model, state


# ---------------------------------------------------------------- one training fold's files

def _json_value(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"a {type(obj).__name__} cannot go into done.json")


@dataclasses.dataclass(frozen=True)
class FoldFiles:
    """`fold_K/`: best.pt, last.pt while the fold trains, done.json once it is finished.

    `run_hash` names what decides the training run (params, inputs, code): a file saved for
    another hash is never resumed from."""

    folder: Path
    run_hash: str

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def done(self) -> Path:
        return self.folder / "done.json"

    def resume(self, epochs: int, log: Callable[[str], None]) -> dict[str, Any] | None:
        """Where this fold stands for the same params and inputs, else None (with the reason logged).

        A finished fold gives done.json's dict (`epoch`, `history`, `best_dice`, `diagnostics`; no
        weights: best.pt has them); an unfinished one last.pt's, with the model, optimizer,
        scheduler and RNG state to continue from."""
        done = self._read_done(log)
        if done is not None and done.get("run_hash") == self.run_hash and done.get("epoch") == epochs:
            if self.best.exists():
                return done
            log(f"{self.best}: missing although {self.done} marks the fold finished; starting this fold over")
            return None
        last = self._read_last(log)
        if last is not None:
            return last
        if done is not None:
            log(f"{self.done}: saved for other train params or inputs; starting this fold over")
        return None

    def finished(self) -> bool:
        """True when the fold finished for `run_hash`: its done.json says so and best.pt exists."""
        done = self._read_done(lambda message: None)
        return done is not None and done.get("run_hash") == self.run_hash and self.best.is_file()

    def _read_done(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        if not self.done.exists():
            return None
        try:
            done = json.loads(self.done.read_text())
        except (OSError, ValueError) as exc:
            log(f"{self.done}: unreadable ({exc}); starting this fold over")
            return None
        return done if isinstance(done, dict) else None

    def _read_last(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """last.pt's state when it was saved for the same params and inputs, else None.

        It is read with `weights_only=True`: a file hiding code is refused (and overwritten), never run."""
        if not self.last.exists():
            return None
        try:
            state = read_checkpoint(self.last, map_location="cpu")
        except CheckpointError as exc:  # unreadable, or not plain data: start over
            log(f"{exc}; starting this fold over")
            return None
        if state.get("run_hash") != self.run_hash:
            log(f"{self.last}: saved for other train params or inputs; starting this fold over")
            return None
        if not {"optimizer", "scheduler", "rng"} <= set(state):
            log(f"{self.last}: has no optimizer state to resume from; starting this fold over")
            return None
        return state

    def settle(self, state: dict[str, Any] | None) -> None:
        """Rank 0, once every rank has read `resume`: remove what this run will not continue from.

        Starting over, an earlier run's done.json and last.pt go, so that neither can be taken for
        this run's progress later (its best.pt is overwritten after the first epoch); a finished
        fold loses a last.pt that a kill between `finish`'s two steps left behind."""
        if state is None:
            self.done.unlink(missing_ok=True)
        if state is None or "model" not in state:
            self.last.unlink(missing_ok=True)

    def save_best(self, model: torch.nn.Module, t: TrainParams, norm: dict[str, float], *, epoch: int,
                  metrics: dict[str, float]) -> None:
        save_checkpoint(self.best, model, t, norm, epoch=epoch, metrics=metrics)

    def read_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return read_checkpoint(self.best, map_location=map_location)

    def save_last(self, model: torch.nn.Module, t: TrainParams, norm: dict[str, float], *, epoch: int,
                  optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                  history: list[dict[str, Any]], best_dice: float, diagnostics: dict[str, Any] | None,
                  ema: dict[str, Any] | None = None) -> None:
        """After an epoch that is not the fold's last: everything the next epoch needs (with `train.ema`
        on, the weight average's state too)."""
        cuda_rng = torch.cuda.get_rng_state() if device.type == "cuda" else None
        save_checkpoint(self.last, model, t, norm, epoch=epoch, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), rng={"torch": torch.get_rng_state(), "cuda": cuda_rng},
                        run_hash=self.run_hash, history=history, best_dice=best_dice, diagnostics=diagnostics,
                        **({"ema": ema} if ema is not None else {}))

    def finish(self, *, epoch: int, history: list[dict[str, Any]], best_dice: float,
               diagnostics: dict[str, Any] | None) -> None:
        """After the fold's last epoch: done.json in place first, then last.pt goes (a kill between
        the two leaves both, and `resume` trusts done.json)."""
        state = {"run_hash": self.run_hash, "epoch": epoch, "best_dice": best_dice, "history": history,
                 "diagnostics": diagnostics}
        write_text(self.done, json.dumps(state, default=_json_value) + "\n")  # key order kept: rows re-log as saved
        self.last.unlink(missing_ok=True)

    def restore(self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, device: torch.device, ema: Any = None) -> None:
        """Continue from last.pt's `state` (a finished fold's done.json has nothing to restore); `ema`,
        the weight average when `train.ema` is on, gets its saved state."""
        if "model" not in state:
            return
        if ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{self.last}: has no weight average although train.ema is on")
            ema.load_state_dict(state["ema"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])


def trained_fold_checkpoints(models: str | Path) -> list[Path]:
    """`best.pt` of each fold the models folder's `folds.json` lists: exactly the last train run's
    folds (predict averages them, export puts them in one graph), each finished by that run."""
    trained = read_trained_folds(models)
    for k in trained.folds:
        files = FoldFiles(Path(models) / f"fold_{k}", trained.run_hash)
        if not files.finished():
            raise CheckpointError(f"{files.folder}: not finished by the training run that "
                                  f"{Path(models) / TRAINED_FOLDS} lists (run the train stage again)")
    return [Path(models) / f"fold_{k}" / "best.pt" for k in trained.folds]
