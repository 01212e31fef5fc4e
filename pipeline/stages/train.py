"""Train stage: U-Net + mask-presence head on subject-grouped folds, resumable, with OOF probabilities.

Here: the folds, the monitoring metrics, one fold's training loop, and `run`; the losses are
`pipeline/model/losses.py`.
Each fold's files (`fold_K/best.pt`, `last.pt` after every unfinished epoch, `done.json` once
finished) are `pipeline/model/checkpoints.py`: a killed run continues from its last finished epoch and
ends with the same weights as an uninterrupted one, and a re-run with the same params and inputs
skips a finished fold. The same code runs single-process or under `torchrun`
(`pipeline/model/runtime.py`); rank 0 writes every file. The validation probabilities of the best
checkpoints go to `oof.npz` for the tune stage.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_dir, atomic_path, atomic_remove, claim, owner, scratch_dir
from pipeline.diagnostics import monitor as diagnostics
from pipeline.data.artifacts import (load_augmentation, open_arrays, read_plan, read_training_manifest, write_oof,
                                     write_trained_folds)
from pipeline.model.checkpoints import FoldFiles
from pipeline.codedeps import PACKAGE_DIR, code_files
from pipeline.model.losses import compute_loss
from pipeline.model.metrics import dice_per_image
from pipeline.model.network import (bare, build_model, channels_first, check_encoder, check_encoder_weights, split_outputs,
                                    split_training_outputs, trainable)
from pipeline.model.optimizers import build_optimizer
from pipeline.params import DiagnosticsParams, Params, TrainParams, to_dict
from pipeline.model.runtime import Runtime, setup_runtime, teardown
from pipeline.model.transforms import apply, sample_seed, working_arrays

GATE = 0.5  # pixel and presence threshold for the monitoring Dice; the tune stage picks the real ones
PRESENCE_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)
NOT_HASHED = ("workers", "threads")  # speed knobs: changing them must not restart training


class TrainingError(ValueError):
    """Training cannot go on (non-finite loss, too few subjects for the folds)."""


# ---------------------------------------------------------------- folds, loss, metrics

def subject_folds(subjects: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per image; every image of a subject lands in the same fold.

    Subjects are shuffled by `seed`, then placed largest first into the fold with the
    fewest images so far, so folds stay balanced after cleaning removed frames.
    """
    groups, inverse, counts = np.unique(np.asarray(subjects).astype(str), return_inverse=True, return_counts=True)
    if len(groups) < folds:
        raise TrainingError(f"train.folds: {folds} folds need at least {folds} subjects, the data has {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(folds, np.int64)
    fold_of = np.empty(len(groups), np.int64)
    for g in order:
        fold_of[g] = int(np.argmin(sizes))
        sizes[fold_of[g]] += counts[g]
    return fold_of[inverse]


class Ema:
    """Exponential moving average of a model's weights and buffers (BatchNorm statistics too).

    After each optimizer step every floating tensor of the state dict moves towards the trained
    model's: `avg += (1 - d) * (current - avg)` with `d = min(decay, (1 + n) / (10 + n))` after n
    earlier updates (the usual warm-up: short runs are not dominated by the random start);
    integer buffers (BatchNorm's batch counter) are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d, current = self.rate(), bare(model).state_dict()
        pairs = [(avg, current[k]) for k, avg in self.model.state_dict().items()]
        floats = [(a, c) for a, c in pairs if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in pairs:
            if not a.is_floating_point():
                a.copy_(c)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def presence_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC from average ranks (Mann-Whitney U); NaN when one class is missing."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(scores, np.float64), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(mask_prob: np.ndarray, presence_prob: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Competition Dice with presence gating at 0.5 and at the fold's best presence threshold,
    presence accuracy/AUC, and the all-empty baseline.

    `dice_tuned` picks the checkpoint: the presence head's ranking (AUC) settles early while
    its calibration on unseen subjects drifts from epoch to epoch, and the tune stage
    re-picks the threshold anyway. It is optimistic for the same reason.
    """
    present = truth.reshape(len(truth), -1).any(axis=1)
    if_shown = dice_per_image(mask_prob > GATE, truth)  # each image's Dice when its mask is kept

    def gated(threshold: float) -> float:
        return float(np.where(presence_prob > threshold, if_shown, ~present).mean())

    return {"dice": gated(GATE), "dice_tuned": max(gated(g) for g in PRESENCE_GRID),
            "empty_dice": float((~present).mean()),
            "presence_acc": float(((presence_prob > GATE) == present).mean()),
            "presence_auc": presence_auc(presence_prob, present)}


def pixel_stats(images: np.ndarray, chunk: int = 64) -> dict[str, float]:
    """Exact pixel mean and std in [0, 1] units from a histogram (no float copy of the images)."""
    counts = np.zeros(256, np.int64)
    for start in range(0, len(images), chunk):
        counts += np.bincount(np.asarray(images[start:start + chunk]).ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    return {"mean": mean, "std": max(std, 1e-6)}


# ---------------------------------------------------------------- data

class Samples(torch.utils.data.Dataset):
    """Working-size samples, normalised; augmented deterministically per (seed, epoch, index)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, norm: dict[str, float], transform: Any, seed: int):
        self.images, self.masks, self.norm, self.transform, self.seed = images, masks, norm, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = apply(self.transform, self.images[i], self.masks[i], sample_seed(self.seed, self.epoch, i))
        x = (channels_first(image[None])[0] - self.norm["mean"]) / self.norm["std"]
        return x, torch.from_numpy(np.ascontiguousarray(mask))[None].float()


# ---------------------------------------------------------------- one fold

@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold's data at the working size, plus everything that decides its training run."""

    index: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    norm: dict[str, float]
    run_hash: str


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, masks: np.ndarray, fold: Fold, t: TrainParams,
            rt: Runtime) -> tuple[np.ndarray, np.ndarray, float]:
    """(mask_prob float16 (n,h,w), presence_prob float32 (n,), summed loss) for working-size images."""
    model.eval()
    probs, presence, loss_sum = [], [], 0.0
    for start in range(0, len(images), t.batch_size):
        x = channels_first(images[start:start + t.batch_size])
        x = rt.to_device((x - fold.norm["mean"]) / fold.norm["std"])
        y = torch.from_numpy(masks[start:start + t.batch_size])[:, None].float().to(rt.device)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            mask_logits, presence_logit = split_outputs(model(x))
        loss_sum += float(compute_loss(mask_logits, presence_logit, y, t)) * len(x)
        probs.append(torch.sigmoid(mask_logits.float())[:, 0].to(torch.float16).cpu().numpy())
        presence.append(torch.sigmoid(presence_logit.float()).cpu().numpy().astype(np.float32))
    h, w = images.shape[1:3]
    if not probs:
        return np.zeros((0, h, w), np.float16), np.zeros(0, np.float32), 0.0
    return np.concatenate(probs), np.concatenate(presence), loss_sum


def validate(model: torch.nn.Module, fold: Fold, t: TrainParams, rt: Runtime) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Every rank predicts its strided share of the validation images; the shares are gathered
    exactly (no padding duplicates), so all ranks hold the same probabilities and metrics."""
    rt.broadcast_buffers(model)  # each rank updated its own BatchNorm statistics: use rank 0's, the saved ones
    share = np.arange(rt.rank, len(fold.x_val), rt.world)
    probs, presence, loss_sum = predict(model, fold.x_val[share], fold.y_val[share], fold, t, rt)
    parts = rt.gather((share, probs, presence, loss_sum))
    order = np.concatenate([p[0] for p in parts]).argsort(kind="stable")
    probs = np.concatenate([p[1] for p in parts])[order]
    presence = np.concatenate([p[2] for p in parts])[order]
    if not (np.isfinite(probs).all() and np.isfinite(presence).all()):  # NaN > 0.5 is False: a silent "empty"
        raise TrainingError(f"fold {fold.index}: the model predicts NaN/inf for validation images (diverged "
                            f"weights); lower train.lr (now {t.lr}) or check the input images")
    metrics = evaluate(probs, presence, fold.y_val)
    metrics["loss"] = sum(p[3] for p in parts) / max(1, len(fold.x_val))
    return probs, presence, metrics


def train_epoch(model: torch.nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                scheduler: Any, t: TrainParams, rt: Runtime, desc: str,
                on_step: Callable[[], None] | None = None, ema: Ema | None = None) -> float:
    """One pass over this rank's share of the training data; returns the mean loss over all ranks.

    `on_step` runs after each backward pass (the diagnostics read the gradients there); `ema`, when
    given, is updated after each optimizer step."""
    model.train()
    total = torch.zeros(2, device=rt.device)
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not rt.main, mininterval=1.0):
        x, y = rt.to_device(x), y.to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            mask_logits, presence_logit, sides = split_training_outputs(model(x))
        loss = compute_loss(mask_logits, presence_logit, y, t, sides)
        if rt.any(not bool(torch.isfinite(loss))):
            raise TrainingError(f"{desc}: the loss became {float(loss.detach())} (NaN/inf); lower train.lr "
                                f"(now {t.lr}) or check the input images")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if on_step is not None:
            on_step()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        total += torch.stack([loss.detach() * len(x), torch.tensor(float(len(x)), device=rt.device)])
    rt.sum_(total)
    return float(total[0] / total[1].clamp(min=1))


def fit_fold(fold: Fold, transform: Any, t: TrainParams, seed: int, fold_dir: Path, rt: Runtime,
             live: Any, d: DiagnosticsParams, diag_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train one fold (resuming where it stands for the same run hash), then predict its validation
    images with best.pt.

    Rank 0 runs the diagnostics: they read, never change, the model (pipeline/diagnostics/monitor.py)."""
    torch.manual_seed(seed + fold.index)  # each fold's start is independent of the folds before it
    model = build_model(t, in_channels=1 if fold.x_train.ndim == 3 else fold.x_train.shape[3])
    trained = trainable(model, t).to(rt.device)  # the model, or with deep supervision's side heads around it
    if rt.device.type == "cuda":
        trained = trained.to(memory_format=torch.channels_last)
    dataset = Samples(fold.x_train, fold.y_train, fold.norm, transform, seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                  seed=seed)
    # drop_last: a last batch of one or two images would drag the BatchNorm running statistics
    # (and with them the presence calibration) around from epoch to epoch
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.workers,
                                         pin_memory=rt.device.type == "cuda", drop_last=len(sampler) > t.batch_size)
    optimizer, scheduler = build_optimizer(trained, t, t.epochs * len(loader))
    files = FoldFiles(fold_dir, fold.run_hash)
    ema = Ema(model, t.ema) if t.ema > 0 else None
    evaluated = ema.model if ema else model  # what is validated and saved as best.pt
    start, history, best = 0, [], -1.0
    monitor = diagnostics.Monitor(d, fold.index, model, fold.x_val, fold.y_val, fold.norm, seed,
                                  rt.log) if rt.main else None
    state = files.resume(t.epochs, rt.log)
    rt.barrier()  # every rank has read the fold's files before rank 0 removes stale ones
    if rt.main:
        files.settle(state)
    if state is not None:
        files.restore(state, trained, optimizer, scheduler, rt.device, ema)
        start, history, best = state["epoch"], state["history"], state["best_dice"]
        if monitor:
            monitor.restore(state.get("diagnostics"))
        rt.log(f"fold {fold.index}: resuming after epoch {start} of {t.epochs} from "
               f"{files.last if 'model' in state else files.done}")
    elif monitor:
        monitor.start(model)
    for row in history:
        _log_epoch(live, fold.index, row)
    net = rt.wrap(trained)
    for epoch in range(start, t.epochs):
        began = time.perf_counter()
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        lr = scheduler.get_last_lr()[0]
        train_loss = train_epoch(net, loader, optimizer, scheduler, t, rt,
                                 f"fold {fold.index} epoch {epoch + 1}/{t.epochs}", monitor.grads if monitor else None,
                                 ema)
        with monitor.watch(evaluated) if monitor else contextlib.nullcontext({}) as alive:
            _, presence, val = validate(evaluated, fold, t, rt)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "val_loss": val["loss"],
               "val_dice": val["dice"], "val_dice_tuned": val["dice_tuned"], "val_presence_acc": val["presence_acc"],
               "val_presence_auc": val["presence_auc"], "seconds": time.perf_counter() - began}
        history.append(row)
        if monitor:
            row |= monitor.end_epoch(model, alive, history, presence, fold.y_val)
        _log_epoch(live, fold.index, row)
        rt.log(f"fold {fold.index} epoch {epoch + 1}/{t.epochs}: train loss {train_loss:.4f}, val loss "
               f"{val['loss']:.4f}, val Dice {val['dice']:.4f} (tuned gate {val['dice_tuned']:.4f}, all-empty "
               f"{val['empty_dice']:.4f}), presence acc "
               f"{val['presence_acc']:.3f} AUC {val['presence_auc']:.3f}, {row['seconds']:.1f}s")
        if rt.main:
            keep = val["dice_tuned"] > best if t.checkpoint == "best" else epoch + 1 == t.epochs
            if keep:
                files.save_best(evaluated, t, fold.norm, epoch=epoch + 1, metrics=val)
            best = max(best, val["dice_tuned"])
            progress = {"epoch": epoch + 1, "history": history, "best_dice": best,
                        "diagnostics": monitor.state() if monitor else None}
            if epoch + 1 < t.epochs:  # what the next epoch needs
                files.save_last(trained, t, fold.norm, optimizer=optimizer, scheduler=scheduler, device=rt.device,
                                ema=ema.state_dict() if ema else None, **progress)
            else:  # finished: best.pt and a small done.json stay, last.pt goes
                files.finish(**progress)
        rt.barrier()
    best_state = files.read_best(map_location=rt.device)
    model.load_state_dict(best_state["model"])
    probs, presence, _ = validate(model, fold, t, rt)
    warnings = monitor.finish(model, diag_dir) if monitor else 0
    return probs, presence, {"best_epoch": best_state["epoch"], "epochs": len(history),
                             "train_images": len(fold.x_train), "val_images": len(fold.x_val),
                             "diagnostic_warnings": warnings}


def _log_epoch(live: Any, fold: int, row: dict[str, float]) -> None:
    if live is None:
        return
    live.step = row["epoch"]
    for name, value in row.items():
        if name != "epoch":
            live.log_metric(f"fold_{fold}/{name}", value)


# ---------------------------------------------------------------- the stage

def _run_hash(t: TrainParams, seed: int, norm: dict[str, float], augment_bytes: bytes, ids: list[str],
              x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> str:
    """What decides the training run: resuming is only allowed when this is unchanged.

    DVC re-runs the stage both after a kill and after an edit of its code; only the first may resume.
    """
    h = hashlib.sha256()
    knobs = {k: v for k, v in to_dict(t).items() if k not in NOT_HASHED}
    h.update(json.dumps({"train": knobs, "seed": seed, "norm": norm}, sort_keys=True).encode())
    code = [(PACKAGE_DIR.parent / path).read_bytes() for path in code_files(__name__)]  # as dvc.yaml deps
    for part in (*code, augment_bytes, "\n".join(ids).encode(), x.tobytes(), y.tobytes(), folds.tobytes()):
        h.update(part)
    weights = Path(t.encoder_weights).expanduser()
    if t.encoder_weights not in ("none", "imagenet") and weights.is_file():  # a replaced file restarts too
        with weights.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def run(params: Params, *, interim: str | Path, manifest: str | Path, augment: str | Path, plan: str | Path,
        models: str | Path, oof: str | Path, reports: str | Path) -> dict[str, Any]:
    """Train `train.train_folds` of `train.folds` subject-grouped folds; returns the final metrics (rank 0)."""
    params = read_plan(plan).apply(params)
    t, seed, d = params.train, params.seed, params.diagnostics
    began = time.perf_counter()
    check_encoder(t.encoder)  # a typo fails here, before loading data or joining torchrun's group
    check_encoder_weights(t.encoder_weights)  # so does a missing weights file: nothing is touched yet
    rt = setup_runtime(t)
    rt.log(rt.describe())
    stack = contextlib.ExitStack()
    try:
        images, masks = open_arrays(interim, "train")
        table = read_training_manifest(manifest, len(images))
        rows = table.row.to_numpy()
        transform = load_augmentation(augment)
        norm = pixel_stats(images[rows])
        x, y = working_arrays(images[rows], masks[rows], (t.height, t.width), table[["height", "width"]].to_numpy(),
                              t.resize)
        folds = subject_folds(table.subject.to_numpy(), t.folds, seed)
        run_hash = _run_hash(t, seed, norm, Path(augment).read_bytes(), table.id.tolist(), x, y, folds)
        # dvclive cleans and fills its own folder: a private one, published with the commit at the end
        live_dir = stack.enter_context(scratch_dir(Path(reports) / "live")) if rt.main else None
        live = _open_live(live_dir) if rt.main else None
        oof_rows, oof_probs, oof_presence, per_fold = [], [], [], {}
        for k in range(t.train_folds):
            val = np.flatnonzero(folds == k)
            tr = np.flatnonzero(folds != k)
            fold = Fold(k, x[tr], y[tr], x[val], y[val], norm, run_hash)
            if rt.main:  # written in place from now on: recorded as this stage's first
                claim("train", [Path(models) / f"fold_{k}"])
            probs, presence, info = fit_fold(fold, transform, t, seed, Path(models) / f"fold_{k}", rt, live,
                                             d, Path(reports) / "diagnostics")
            oof_rows.append(val)
            oof_probs.append(probs)
            oof_presence.append(presence)
            per_fold[f"fold_{k}"] = {**info, **evaluate(probs, presence, fold.y_val)}
        if not rt.main:
            return {}
        val_rows = np.concatenate(oof_rows)
        probs, presence = np.concatenate(oof_probs), np.concatenate(oof_presence)
        ids = table.id.to_numpy()[val_rows].astype(str)
        write_oof(oof, ids=ids, mask_prob=probs, presence_prob=presence)
        overall = evaluate(probs, presence, y[val_rows])
        seconds = time.perf_counter() - began
        summary = {**{k: round(v, 4) for k, v in overall.items()},
                   "dice_gain": round(overall["dice"] - overall["empty_dice"], 4),
                   "oof_images": int(len(val_rows)), "train_seconds": round(seconds, 1),
                   "world_size": rt.world, **per_fold}
        live.summary = summary
        live.make_summary()
        _publish_live(live_dir, Path(reports))
        _publish_folds(Path(models), run_hash, list(range(t.train_folds)))
        return summary
    finally:
        stack.close()
        teardown(rt)


def _publish_live(live_dir: Path, reports: Path) -> None:
    """dvclive's metrics.json and plots/metrics/ into `reports`, with the commit (nothing else there
    is touched)."""
    with atomic_path(reports / "metrics.json") as tmp:
        shutil.copyfile(live_dir / "metrics.json", tmp)
    with atomic_dir(reports / "plots" / "metrics") as tmp:
        if (live_dir / "plots" / "metrics").is_dir():
            shutil.copytree(live_dir / "plots" / "metrics", tmp, dirs_exist_ok=True)


def _publish_folds(models: Path, run_hash: str, folds: list[int]) -> None:
    """With the commit: the list of this run's folds (all predict may use), and the removal of
    the fold folders this stage wrote for other settings (its ledger says which; others stay)."""
    write_trained_folds(models, run_hash=run_hash, folds=folds)
    current = {f"fold_{k}" for k in folds}
    for folder in sorted(models.glob("fold_*")):
        if folder.name not in current and re.fullmatch(r"fold_\d+", folder.name) and owner(folder) == "train":
            atomic_remove(folder)


def _open_live(reports_dir: str | Path) -> Any:
    """dvclive writing plots/metrics/*.tsv and metrics.json; dvc.yaml declares them itself."""
    from dvclive import Live

    return Live(dir=str(reports_dir), dvcyaml=None, save_dvc_exp=False, report=None)
