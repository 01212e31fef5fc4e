"""Diagnostics: each measurement on a tiny model with a known answer, the warnings, the train-stage
hook-up, and that a checkpoint predicts the same in a fresh process (normalisation travels with it)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import TINY_TRAIN as TINY, run_train
from pipeline.stages import train
from pipeline.model import transforms
from pipeline.diagnostics.figures import CAPTIONS, filter_grid
from pipeline.diagnostics.measures import (TOP_CHANNELS, GradTracker, bottleneck_features, capture, dead_fractions,
                                    dead_overall, init_stds, pca_spectrum, presence_attribution, relu_alive,
                                    weight_norms)
from pipeline.diagnostics.rules import gradient_warnings, init_warnings, one_class, plateau_epochs
from pipeline.diagnostics.monitor import Monitor
from pipeline.model.network import build_model, preprocess, split_outputs
from pipeline.params import DiagnosticsParams, Params

DIAG = DiagnosticsParams(subset=8)


# ---------------------------------------------------------------- measurements with known answers

def test_gradient_and_weight_norms_match_a_hand_computation_on_a_linear_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    tracker = GradTracker(net)
    w, b = net[0].weight.detach().numpy().astype(np.float64), net[0].bias.detach().numpy().astype(np.float64)
    rng = np.random.default_rng(1)
    per_step = []
    for _ in range(2):
        x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
        net.zero_grad()
        nn.functional.mse_loss(net(torch.tensor(x, dtype=torch.float32)), torch.tensor(y, dtype=torch.float32)).backward()
        tracker()
        err = (x @ w.T + b - y) * 2 / y.size  # d(mean squared error)/d(prediction)
        per_step.append(np.sqrt(((err.T @ x) ** 2).sum() + (err.sum(axis=0) ** 2).sum()))
    norms, whole, peak = tracker.summary()
    assert norms == {"0": pytest.approx(np.mean(per_step), rel=1e-5)}  # one layer: its norm is the whole model's
    assert whole == pytest.approx(np.mean(per_step), rel=1e-5) and peak == pytest.approx(max(per_step), rel=1e-5)
    assert tracker.summary()[0] == {} and np.isnan(tracker.summary()[1])  # summary starts the next epoch
    assert weight_norms(net) == {"0": pytest.approx(np.sqrt((w ** 2).sum() + (b ** 2).sum()), rel=1e-6)}


def test_layers_without_gradients_are_left_out_not_called_vanishing() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    tracker = GradTracker(net)
    net[0](torch.ones(1, 2)).sum().backward()  # layer 1 unused, like smp's stages deeper than encoder_depth
    tracker()
    assert set(tracker.summary()[0]) == {"0"}


def _planted(bias2: list[float]) -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()       # layer 1 passes the input through: alive wherever a pixel is positive
        net[2].weight.zero_()
        net[2].bias.copy_(torch.tensor(bias2))  # layer 2: constant output, dead where the bias is negative
    return net.eval()


def test_a_planted_dead_layer_is_reported_dead() -> None:
    x = torch.randn(3, 1, 5, 5)
    with relu_alive(_planted([-1.0, -1.0, -1.0, -1.0])) as alive, torch.no_grad():
        _planted([-1.0, -1.0, -1.0, -1.0])(x)  # another model: must not be recorded
    assert alive == {}
    net = _planted([-1.0, -1.0, -1.0, -1.0])
    with relu_alive(net) as alive, torch.no_grad():
        net(x)
    assert dead_fractions(alive) == {"1": 0.0, "3": 1.0}
    net = _planted([-1.0, 0.5, -1.0, -1.0])
    with relu_alive(net) as alive, torch.no_grad():
        net(x)
    assert dead_fractions(alive) == {"1": 0.0, "3": 0.75}
    assert dead_overall(alive) == pytest.approx(3 / 8)


def test_dead_means_never_positive_over_all_batches_and_each_relu_call_is_its_own_site() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.relu(x) - 2.0)  # second call: inputs <= 1 - 2, always dead

    net = Twice()
    with relu_alive(net) as alive:
        net(-torch.rand(2, 1, 4, 4))  # first call sees only negatives in this batch...
    assert dead_fractions(alive) == {"relu": 1.0, "relu#2": 1.0}
    with relu_alive(net) as alive:
        net(-torch.rand(2, 1, 4, 4))
        net(torch.rand(2, 1, 4, 4))  # ...and positives in the next one: alive
    assert dead_fractions(alive) == {"relu": 0.0, "relu#2": 1.0}


def test_pca_finds_the_rank_and_the_components_of_a_planted_spectrum() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(40, 40)))[0]          # orthonormal directions in 40 dims
    scores = rng.normal(size=(500, 40))
    scores -= scores.mean(axis=0)
    scores = np.linalg.qr(scores)[0] * np.sqrt(499)               # centred, uncorrelated, unit variance
    equal = torch.tensor(scores[:, :5] @ basis[:5])               # rank 5, equal variances
    got = pca_spectrum(equal)
    assert (got["rank"], got["components_90"], got["components_99"]) == (5, 5, 5)
    np.testing.assert_allclose(got["explained"][:5], 0.2, atol=1e-9)
    planted = torch.tensor((scores[:, :4] * np.sqrt([0.5, 0.3, 0.15, 0.05])) @ basis[:4])
    got = pca_spectrum(planted)                                   # cumulative 0.5, 0.8, 0.95, 1.0
    assert (got["rank"], got["components_90"], got["components_99"]) == (4, 3, 4)
    np.testing.assert_allclose(got["eigenvalues"][:4], [0.5, 0.3, 0.15, 0.05], rtol=1e-9)


def test_bottleneck_features_are_positions_by_channels() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False))           # every channel a multiple of the input: rank 1
    feats = bottleneck_features(net, torch.randn(5, 1, 3, 4), net[0], batch=2)
    assert feats.shape == (5 * 3 * 4, 8)
    assert pca_spectrum(feats)["rank"] == 1


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_presence_attribution_equals_channel_ablation_for_the_presence_head(pooling: str) -> None:
    torch.manual_seed(2)
    model = build_model(dataclasses.replace(TINY, presence_pooling=pooling)).eval()
    x = torch.randn(3, 1, 64, 64)
    contrib = presence_attribution(model, x, model.encoder, batch=2)
    channels = model.encoder.out_channels[-1]
    assert contrib.shape == (3, channels)
    with torch.no_grad():
        base = split_outputs(model(x))[1]
        for c in np.argsort(-np.abs(contrib).mean(axis=0))[:3].tolist() + [0]:
            handle = model.encoder.register_forward_hook(
                lambda _m, _i, out, c=c: out[:-1] + [out[-1].index_fill(1, torch.tensor([c]), 0.0)])
            ablated = split_outputs(model(x))[1]
            handle.remove()
            np.testing.assert_allclose((base - ablated).numpy(), contrib[:, c], atol=1e-5)


def test_init_std_per_layer_for_known_scalings() -> None:
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(2 * torch.eye(4))
        net[1].weight.copy_(3 * torch.eye(4))
    x = torch.randn(64, 4)
    stds = init_stds(net, x)
    assert stds == {"0": pytest.approx(2 * float(x.std()), rel=1e-5), "1": pytest.approx(6 * float(x.std()), rel=1e-5)}
    assert init_warnings(stds, float(x.std())) == []
    assert "exploding or collapsing" in init_warnings({"0": 1e4, "1": 1.0}, 1.0)[0]


def test_filter_grid_places_and_scales_each_filter() -> None:
    w = torch.zeros(5, 1, 3, 3)
    w[2, 0, 1, 1] = 1.0
    w[4, 0, 0, 0] = -2.0
    grid = filter_grid(w)  # 3 columns, 2 rows of 3x3 tiles with 1px white padding
    assert grid.shape == (2 * 4 + 1, 3 * 4 + 1)
    assert (grid[1:4, 1:4] == 0.5).all()                          # an all-zero filter is mid-gray
    assert grid[2, 10] == 1.0 and grid[1, 9] == 0.5                # filter 2: centre is its max
    assert grid[5, 5] == 0.0 and grid[6, 6] == 0.5                 # filter 4: corner is its most negative
    assert (grid[5:8, 9:12] == 1.0).all() and (grid[0] == 1.0).all()  # empty slot and padding are white
    assert filter_grid(torch.randn(4, 3, 3, 3)).shape == (2 * 4 + 1, 2 * 4 + 1, 3)


def test_diagnostics_leave_the_model_its_gradients_and_the_rng_untouched() -> None:
    torch.manual_seed(3)
    model = build_model(TINY).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 64, 64)
    rng = torch.get_rng_state()
    init_stds(model, x)
    with relu_alive(model):
        model(x)
    presence_attribution(model, x, model.encoder)
    capture(model, x, {"encoder": model.encoder, "decoder": model.decoder})
    bottleneck_features(model, x, model.encoder)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------- warnings

def test_patience_warning_fires_after_n_flat_epochs_and_not_before() -> None:
    assert plateau_epochs([1.0, 0.9, 0.9, 0.9], 3) == []
    assert plateau_epochs([1.0, 0.9, 0.9, 0.9, 0.9], 3) == [5]
    assert plateau_epochs([1.0, 1.0, 1.0, 1.0], 3) == [4]
    assert plateau_epochs([1.0, 0.9, 0.95, 0.92, 0.91, 0.91, 0.91], 3) == [5]  # once per plateau
    assert plateau_epochs([1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8], 3) == [5, 9]  # a new best re-arms it
    assert plateau_epochs([1.0, 0.9999, 0.9998, 0.9997], 3) == [4]  # below 0.1% is not an improvement


def _monitor(patience: int, log: list[str]) -> Monitor:
    y = np.zeros((4, 8, 8), np.uint8)
    y[:2, 2:4, 2:4] = 1
    return Monitor(DiagnosticsParams(subset=4, patience=patience), 0, nn.Sequential(nn.Linear(1, 1)),
                   np.random.default_rng(0).random((4, 8, 8), np.float32), y, {"mean": 0.5, "std": 0.25}, 0,
                   log.append)


def test_monitor_logs_the_patience_warning_at_epoch_n_plus_one() -> None:
    log: list[str] = []
    monitor, history = _monitor(2, log), []
    presence = np.array([0.9, 0.8, 0.1, 0.2])
    for epoch, (tr, va) in enumerate([(1.0, 1.0), (0.5, 1.0), (0.4, 1.0)], start=1):
        history.append({"epoch": epoch, "train_loss": tr, "val_loss": va})
        scalars = monitor.end_epoch(nn.Sequential(nn.Linear(1, 1)), {}, history, presence, monitor.masks)
        assert [w["epoch"] for w in monitor.warnings] == ([3] if epoch == 3 else [])
    assert log == ["warning: fold 0 epoch 3: val_loss has not improved for 2 epochs (best 1.0000)"]
    assert scalars["val_presence_positive"] == 0.5 and np.isnan(scalars["train_grad_norm"])


def test_one_class_presence_warning() -> None:
    truth = np.array([True, True, False, False, False])
    assert "predicts empty for all 5" in one_class(np.full(5, 0.1), truth)
    assert "predicts nerve for all 5" in one_class(np.full(5, 0.7), truth)
    assert one_class(np.array([0.7, 0.1, 0.1, 0.1, 0.1]), truth) is None
    assert one_class(np.full(5, 0.1), np.zeros(5, bool)) is None  # all empty and said so: right, not stuck
    log: list[str] = []
    monitor, history = _monitor(2, log), []
    said = [np.full(4, 0.2), np.array([0.9, 0.2, 0.2, 0.2]), np.full(4, 0.2), np.full(4, 0.3), np.full(4, 0.1)]
    for epoch, presence in enumerate(said, start=1):  # stuck on "empty" in epochs 1, 3, 4, 5
        history.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 / epoch})
        monitor.end_epoch(nn.Sequential(nn.Linear(1, 1)), {}, history, presence, monitor.masks)
    assert [(w["epoch"], w["kind"]) for w in monitor.warnings] == [(4, "one_class")]  # 2 in a row, once
    assert log == ["warning: fold 0 epoch 4: the presence head predicts empty for all 4 validation images "
                   "(2 have a nerve); presence probabilities 0.300..0.300, 2 epochs in a row"]


def test_gradient_warnings_use_the_thresholds() -> None:
    assert gradient_warnings({"a": 1e-3, "b": 1.0}, 2.0, vanish=1e-6, explode=1e3) == []
    kinds = [k for k, _ in gradient_warnings({"a": 1e-9, "b": 1.0}, 5e3, vanish=1e-6, explode=1e3)]
    assert kinds == ["vanishing", "exploding"]


# ---------------------------------------------------------------- the train stage with diagnostics

def _run(out: Path, train_inputs: dict[str, Path], d: DiagnosticsParams = DIAG) -> dict:
    return run_train(Params(seed=5, train=TINY, diagnostics=d), train_inputs, out)


@pytest.fixture(scope="module")
def trained(train_inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag_trained")
    _run(out, train_inputs)
    return out


def test_train_writes_diagnostics_and_logs_them_per_epoch(trained: Path) -> None:
    diag = trained / "reports" / "diagnostics"
    result = json.loads((diag / "fold_0.json").read_text())
    assert [e["epoch"] for e in result["epochs"]] == [1, 2] and len(result["subset"]) == DIAG.subset
    assert "encoder.conv1" in result["init_std"] and "encoder.conv1" in result["epochs"][0]["grad_norm"]
    assert not any(k.startswith("encoder.layer3") for k in result["epochs"][0]["grad_norm"])  # unused stage
    assert result["pca"]["components_90"] <= result["pca"]["components_99"] <= result["pca"]["channels"]
    assert len(result["attribution"]) == TOP_CHANNELS
    names = ("health", "filters", "features", "bottleneck")
    assert result["figures"] == [{"file": f"fold_0_{n}.png", "caption": CAPTIONS[n]} for n in names]
    for figure in result["figures"]:
        assert (diag / figure["file"]).read_bytes().startswith(b"\x89PNG")
    plots = trained / "reports" / "plots" / "metrics" / "fold_0"
    for name in ("lr", "train_grad_norm", "weight_norm", "val_dead_fraction", "val_presence_positive"):
        assert len((plots / f"{name}.tsv").read_text().splitlines()) == 1 + TINY.epochs, name
    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    assert metrics["fold_0"]["diagnostic_warnings"] == len(result["warnings"])


def test_diagnostics_do_not_change_the_trained_weights(train_inputs, trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train.diagnostics, "Monitor", lambda *args: None)  # training without any diagnostics
    _run(tmp_path, train_inputs)
    on, off = (torch.load(d / "models" / "fold_0" / "best.pt", weights_only=True) for d in (trained, tmp_path))
    assert on["epoch"] == off["epoch"]
    for key, value in on["model"].items():
        assert torch.equal(value, off["model"][key]), key
    losses = [[(row["train_loss"], row["val_loss"]) for row in json.loads((d / "models" / "fold_0" / "done.json")
                                                                      .read_text())["history"]]
              for d in (trained, tmp_path)]
    assert losses[0] == losses[1]  # every epoch trained the same, the last one too


def test_diagnostics_params_do_not_force_retraining(train_inputs, trained, tmp_path, capsys) -> None:
    import shutil

    shutil.copytree(trained / "models", tmp_path / "models")
    _run(tmp_path, train_inputs, DiagnosticsParams(enabled=False, subset=4, patience=1, grad_vanish=1.0))
    err = capsys.readouterr().err
    assert f"resuming after epoch {TINY.epochs} of {TINY.epochs}" in err and "starting this fold over" not in err
    result = json.loads((tmp_path / "reports" / "diagnostics" / "fold_0.json").read_text())
    assert result["figures"] == [] and len(result["epochs"]) == TINY.epochs  # history kept from done.json


def test_report_shows_the_warnings_and_figures(trained: Path, tmp_path: Path) -> None:
    from pipeline.stages.report import diagnostics_section

    assert "no diagnostics" in "".join(diagnostics_section(tmp_path / "train").html)
    import shutil

    shutil.copytree(trained / "reports" / "diagnostics", tmp_path / "train" / "diagnostics")
    path = tmp_path / "train" / "diagnostics" / "fold_0.json"
    result = json.loads(path.read_text())
    result["warnings"] = [{"fold": 0, "epoch": 3, "kind": "plateau", "message": "val_loss has not improved"}]
    result["figures"][0]["caption"] = "A caption read from fold_0.json."
    path.write_text(json.dumps(result))
    section = diagnostics_section(tmp_path / "train")
    page, md = "".join(section.html), "".join(section.md)
    assert "1 warning(s)" in page and "<td>val_loss has not improved</td>" in page
    assert page.count("<img") == 4 and "Bottleneck PCA" in page
    assert "![fold_0_health.png](train/diagnostics/fold_0_health.png)" in md
    assert "A caption read from fold_0.json." in md and CAPTIONS["health"] not in md  # the JSON's, not a copy
    assert all(CAPTIONS[n] in md for n in ("filters", "features", "bottleneck"))


# ---------------------------------------------------------------- normalisation travels with the checkpoint

def test_validation_and_prediction_feed_the_network_the_same_numbers(tiny_interim: Path) -> None:
    images = np.load(tiny_interim / "train_images.npy")[:6]
    norm = train.pixel_stats(images)
    working, _ = transforms.working_arrays(images, np.zeros_like(images), (64, 64))
    at_validation = (torch.from_numpy(working)[:, None] - norm["mean"]) / norm["std"]  # train.predict's input
    assert torch.equal(at_validation, preprocess(images, (64, 64), norm["mean"], norm["std"]))


FRESH = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from pipeline.model.checkpoints import load_checkpoint
    from pipeline.model.network import preprocess, split_outputs
    model, state = load_checkpoint("model.pt")
    model.eval()
    images = np.load("images.npy")
    size = (state["config"]["height"], state["config"]["width"])
    out = {}
    for name, norm in (("stored", state["norm"]), ("unnormalised", {"mean": 0.0, "std": 1.0})):
        with torch.no_grad():
            mask, presence = split_outputs(model(preprocess(images, size, norm["mean"], norm["std"])))
        out[name + "_mask"] = torch.sigmoid(mask)[:, 0].to(torch.float16).numpy()
        out[name + "_presence"] = torch.sigmoid(presence).numpy()
    np.savez("out.npz", **out)
""")


def test_a_checkpoint_predicts_the_same_in_a_fresh_process_without_the_training_data(trained, train_inputs,
                                                                                   tmp_path) -> None:
    """The fresh process gets only best.pt and the raw uint8 images; it must reproduce the
    validation probabilities the training process wrote to oof.npz, so the normalisation
    is the checkpoint's, not something recomputed from training data."""
    oof = np.load(trained / "oof" / "oof.npz")
    manifest = pd.read_csv(train_inputs["manifest"], dtype={"id": str}).set_index("id")
    images = np.load(train_inputs["interim"] / "train_images.npy")[manifest.loc[oof["ids"], "row"].to_numpy()]
    alone = tmp_path / "alone"
    alone.mkdir()
    np.save(alone / "images.npy", images)
    (alone / "model.pt").write_bytes((trained / "models" / "fold_0" / "best.pt").read_bytes())
    subprocess.run([sys.executable, "-c", FRESH], cwd=alone, check=True, capture_output=True, timeout=120)
    out = np.load(alone / "out.npz")
    np.testing.assert_allclose(out["stored_mask"].astype(np.float32), oof["mask_prob"].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(out["stored_presence"], oof["presence_prob"], atol=1e-5)
    # the check can fail: the same weights without the stored normalisation predict something else
    assert np.abs(out["unnormalised_mask"].astype(np.float32) - oof["mask_prob"].astype(np.float32)).max() > 0.05
