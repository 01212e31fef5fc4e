"""Reliability (issue 7): bad input per stage, interruption by signals, properties of the pure
functions, numerical safety.

Bad inputs already covered next to their stage are not repeated here: the load stage's corrupt,
truncated, zero-byte, 16-bit, RGB, non-binary, unpaired, odd-sized and badly named files, empty and
missing folders (test_load.py, test_layouts.py); params typos, types and ranges (test_params.py,
test_dedup.py, test_clean.py), empty threshold grids (test_tune.py); broken oof.npz (test_tune.py);
missing checkpoints, thresholds and mixed sizes (test_predict.py, test_model.py); too few subjects
and a NaN loss (test_train.py); malformed RLE and submissions (test_rle.py). This file covers the
rest, each case through the command line exactly as DVC runs it: exit code 1, one `error:` line
naming the file or key, no traceback, and nothing written at any output path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy.spatial.distance import cdist
from typer.testing import CliRunner

from helpers import NORM, TINY_TRAIN, mark_trained
from pipeline.data import artifacts
from pipeline.stages import dedup, train, tune
from pipeline.model import transforms
from pipeline.atomic import LEDGER
from pipeline.cli import app
from pipeline.data.artifacts import read_manifest
from pipeline.model.metrics import dice_from_counts, dice_per_image, mean_dice
from pipeline.model.checkpoints import save_checkpoint
from pipeline.model.network import build_model
from pipeline.params import AugmentParams, DedupParams, Params, TrainParams, TuneParams
from pipeline.data.artifacts import Thresholds
from pipeline.model.postprocess import apply, binarize

REPO = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(TINY_TRAIN, threads=2)  # as PARAMS_YAML's train:
PARAMS_YAML = """\
seed: 5
dedup:
  grid: [6, 8]
train:
  encoder: resnet18
  encoder_depth: 3
  decoder_channels: [16, 8, 4]
  height: 64
  width: 64
  epochs: 2
  batch_size: 8
  folds: 3
  train_folds: 1
  lr: 0.003
  threads: 2
predict:
  batch_size: 2
  tta_flip: false
"""
if "diagnostics" in {f.name for f in dataclasses.fields(Params)}:
    PARAMS_YAML += "diagnostics:\n  enabled: false\n"  # its end-of-training figures cost seconds here

def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def temps_under(root: Path) -> list[Path]:
    """Leftovers of atomic writes (files or folders named `.NAME.pidPID.*.tmp`)."""
    return sorted(root.rglob(".*.tmp"))


# ---------------------------------------------------------------- the good inputs of every stage

@pytest.fixture(scope="module")
def good(tiny_raw: Path, tiny_interim: Path, tiny_plan: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Path]:
    """Valid inputs for every stage on the tiny dataset (96x128, 30 train and 6 test images)."""
    d = tmp_path_factory.mktemp("reliability_inputs")
    (d / "params.yaml").write_text(PARAMS_YAML)
    manifest = read_manifest(tiny_interim)
    train_rows = manifest[manifest.split == "train"]
    (d / "processed").mkdir()
    train_rows.to_csv(d / "processed" / "manifest.csv", index=False)
    artifacts.save_augmentation(transforms.build(AugmentParams(), seed=5), d / "augment.json")
    torch.manual_seed(0)
    save_checkpoint(d / "models" / "fold_0" / "best.pt", build_model(TINY), TINY, NORM)
    mark_trained(d / "models")
    (d / "thresholds.json").write_text(json.dumps(Thresholds().to_dict()))
    dedup.run(Params(dedup=DedupParams(grid=(6, 8))), interim=tiny_interim, plan=tiny_plan, out=d / "dedup",
              reports=d / "dedup_reports", progress=False)
    masks = np.load(tiny_interim / "train_masks.npy")[train_rows.row.to_numpy()]
    low = torch.nn.functional.avg_pool2d(torch.from_numpy(masks.astype(np.float32))[:, None], 2)[:, 0].numpy()
    (d / "oof").mkdir()
    np.savez(d / "oof" / "oof.npz", ids=np.asarray(train_rows.id, dtype=str), mask_prob=(low * 0.9).astype(np.float16),
             presence_prob=np.where(train_rows.has_mask, 0.9, 0.1).astype(np.float32))
    return {"raw": tiny_raw, "interim": tiny_interim, "params": d / "params.yaml", "dedup": d / "dedup",
            "manifest": d / "processed" / "manifest.csv", "augment": d / "augment.json", "models": d / "models",
            "thresholds": d / "thresholds.json", "oof": d / "oof", "plan": tiny_plan,
            "fingerprint": tiny_interim.parent / "fingerprint.json"}


def stage_args(stage: str, p: dict[str, Path], out: Path) -> tuple[list[object], list[Path]]:
    """(command line, output paths) of one stage with inputs `p`, writing under `out`."""
    params = ["--params", p["params"]]
    if stage == "synth":
        outs = [out / "raw"]
        return ["synth", "--out", outs[0], *params], outs
    if stage == "load":
        outs = [out / "interim", out / "load.json", out / "fingerprint.json"]
        return ["load", "--raw", p["raw"], "--out", outs[0], "--metrics", outs[1], "--fingerprint", outs[2],
                *params], outs
    if stage == "plan":
        outs = [out / "plan.json"]
        return ["plan", "--fingerprint", p["fingerprint"], "--out", outs[0], *params], outs
    if stage == "dedup":
        outs = [out / "dedup", out / "dedup_reports"]
        return ["dedup", "--interim", p["interim"], "--plan", p["plan"], "--out", outs[0], "--reports", outs[1],
                *params], outs
    if stage == "clean":
        outs = [out / "processed", out / "clean.json"]
        return ["clean", "--interim", p["interim"], "--dedup", p["dedup"], "--raw", p["raw"], "--out", outs[0],
                "--metrics", outs[1], *params], outs
    if stage == "augment":
        outs = [out / "augment.json", out / "preview.png"]
        return ["augment", "--interim", p["interim"], "--plan", p["plan"], "--out", outs[0], "--preview", outs[1],
                *params], outs
    if stage == "train":
        outs = [out / "models", out / "oof", out / "train_reports"]
        return ["train", "--interim", p["interim"], "--manifest", p["manifest"], "--augment", p["augment"],
                "--plan", p["plan"], "--models", outs[0], "--oof", outs[1], "--reports", outs[2], *params], outs
    if stage == "tune":
        outs = [out / "thresholds.json", out / "tune_reports"]
        return ["tune", "--oof", p["oof"], "--interim", p["interim"], "--plan", p["plan"], "--out", outs[0],
                "--reports", outs[1],
                *params], outs
    if stage == "predict":
        outs = [out / "submission" / "submission.csv", out / "predict.json"]
        return ["predict", "--interim", p["interim"], "--models", p["models"], "--thresholds", p["thresholds"],
                "--raw", p["raw"], "--out", outs[0], "--metrics", outs[1], *params], outs
    raise ValueError(stage)


def assert_clean_failure(result, fragments: list[str], outputs: list[Path], root: Path, one_line: bool = True) -> None:
    """Exit code 1, exactly one `error:` line (the problem list of the load stage may follow it),
    no traceback, every fragment in the message, no output and no temporary left."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    message = result.output[result.output.index("error: "):].rstrip("\n")
    if one_line:
        assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for path in outputs:
        assert not path.exists(), f"partial output {path}"
    assert temps_under(root) == []


# ---------------------------------------------------------------- breakages

def _copy(p: dict[str, Path], key: str, tmp: Path) -> Path:
    src = p[key]
    dst = tmp / "in" / key / src.name
    dst.parent.mkdir(parents=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    p[key] = dst
    return dst


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_manifest(p, tmp, edit: Callable[[pd.DataFrame], pd.DataFrame], key: str = "interim") -> None:
    folder = _copy(p, key, tmp)
    path = folder / "manifest.csv" if folder.is_dir() else folder
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def _edit_oof(p, tmp, edit: Callable[[dict], None]) -> None:
    folder = _copy(p, "oof", tmp)
    data = dict(np.load(folder / "oof.npz"))
    edit(data)
    np.savez(folder / "oof.npz", **data)


def _checkpoint(p, tmp, model: torch.nn.Module, t: TrainParams = TINY) -> None:
    folder = tmp / "in" / "bad_models"
    save_checkpoint(folder / "fold_0" / "best.pt", model, t, NORM)
    mark_trained(folder)
    p["models"] = folder


def _nan_model() -> torch.nn.Module:
    model = build_model(TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    return model


def _save_image(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


BAD_INPUTS = {
    # load: the cases test_load.py does not have
    "load-float-image": ("load", lambda p, t: _save_image(_copy(p, "raw", t) / "test" / "3.tif",
                                                          np.zeros((96, 128), np.float32)),
                         ["3.tif", "F image", "expected 8-bit"]),
    "load-mask-size-differs": ("load", lambda p, t: _save_image(_copy(p, "raw", t) / "train" / "1_2_mask.tif",
                                                                np.zeros((50, 60), np.uint8)),
                               ["1_2_mask.tif", "size 50x60 differs"]),
    # dedup
    "dedup-truncated-images": ("dedup", lambda p, t: _truncate(_copy(p, "interim", t) / "train_images.npy", 200),
                               ["train_images.npy: unreadable or truncated"]),
    "dedup-zero-byte-masks": ("dedup", lambda p, t: _truncate(_copy(p, "interim", t) / "train_masks.npy", 0),
                              ["train_masks.npy: unreadable or truncated"]),
    "dedup-manifest-rows": ("dedup", lambda p, t: _edit_manifest(p, t, lambda m: m.drop(index=3)),
                            ["manifest.csv: train rows do not match train_images.npy (29 rows for 30 images)"]),
    "dedup-manifest-column": ("dedup", lambda p, t: _edit_manifest(p, t, lambda m: m.drop(columns="split")),
                              ["manifest.csv: missing column(s) split"]),
    # clean
    "clean-no-interim": ("clean", lambda p, t: p.update(interim=t / "absent"),
                         ["absent/manifest.csv: not found (run the load stage first)"]),
    "clean-zero-byte-pairs": ("clean", lambda p, t: _truncate(_copy(p, "dedup", t) / "pairs.csv", 0),
                              ["pairs.csv: not a readable CSV"]),
    "clean-pairs-flags": ("clean", lambda p, t: _edit_pairs(p, t),
                          ["pairs.csv: column contradictory must hold True/False"]),
    # augment
    "augment-no-interim": ("augment", lambda p, t: p.update(interim=t / "absent"),
                           ["absent/manifest.csv: not found (run the load stage first)"]),
    "augment-no-train-rows": ("augment", lambda p, t: _edit_manifest(p, t, lambda m: m[m.split == "test"]),
                              ["manifest.csv: no training rows to preview"]),
    "augment-zero-byte-images": ("augment", lambda p, t: _truncate(_copy(p, "interim", t) / "train_images.npy", 0),
                                 ["train_images.npy: unreadable or truncated"]),
    # train: a missing or broken upstream output
    "train-no-clean-manifest": ("train", lambda p, t: p.update(manifest=t / "absent.csv"),
                                ["absent.csv: manifest not found (run the clean stage)"]),
    "train-no-augment": ("train", lambda p, t: p.update(augment=t / "absent.json"),
                         ["absent.json: augmentation pipeline not found"]),
    "train-garbage-augment": ("train", lambda p, t: _copy(p, "augment", t).write_text("{not json"),
                              ["augment.json: not an albumentations pipeline"]),
    "train-row-outside": ("train", lambda p, t: _edit_manifest(
        p, t, lambda m: m.assign(row=m.row.where(m.index != 0, "99")), key="manifest"),
                          ["manifest.csv: row 99", "outside the 30 training images"]),
    "train-no-masks": ("train", lambda p, t: (_copy(p, "interim", t) / "train_masks.npy").unlink(),
                       ["train_masks.npy: not found (run the load stage first)"]),
    # tune: a missing upstream output, non-finite or impossible probabilities
    "tune-no-interim": ("tune", lambda p, t: p.update(interim=t / "absent"),
                        ["absent/manifest.csv: not found (run the load stage first)"]),
    "tune-zero-byte-oof": ("tune", lambda p, t: _truncate(_copy(p, "oof", t) / "oof.npz", 0),
                           ["oof.npz: unreadable"]),
    "tune-nan-mask-prob": ("tune", lambda p, t: _edit_oof(p, t, lambda d: d["mask_prob"].__setitem__(
        (2, 5, 5), np.nan)), ["oof.npz: mask_prob: NaN/inf for 1 of 30 image(s), e.g. "]),
    "tune-inf-presence": ("tune", lambda p, t: _edit_oof(p, t, lambda d: d["presence_prob"].__setitem__(0, np.inf)),
                          ["oof.npz: presence_prob: NaN/inf for 1 of 30"]),
    "tune-presence-above-one": ("tune", lambda p, t: _edit_oof(p, t, lambda d: d["presence_prob"].__setitem__(
        slice(0, 2), 1.5)), ["presence_prob: values outside [0, 1] for 2 of 30"]),
    # predict: checkpoints that do not fit, non-finite predictions, broken upstream outputs
    "predict-truncated-test-images": ("predict", lambda p, t: _truncate(_copy(p, "interim", t) / "test_images.npy",
                                                                        300),
                                      ["test_images.npy: unreadable or truncated"]),
    "predict-weights-of-another-config": ("predict", lambda p, t: _checkpoint(
        p, t, build_model(dataclasses.replace(TINY, decoder_channels=(32, 16, 8)))),
                                          ["fold_0/best.pt: its weights do not fit its saved model config"]),
    "predict-truncated-checkpoint": ("predict", lambda p, t: _truncate(_copy(p, "models", t) / "fold_0" / "best.pt",
                                                                       1000),
                                     ["fold_0/best.pt: unreadable checkpoint"]),
    "predict-rgb-checkpoint": ("predict", lambda p, t: _checkpoint(p, t, build_model(TINY, in_channels=3)),
                               ["trained on 3-channel input, but the test images have 1"]),
    "predict-nan-weights": ("predict", lambda p, t: _checkpoint(p, t, _nan_model()),
                            ["mask probabilities of the test images: NaN/inf for 2 of 2 image(s), e.g. 1, 2"]),
}


def _edit_pairs(p, tmp) -> None:
    folder = _copy(p, "dedup", tmp)
    pairs = pd.read_csv(folder / "pairs.csv", dtype=str, keep_default_na=False)
    pairs.assign(contradictory="yes").to_csv(folder / "pairs.csv", index=False)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(case: str, good, tmp_path) -> None:
    stage, breakage, fragments = BAD_INPUTS[case]
    p = dict(good)
    breakage(p, tmp_path)
    args, outputs = stage_args(stage, p, tmp_path / "out")
    assert_clean_failure(cli(*args), fragments, outputs, tmp_path, one_line=stage != "load")


def test_16_bit_masks_0_65535_are_accepted(good, tmp_path) -> None:
    """The documented decision: 16-bit 0/65535 masks load like 0/255 ones (16-bit *images* are refused)."""
    p = dict(good)
    raw = _copy(p, "raw", tmp_path)
    with Image.open(raw / "train" / "2_4_mask.tif") as img:
        mask = np.asarray(img) > 0
    _save_image(raw / "train" / "2_4_mask.tif", mask.astype(np.uint16) * np.uint16(65535))
    args, outputs = stage_args("load", p, tmp_path / "out")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    loaded = np.load(outputs[0] / "train_masks.npy")
    row = read_manifest(outputs[0]).set_index("id").loc["2_4", "row"]
    assert np.array_equal(loaded[row], mask)


# a typo in the stage's own params section: every command names the key and writes nothing
TYPOS = {"synth": "synth:\n  subject: 3\n", "load": "data:\n  chanels: gray\n", "dedup": "dedup:\n  treshold: 0.1\n",
         "clean": "clean:\n  policy: 3\n", "augment": "augment:\n  hflip_p: yes please\n",
         "train": "train:\n  epoch: 3\n", "tune": "tune:\n  pixel_thresholds: []\n",
         "predict": "predict:\n  batch_size: 0\n"}
TYPO_KEYS = {"synth": "synth.subject", "load": "data.chanels", "dedup": "dedup.treshold", "clean": "clean.policy",
             "augment": "augment.hflip_p", "train": "train.epoch", "tune": "tune.pixel_thresholds",
             "predict": "predict.batch_size"}


@pytest.mark.parametrize("stage", list(TYPOS))
def test_every_stage_command_names_a_bad_params_key(stage: str, good, tmp_path) -> None:
    p = dict(good, params=tmp_path / "params.yaml")
    p["params"].write_text(TYPOS[stage])
    args, outputs = stage_args(stage, p, tmp_path / "out")
    assert_clean_failure(cli(*args), ["params.yaml", TYPO_KEYS[stage]], outputs, tmp_path)


# ---------------------------------------------------------------- numerical safety

def test_train_refuses_non_finite_validation_predictions() -> None:
    """A finite loss can hide NaN weights on the validation side; NaN > 0.5 is False, a silent 'empty'."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 64, 64), dtype=np.float32)
    y = np.zeros((4, 64, 64), np.uint8)
    fold = train.Fold(0, x, y, x, y, NORM, "hash")
    rt = train.Runtime(torch.device("cpu"), amp=False)
    _, _, metrics = train.validate(build_model(TINY), fold, TINY, rt)
    assert np.isfinite(metrics["loss"])
    with pytest.raises(train.TrainingError, match=r"fold 0: the model predicts NaN/inf for validation images"):
        train.validate(_nan_model(), fold, TINY, rt)


# ---------------------------------------------------------------- interruption

# Loaded into the killed subprocess through PYTHONPATH: it pauses the process right before its
# K-th atomic rename (the moment a temporary is complete but not yet in place), prints a marker and
# waits there for the signal. Nothing in the pipeline is changed; `python -m pipeline` runs as DVC runs it.
PAUSE_HOOK = r'''
import os, sys, time
_k = int(os.environ.get("RELIABILITY_PAUSE_BEFORE_RENAME", "0"))
if _k:
    _replace, _seen = os.replace, [0]

    def _paused_replace(src, dst, *args, **kwargs):
        if ".pid" in os.path.basename(os.fspath(src)) + os.path.basename(os.fspath(dst)):
            _seen[0] += 1
            if _seen[0] == _k:
                import signal
                # inside a stage's commit SIGINT/SIGTERM are held back until it ends: pause briefly
                held = "_signals_held" in getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
                print(f"\nRELIABILITY-PAUSED before renaming {os.fspath(src)} -> {os.fspath(dst)}",
                      file=sys.stderr, flush=True)
                time.sleep(3 if held else 600)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _paused_replace
'''


@contextlib.contextmanager
def recorded_renames(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The destinations of the atomic renames of an in-process run, in order (the hook's count)."""
    seen: list[str] = []
    real = os.replace

    def recording(src, dst, *args, **kwargs):
        if ".pid" in os.path.basename(os.fspath(src)) + os.path.basename(os.fspath(dst)):
            seen.append(os.path.basename(os.fspath(dst)))
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", recording)
        yield seen


def kill_at_rename(args: list[object], k: int, sig: signal.Signals, hook_dir: Path,
                   timeout: float = 240) -> tuple[int, int, str]:
    """Run `python -m pipeline ARGS`, signal it while it is paused before its k-th atomic rename.

    Returns (pid, exit code, stderr). Fallback: if the pause is never reached within `timeout`
    (the process exits or hangs), it is killed and the test fails with its stderr.
    """
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO)]), PYTHONUNBUFFERED="1",
               RELIABILITY_PAUSE_BEFORE_RENAME=str(k), NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    paused = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("RELIABILITY-PAUSED"):
                paused.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not paused.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
        pass
    proc.send_signal(sig if paused.is_set() else signal.SIGKILL)
    code = proc.wait(timeout=60)  # reaped: its pid is dead, so its temporaries count as stale
    reader.join(timeout=10)
    assert paused.is_set(), f"never paused before rename {k} (exit {code}):\n{''.join(lines)[-3000:]}"
    return proc.pid, code, "".join(lines)


def snapshot(path: Path) -> dict[str, object] | None:
    """Comparable contents of an output file or folder, as DVC sees it (temporaries are in .dvcignore,
    and checked separately), timings dropped from JSON; None when absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not any(
        part.startswith(".") and part.endswith(".tmp") for part in f.relative_to(path).parts))
    out: dict[str, object] = {}
    for f in files:
        key = str(f.relative_to(path)) if f != path else ""
        if f.suffix == ".json":
            out[key] = {k: v for k, v in json.loads(f.read_text()).items() if "seconds" not in k}
        elif "seconds" in f.name:
            out[key] = "timing"
        else:
            out[key] = f.read_bytes()
    return out


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED", random.randrange(10**6)))


def _assert_only_killed_temps(root: Path, pid: int, sig: signal.Signals, context: str) -> None:
    leftovers = temps_under(root)
    if sig == signal.SIGTERM:  # the handler unwinds: every atomic write removes its own temporary
        assert leftovers == [], f"{context}: SIGTERM left {leftovers}"
    else:  # SIGKILL cannot clean up: only the killed process's own, marked temporaries may remain
        assert all(f".pid{pid}." in t.name for t in leftovers), f"{context}: {leftovers}"


@pytest.mark.parametrize("stage, sig", [pytest.param(stage, sig, id=f"{stage}-{sig.name}") for stage, sig in (
    ("load", signal.SIGKILL), ("load", signal.SIGTERM), ("dedup", signal.SIGKILL), ("dedup", signal.SIGTERM),
    ("predict", signal.SIGKILL), ("predict", signal.SIGTERM))])
def test_killed_stage_leaves_whole_outputs_and_a_rerun_finishes_the_same(stage, sig, good, tmp_path,
                                                                         monkeypatch) -> None:
    """Killed right before a random one of its atomic renames (earlier outputs published, one complete
    temporary, later ones not started), a stage leaves each output absent, as before, or complete;
    re-running finishes with the same result as an uninterrupted run and no temporaries anywhere."""
    ref_root, run_root = tmp_path / "ref", tmp_path / "run"
    ref_args, ref_outputs = stage_args(stage, good, ref_root)
    args, outputs = stage_args(stage, good, run_root)
    assert cli(*ref_args).exit_code == 0  # an earlier output is in place: the rename over it is tested too
    for ref, path in zip(ref_outputs, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if ref.is_dir() else shutil.copy)(ref, path)
    for ledger in ref_root.rglob(LEDGER):  # the copies are this stage's earlier outputs, as in a real rerun
        shutil.copy(ledger, run_root / ledger.relative_to(ref_root))
    for path in outputs:  # an older run's outputs, each told apart from the new ones
        _mark_old(path)
    before = [snapshot(o) for o in outputs]
    with recorded_renames(monkeypatch) as renames:
        result = cli(*ref_args)
    assert result.exit_code == 0, result.output
    reference = [snapshot(o) for o in ref_outputs]
    assert all(old != new for old, new in zip(before, reference))
    seed = _seed()
    every = stage == "dedup" and sig == signal.SIGTERM  # the case: every rename, not a random one
    for k in range(1, len(renames) + 1) if every else [random.Random(seed).randint(1, len(renames))]:
        context = f"{stage} {sig.name} before rename {k} of {renames} (RELIABILITY_SEED={seed})"
        if k > 1 and every:  # back to the older run's outputs
            for ref, path in zip(ref_outputs, outputs):
                _remove_output(path)
                (shutil.copytree if ref.is_dir() else shutil.copy)(ref, path)
                _mark_old(path)
        pid, code, err = kill_at_rename(args, k, sig, tmp_path / "hook")
        if sig == signal.SIGTERM:
            assert code == 128 + signal.SIGTERM and "error: stopped by SIGTERM" in err, (context, code, err[-2000:])
        else:
            assert code == -signal.SIGKILL, (context, code)
        after = [snapshot(path) for path in outputs]
        if sig == signal.SIGKILL:  # nothing runs at SIGKILL: each output whole (or moved aside); the rerun repairs
            for path, now, old, new in zip(outputs, after, before, reference):
                assert now in (old, new, None), f"{context}: {path} is partial"
        else:  # SIGTERM is held back while the stage commits: its outputs are all old or all new
            assert after in (before, reference), f"{context}: outputs are a mix of two runs"
        _assert_only_killed_temps(tmp_path, pid, sig, context)

        result = cli(*args)  # what `dvc repro` does next
        assert result.exit_code == 0, (context, result.output)
        for path, new in zip(outputs, reference):
            assert snapshot(path) == new, f"{context}: {path} differs from an uninterrupted run"
        assert temps_under(tmp_path) == [], context


def _mark_old(path: Path) -> None:
    """Make an output recognisably an older run's: a JSON key or trailing bytes (in a folder: its first file)."""
    if path.is_dir():
        path = min(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    if path.suffix == ".json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "older_run": True}))
    else:
        path.write_bytes(path.read_bytes() + b"\n")


def _remove_output(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_killed_training_resumes_from_last_checkpoint(good, tmp_path, monkeypatch) -> None:
    """SIGKILL at a random atomic rename after epoch 1's last.pt (mid-checkpoint, before the OOF file):
    the checkpoints on disk stay loadable, the re-run resumes from last.pt, or from done.json once the
    fold is finished (its log says so and it trains only the missing epochs), and ends with the same
    weights and OOF as an uninterrupted run."""
    with recorded_renames(monkeypatch) as renames:
        ref_args, (ref_models, ref_oof, _) = stage_args("train", good, tmp_path / "ref")
        result = cli(*ref_args)
    assert result.exit_code == 0, result.output
    first_last = renames.index("last.pt") + 1
    seed = _seed()
    # after epoch 1's last.pt is in place, before the commit's first rename (oof.npz): a kill between
    # the commit's own renames is the documented exception to all-old-or-all-new (README, Guarantees)
    k = random.Random(seed).randint(first_last + 1, renames.index("oof.npz") + 1)
    context = f"train SIGKILL before rename {k} of {renames} (RELIABILITY_SEED={seed})"
    args, (models, oof, _) = stage_args("train", good, tmp_path / "run")

    pid, code, _ = kill_at_rename(args, k, signal.SIGKILL, tmp_path / "hook")
    assert code == -signal.SIGKILL, context
    fold = models / "fold_0"
    torch.load(fold / "best.pt", weights_only=False)  # whole: atomic, even mid-write
    if (fold / "done.json").exists():  # the fold was finished: its marker replaced last.pt
        done = json.loads((fold / "done.json").read_text())["epoch"]
    else:
        done = torch.load(fold / "last.pt", weights_only=False)["epoch"]
    assert done == renames[:k - 1].count("last.pt") + renames[:k - 1].count("done.json") >= 1, context
    assert not (oof / "oof.npz").exists(), context
    _assert_only_killed_temps(tmp_path, pid, signal.SIGKILL, context)

    result = cli(*args)
    assert result.exit_code == 0, (context, result.output)
    assert f"fold 0: resuming after epoch {done} of {TINY.epochs}" in result.output, context
    trained = re.findall(r"fold 0 epoch (\d+)/2: train loss", result.output)  # one per epoch trained
    assert trained == [str(e) for e in range(done + 1, TINY.epochs + 1)], (context, trained)
    assert temps_under(tmp_path) == [], context
    whole = torch.load(ref_models / "fold_0" / "best.pt", weights_only=False)["model"]
    resumed = torch.load(fold / "best.pt", weights_only=False)["model"]
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), f"{context}: {key}"
    a, b = np.load(ref_oof / "oof.npz"), np.load(oof / "oof.npz")
    assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["mask_prob"], b["mask_prob"])


# ---------------------------------------------------------------- properties of the pure functions

@st.composite
def block_images(draw):
    block = draw(st.sampled_from([1, 2, 4]))
    by, bx = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 3)), by * block, bx * block) + draw(st.sampled_from([(), (3,)]))
    return draw(arrays(np.uint8, shape)), block


@settings(max_examples=60, deadline=None)
@given(block_images(), st.integers(2, 16), st.randoms(use_true_random=False))
def test_block_histograms_count_every_pixel_of_its_block_once(images_block, bins, rnd) -> None:
    images, block = images_block
    grid = (images.shape[1] // block, images.shape[2] // block)
    features = dedup.block_histograms(images, grid, bins, progress=False)
    n, h, w = images.shape[:3]
    channels = images.shape[3] if images.ndim == 4 else 1
    per_block = features.reshape(n, (h // block) * (w // block), bins)
    assert (per_block.sum(axis=2) == block * block * channels).all()
    # shuffling the pixels inside one block (across its channels too) does not change the feature
    y, x = rnd.randrange(h // block), rnd.randrange(w // block)
    shuffled = images.copy()
    region = shuffled[:, y * block:(y + 1) * block, x * block:(x + 1) * block]
    flat = region.reshape(n, -1)
    for row in flat:
        rnd.shuffle(row)  # numpy row views: shuffled in place
    shuffled[:, y * block:(y + 1) * block, x * block:(x + 1) * block] = flat.reshape(region.shape)
    assert np.array_equal(dedup.block_histograms(shuffled, grid, bins, progress=False), features)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    arrays(np.int64, (n, 6), elements=st.integers(0, 40)), st.floats(0.0, 2.0), st.integers(1, 4),
    arrays(np.int64, n, elements=st.integers(0, 2)))))
def test_near_duplicate_pairs_equal_scipy_cosine(case) -> None:
    features, threshold, chunk, labels = case
    assume((features.sum(axis=1) > 0).all())  # a histogram always counts pixels
    expected = cdist(features.astype(np.float64), features.astype(np.float64), "cosine")
    pairs = expected[np.triu_indices(len(features), 1)]
    assume(not np.any(np.abs(pairs - threshold) < 1e-9))  # no pair on the boundary within rounding
    for scope in (None, labels):
        rows_a, rows_b, distance = dedup.near_duplicate_pairs(features, threshold, scope, chunk, progress=False)
        allowed = np.triu(expected < threshold, k=1)
        if scope is not None:
            allowed &= scope[:, None] == scope[None, :]
        assert set(zip(rows_a.tolist(), rows_b.tolist())) == set(zip(*map(np.ndarray.tolist, np.nonzero(allowed))))
        np.testing.assert_allclose(distance, expected[rows_a, rows_b], rtol=0, atol=1e-12)


small_probs = st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda s: arrays(np.float32, s, elements=st.floats(0, 1, width=32)))


@settings(max_examples=60, deadline=None)
@given(small_probs, st.floats(0, 1))
def test_empty_prediction_on_empty_truth_scores_one_everywhere_dice_is_computed(prob, presence_level) -> None:
    """Every Dice in the pipeline: metrics, tune's counting path, train's evaluate, dedup's pair Dice."""
    n = len(prob)
    empty = np.zeros(prob.shape, np.uint8)
    nothing = np.zeros(prob.shape, bool)
    assert (dice_per_image(nothing, empty) == 1).all() and mean_dice(nothing, empty) == 1.0
    assert (dice_from_counts(np.zeros(n), np.zeros(n), np.zeros(n)) == 1).all()
    presence = np.full(n, presence_level, np.float32)
    # tune: at pixel threshold 1.0 nothing is foreground, whatever the presence gate
    grid, _, metrics = tune.search(prob, empty, np.arange(n), presence,
                                   TuneParams(pixel_thresholds=(1.0,), presence_thresholds=(0.0, 0.5, 1.0),
                                              min_areas=(0, 5)))
    assert (grid.dice == 1.0).all() and metrics["dice_all_empty"] == 1.0
    # train: probabilities at or below the 0.5 gate predict empty, shown or gated
    low = (prob * 0.5).astype(np.float16)
    m = train.evaluate(low, presence, empty)
    assert m["dice"] == m["dice_tuned"] == m["empty_dice"] == 1.0
    # dedup: a pair of two empty masks agrees perfectly
    has_mask = np.zeros(n, bool)
    rows = np.arange(n)
    assert (dedup.pair_mask_dice(empty, has_mask, rows, rows[::-1], progress=False) == 1).all()


@settings(max_examples=60, deadline=None)
@given(small_probs, st.data())
def test_tune_counts_equal_thresholding_and_scoring_with_empty_masks(prob, data) -> None:
    """tune's arithmetic on counts == postprocess.apply + metrics.mean_dice, empty truths included."""
    n = len(prob)
    truth = data.draw(arrays(np.uint8, prob.shape, elements=st.integers(0, 1)))
    truth[data.draw(arrays(bool, n))] = 0  # many empty truths
    presence = data.draw(arrays(np.float32, n, elements=st.floats(0, 1, width=32)))
    p = TuneParams(pixel_thresholds=(0.2, 0.5), presence_thresholds=(0.0, 0.5), min_areas=(0, 3))
    grid, _, _ = tune.search(prob, truth, np.arange(n), presence, p)
    for row in grid.itertuples():
        t = Thresholds(row.pixel, row.presence, int(row.min_area), bool(row.keep_largest), row.min_component)
        assert row.dice == pytest.approx(mean_dice(apply(prob, presence, t), truth), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(small_probs, st.data())
def test_threshold_application_rules(prob, data) -> None:
    n = len(prob)
    presence = data.draw(arrays(np.float32, n, elements=st.floats(0, 1, width=32)))
    pixel, higher = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    gate, min_area = data.draw(st.floats(0, 1)), data.draw(st.integers(0, 20))
    raw = binarize(prob, pixel)
    out = apply(prob, presence, Thresholds(pixel, gate, min_area))
    for k in range(n):  # each mask is all or nothing of the thresholded pixels
        assert np.array_equal(out[k], raw[k]) or not out[k].any()
        assert out[k].any() == (raw[k].any() and presence[k] >= gate and raw[k].sum() >= min_area)
    assert np.array_equal(apply(prob, presence, Thresholds(pixel, 0.0, 0)), raw)  # gates off
    assert not (binarize(prob, higher) & ~raw).any()  # a higher threshold never adds a pixel
