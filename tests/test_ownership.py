"""Issue 20, cases 1, 2 and 6: no command touches what it did not write (whatever the spelling of a
path, and in folders a library writes into), predict uses exactly the folds of the last train run,
and a stage's outputs, ledgers and messages agree after a failure or a signal."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import NORM, TINY_TRAIN
from pipeline import atomic
from pipeline.atomic import LEDGER, atomic_dir, atomic_path, owner, stage_commit
from pipeline.cli import app, friendly_errors
from pipeline.data import artifacts
from pipeline.data.artifacts import Thresholds, read_manifest
from pipeline.data.io import write_json
from pipeline.model import transforms
from pipeline.model.checkpoints import FoldFiles, save_checkpoint
from pipeline.model.network import build_model
from pipeline.params import AugmentParams
from pipeline.stages import predict

PARAMS_YAML = """\
seed: 5
train:
  encoder: resnet18
  encoder_depth: 3
  decoder_channels: [16, 8, 4]
  height: 64
  width: 64
  epochs: 1
  batch_size: 8
  folds: 3
  train_folds: {train_folds}
  lr: 0.003
  threads: 2
  encoder_weights: {weights}
predict:
  batch_size: 2
  tta_flip: false
diagnostics:
  enabled: false
"""


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def inputs(tiny_raw: Path, tiny_interim: Path, tiny_plan: Path, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ownership_inputs")
    for folds in (1, 2):
        (d / f"params{folds}.yaml").write_text(PARAMS_YAML.format(train_folds=folds, weights="none"))
    manifest = read_manifest(tiny_interim)
    (d / "processed").mkdir()
    manifest[manifest.split == "train"].to_csv(d / "processed" / "manifest.csv", index=False)
    artifacts.save_augmentation(transforms.build(AugmentParams(), seed=5), d / "augment.json")
    (d / "thresholds.json").write_text(json.dumps(Thresholds().to_dict()))
    return {"raw": tiny_raw, "interim": tiny_interim, "plan": tiny_plan, "manifest": d / "processed" / "manifest.csv",
            "augment": d / "augment.json", "thresholds": d / "thresholds.json", "dir": d}


def train_cli(p: dict[str, Path], params: Path, *, models: object, oof: object, reports: object):
    return cli("train", "--interim", p["interim"], "--manifest", p["manifest"], "--augment", p["augment"],
               "--plan", p["plan"], "--models", models, "--oof", oof, "--reports", reports, "--params", params)


@pytest.fixture(scope="module")
def trained(inputs: dict[str, Path], tmp_path_factory) -> Path:
    """A train run of two folds of three, then one of one fold (other settings), in one work folder."""
    work = tmp_path_factory.mktemp("trained")
    for folds in (2, 1):
        result = train_cli(inputs, inputs["dir"] / f"params{folds}.yaml", models=work / "models",
                           oof=work / "oof", reports=work / "reports")
        assert result.exit_code == 0, result.output
    return work


# ---------------------------------------------------------------- case 1: data loss


def test_train_reports_in_a_users_folder_leave_every_file_of_the_user(inputs, tmp_path) -> None:
    """dvclive cleans its folder at start-up: it now works in a private one, and train publishes only
    metrics.json and plots/metrics (the params file the stage reads sits in the same folder)."""
    mine = tmp_path / "mine"
    (mine / "plots" / "custom").mkdir(parents=True)
    for name in ("dvc.yaml", "report.md", "report.html", "plots/custom/mine.json"):
        (mine / name).write_text(f"the user's {name}")
    shutil.copy(inputs["dir"] / "params1.yaml", mine / "params.yaml")
    before = tree_bytes(mine)
    result = train_cli(inputs, mine / "params.yaml", models=tmp_path / "models", oof=tmp_path / "oof", reports=mine)
    assert result.exit_code == 0, result.output
    after = tree_bytes(mine)
    assert {k: after.get(k) for k in before} == before
    assert json.loads((mine / "metrics.json").read_text())["oof_images"] > 0
    assert sorted(p.name for p in (mine / "plots" / "metrics").iterdir()) == ["fold_0"]
    assert owner(mine / "metrics.json") == "train" and atomic._ours("train", mine / "plots" / "metrics")


@pytest.mark.parametrize("users", ["metrics.json", "plots/metrics/fold_0/val_dice.tsv", "diagnostics/fold_0.json"])
def test_train_refuses_a_reports_folder_holding_a_users_metrics_or_plots(inputs, tmp_path, users) -> None:
    mine = tmp_path / "mine"
    (mine / users).parent.mkdir(parents=True, exist_ok=True)
    (mine / users).write_text("the user's")
    before = tree_bytes(mine)
    result = train_cli(inputs, inputs["dir"] / "params1.yaml", models=tmp_path / "models", oof=tmp_path / "oof",
                       reports=mine)
    assert_refused(result, "already exists and was not written by the train stage", str(mine / users.split("/")[0]))
    assert tree_bytes(mine) == before and not (tmp_path / "models").exists()


def test_train_refuses_another_stages_reports_folder(inputs, tmp_path) -> None:
    tune_reports = tmp_path / "reports" / "tune"
    with stage_commit("tune"):
        write_json(tune_reports / "metrics.json", {"dice_best": 0.5})
    before = tree_bytes(tune_reports)
    result = train_cli(inputs, inputs["dir"] / "params1.yaml", models=tmp_path / "models", oof=tmp_path / "oof",
                       reports=tune_reports)
    assert_refused(result, f"{tune_reports / 'metrics.json'} was written by the tune stage, not train")
    assert tree_bytes(tune_reports) == before and owner(tune_reports / "metrics.json") == "tune"


@pytest.mark.parametrize("spelling", ["dotdot", "symlink"])
def test_models_spelled_through_dotdot_or_a_link_is_refused_like_the_plain_path(inputs, tmp_path, spelling) -> None:
    mine = tmp_path / "mymodels"
    (mine / "fold_0").mkdir(parents=True)
    (mine / "fold_0" / "best.pt").write_text("the user's best")
    (mine / "fold_0" / "last.pt").write_text("the user's last")
    before = tree_bytes(mine)
    if spelling == "dotdot":
        spelled = tmp_path / "missing" / ".." / "mymodels"
    else:
        (tmp_path / "link").symlink_to(mine)
        spelled = tmp_path / "link"
    result = train_cli(inputs, inputs["dir"] / "params1.yaml", models=spelled, oof=tmp_path / "oof",
                       reports=tmp_path / "reports")
    assert_refused(result, "already exists and was not written by the train stage", str(mine))
    assert tree_bytes(mine) == before
    assert not (tmp_path / "missing").exists() and not (tmp_path / "oof").exists()


def test_compare_refuses_a_users_file_or_folder_as_its_page(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "reports").mkdir()
    precious = tmp_path / "precious.md"
    precious.write_text("my notes")
    folder = tmp_path / "somefolder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for out in (precious, folder):
        result = cli("compare", "--out", out, "--params", tmp_path / "params.yaml", "--reports", tmp_path / "reports")
        assert_refused(result, f"{out} already exists and was not written by the compare stage")
    assert precious.read_text() == "my notes" and (folder / "keep.txt").read_text() == "mine"
    result = cli("compare", "--out", tmp_path / "page.html", "--params", tmp_path / "params.yaml",
                 "--reports", tmp_path / "reports")
    assert result.exit_code == 0, result.output
    assert owner(tmp_path / "page.html") == "compare" and "<html" in (tmp_path / "page.html").read_text().lower()


# ---------------------------------------------------------------- case 2: stale folds


def test_a_rerun_with_fewer_folds_lists_and_keeps_only_its_own(trained: Path) -> None:
    models = trained / "models"
    assert json.loads((models / "folds.json").read_text())["folds"] == [0]
    assert not (models / "fold_1").exists(), "the fold of the earlier 2-fold run was left beside the new one"
    assert owner(models / "folds.json") == "train" and owner(models / "fold_0") == "train"
    ensemble = predict.Ensemble(models, torch.device("cpu"))
    assert ensemble.paths == [models / "fold_0" / "best.pt"]


def test_predict_averages_only_the_listed_folds_whatever_else_is_in_the_folder(inputs, trained, tmp_path) -> None:
    """As DVC restores a persistent output's stale folds: another size, beside the current run's."""
    models = tmp_path / "models"
    shutil.copytree(trained / "models", models)
    other = dataclasses.replace(TINY_TRAIN, height=96, width=128)
    save_checkpoint(models / "fold_1" / "best.pt", build_model(other), other, NORM)
    FoldFiles(models / "fold_1", "an-older-run").finish(epoch=1, history=[], best_dice=0.5, diagnostics=None)
    (tmp_path / "params.yaml").write_text(PARAMS_YAML.format(train_folds=1, weights="none"))
    result = cli("predict", "--interim", inputs["interim"], "--models", models, "--thresholds", inputs["thresholds"],
                 "--raw", inputs["raw"], "--out", tmp_path / "sub.csv", "--metrics", tmp_path / "m.json",
                 "--params", tmp_path / "params.yaml")
    assert result.exit_code == 0, result.output
    assert "models: 1" in result.output


def _hand_made_models(root: Path, listed: list[int], finished: dict[int, str], run_hash: str = "run-a") -> Path:
    for k, fold_hash in finished.items():
        save_checkpoint(root / f"fold_{k}" / "best.pt", build_model(TINY_TRAIN), TINY_TRAIN, NORM)
        FoldFiles(root / f"fold_{k}", fold_hash).finish(epoch=1, history=[], best_dice=0.5, diagnostics=None)
    if listed:
        with stage_commit("train"):
            artifacts.write_trained_folds(root, run_hash=run_hash, folds=listed)
    return root


@pytest.mark.parametrize("case, fragment", [
    ("no list", "folds.json: not found"),
    ("fold of another run", "fold_1: not finished by the training run that"),
    ("fold missing", "fold_2: not finished by the training run that"),
    ("bad list", "folds.json: expected"),
])
def test_predict_refuses_folds_that_are_not_the_last_runs_in_one_line(tmp_path, case, fragment) -> None:
    models = tmp_path / "models"
    if case == "no list":
        _hand_made_models(models, [], {0: "run-a"})
    elif case == "fold of another run":
        _hand_made_models(models, [0, 1], {0: "run-a", 1: "run-b"})
    elif case == "fold missing":
        _hand_made_models(models, [0, 2], {0: "run-a"})
    else:
        _hand_made_models(models, [0], {0: "run-a"})
        (models / "folds.json").write_text('{"run_hash": "run-a", "folds": ["../../elsewhere"]}')
    with pytest.raises(Exception, match=fragment.replace("(", r"\(")):
        predict.Ensemble(models, torch.device("cpu"))


# ---------------------------------------------------------------- case 6: outputs that agree, true messages


def test_a_train_run_refused_for_bad_params_keeps_the_previous_metrics_and_plots(inputs, trained, tmp_path) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained, work, symlinks=True)
    before = tree_bytes(work)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_YAML.format(train_folds=1, weights=tmp_path / "missing_weights.pt"))
    result = train_cli(inputs, params, models=work / "models", oof=work / "oof", reports=work / "reports")
    assert_refused(result, "train.encoder_weights", "missing_weights.pt: no such file")
    assert tree_bytes(work) == before


def test_sigterm_after_the_outputs_were_swapped_in_says_they_were_written(tmp_path, monkeypatch, capsys) -> None:
    real = os.replace

    def signalled(src, dst, *args, **kwargs):
        result = real(src, dst, *args, **kwargs)
        if Path(dst).name == "metrics.json":  # the last rename of the commit
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    @friendly_errors
    def stage() -> None:
        with stage_commit("dedup"):
            with atomic_path(tmp_path / "pairs.csv") as tmp:
                tmp.write_text("new")
            with atomic_path(tmp_path / "metrics.json") as tmp:
                tmp.write_text("new")
        monkeypatch.setattr(os, "replace", real)

    monkeypatch.setattr(os, "replace", signalled)
    with pytest.raises(SystemExit) as stopped:
        stage()
    assert stopped.value.code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "already written" in err and "not written" not in err, err
    assert (tmp_path / "metrics.json").read_text() == "new" and (tmp_path / "pairs.csv").read_text() == "new"


def test_a_stage_stopped_before_any_work_leaves_no_folder_and_no_ledger(tmp_path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "augment.json").write_text("another stage's")
    with pytest.raises(KeyboardInterrupt):
        with stage_commit("train", immediate=[tmp_path / "models" / "train", tmp_path / "new" / "deep" / "models"]):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["augment.json"]


def test_a_stage_stopped_after_writing_in_place_keeps_its_claim(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with stage_commit("train", immediate=[tmp_path / "models"]):
            with atomic_path(tmp_path / "models" / "fold_0" / "last.pt") as tmp:
                tmp.write_text("epoch 1")
            raise KeyboardInterrupt
    assert owner(tmp_path / "models") == "train" and (tmp_path / "models" / "fold_0" / "last.pt").exists()


def _as_non_root(monkeypatch) -> None:
    """Removing an entry of a folder without write permission fails, as for any user but root."""
    if os.geteuid() != 0:
        return

    def guarded(real):
        def call(path, *args, dir_fd=None, **kwargs):
            parent = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(
                os.path.abspath(path))
            if not os.stat(parent).st_mode & stat.S_IWUSR:
                raise PermissionError(13, "Permission denied", path)
            return real(path, *args, dir_fd=dir_fd, **kwargs) if dir_fd is not None else real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "unlink", guarded(os.unlink))
    monkeypatch.setattr(os, "rmdir", guarded(os.rmdir))


def test_a_read_only_previous_output_leaves_no_temporary(tmp_path, monkeypatch) -> None:
    with stage_commit("load"):
        with atomic_dir(tmp_path / "interim") as tmp:
            (tmp / "arrays").mkdir()
            (tmp / "arrays" / "a.npy").write_text("old")
    (tmp_path / "interim" / "arrays").chmod(0o555)  # as DVC leaves a linked output
    _as_non_root(monkeypatch)
    try:
        with stage_commit("load"):
            with atomic_dir(tmp_path / "interim") as tmp:
                (tmp / "a.npy").write_text("new")
    finally:
        for folder in tmp_path.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
    assert (tmp_path / "interim" / "a.npy").read_text() == "new"
    assert sorted(tmp_path.rglob(".*.tmp")) == []


def test_a_figure_named_in_the_diagnostics_json_must_lie_in_its_folder(tmp_path) -> None:
    from pipeline.stages import report

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "secret.png")
    plt.close(fig)
    diag = tmp_path / "reports" / "train" / "diagnostics"
    diag.mkdir(parents=True)
    shutil.copy(tmp_path / "secret.png", diag / "fold_0_health.png")
    (diag / "fold_0.json").write_text(json.dumps({"fold": 0, "warnings": [], "figures": [
        {"file": "fold_0_health.png", "caption": "ok"}, {"file": "../../../secret.png", "caption": "outside"},
        {"file": str(tmp_path / "secret.png"), "caption": "absolute"}]}))
    section = report.diagnostics_section(tmp_path / "reports" / "train")
    shown = json.dumps(dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section.__dict__,
                       default=str)
    assert shown.count("<img") == 1 and 'alt=\\"fold_0_health.png\\"' in shown, shown[:3000]
    assert "'../../../secret.png' named in fold 0's JSON is not a file of that folder" in shown
