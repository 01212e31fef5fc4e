"""The peer benchmark's own data handling: windows, scaling, overrides and scoring (no training here)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data.io import read_mask
from pipeline.params import Params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "benchmarks" / "bench_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peer"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_peer", None)


def _palette_dataset(root: Path, n_train: int = 3, n_test: int = 2, size=(120, 100)) -> Path:
    """USGRA-seg's layout: gray images, palette masks with nerve = 1 and vessel = 2."""
    rng = np.random.default_rng(0)
    for base, n in ((root, n_train), (root / "test", n_test)):
        (base / "images").mkdir(parents=True)
        (base / "masks").mkdir(parents=True)
        for i in range(n):
            h, w = size
            image = rng.integers(20, 255, (h, w), dtype=np.uint8)
            labels = np.zeros((h, w), np.uint8)
            labels[40 + i:60 + i, 30:50] = 1
            labels[10:20, 70:80] = 2
            Image.fromarray(image).save(base / "images" / f"{i + 10 * (base != root)}.png")
            mask = Image.fromarray(labels, mode="P")
            mask.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
            mask.save(base / "masks" / f"{i + 10 * (base != root)}.png")
    return root


def test_windows_hold_the_whole_nerve_or_none_of_it(bench):
    rng = np.random.default_rng(1)
    image = np.full((100, 120), 128, np.uint8)
    mask = np.zeros((100, 120), bool)
    mask[40:55, 50:70] = True
    corners = bench._windows(image, mask, 32, positives=3, negatives=4, rng=rng)
    kinds = [k for k, _, _ in corners]
    assert kinds.count("p") == 3 and kinds.count("n") == 4
    for kind, y, x in corners:
        inside = mask[y:y + 32, x:x + 32].sum()
        assert inside == (mask.sum() if kind == "p" else 0)


def test_no_positive_window_when_the_nerve_does_not_fit(bench):
    mask = np.zeros((100, 120), bool)
    mask[10:90, 10:20] = True  # 80 rows tall, window 32
    corners = bench._windows(np.full((100, 120), 128, np.uint8), mask, 32, 2, 2, np.random.default_rng(0))
    assert all(kind == "n" for kind, _, _ in corners)


def test_scaled_then_windowed_variant_keeps_the_split_and_groups(bench, tmp_path):
    src = bench.full_variant(_palette_dataset(tmp_path / "src"))
    scaled = bench.scaled_variant(src, tmp_path / "scaled", 0.5)
    for stem, image_path, mask_path in scaled.pairs("train"):
        assert Image.open(image_path).size == (50, 60)  # (w, h) of 120 rows x 100 columns, halved
        truth = scaled.truth(mask_path)
        assert truth.shape == (60, 50) and 80 <= truth.sum() <= 120  # 20x20 nerve at half size; vessel dropped
    windows = bench.empty_rich_variant(scaled, tmp_path / "windows", size=32, positives=1, negatives=2)
    train_ids = {stem for stem, _, _ in windows.pairs("train")}
    test_ids = {stem for stem, _, _ in windows.pairs("test")}
    groups = pd.read_csv(tmp_path / "windows" / "groups.csv", dtype=str)
    assert set(groups.id) == train_ids
    assert set(groups.group) <= {"0", "1", "2"}  # train sources only
    assert all(stem.split("_")[0] in {"10", "11"} for stem in test_ids)
    for stem, _, mask_path in windows.pairs("train"):
        assert read_mask(mask_path).any() == ("_p" in stem)


def test_overrides_set_our_params_and_refuse_unknown_keys(bench):
    base = bench.our_params(bench.full_variant(Path("/data")), 7, ["train.loss=lovasz", "tune.keep_largest=[false]"])
    assert base.train.loss == "lovasz" and base.tune.keep_largest == (False,) and base.seed == 7
    assert base.train.folds == Params().train.folds  # folds are a setting like any other: --set train.folds=5
    assert bench.our_params(bench.full_variant(Path("/data")), 7, ["train.folds=5"]).train.folds == 5
    small = bench.with_overrides(base, ["train.weight_decay=3e-5", "train.lr=1E-2"])  # YAML 1.2 floats, as params.yaml
    assert small.train.weight_decay == 3e-5 and small.train.lr == 0.01
    with pytest.raises(SystemExit, match="train.nope"):
        bench.with_overrides(base, ["train.nope=1"])
    with pytest.raises(SystemExit, match="train.loss"):
        bench.with_overrides(base, ["train.loss=hinge"])
    with pytest.raises(SystemExit, match="train.lr"):  # bad YAML: one error line, no traceback
        bench.with_overrides(base, ["train.lr=[1"])


def test_score_counts_empty_vs_empty_as_one_and_needs_every_image(bench):
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    half = np.zeros((4, 4), bool)
    half[:2] = True
    result = bench.score({"a": empty, "b": half}, {"a": empty, "b": full})
    assert result["dice"] == pytest.approx((1 + 2 * 8 / 24) / 2)
    assert result["iou"] == pytest.approx((1 + 0.5) / 2)
    assert result["empty_truths"] == 1
    with pytest.raises(RuntimeError, match="no prediction"):
        bench.score({"a": empty}, {"a": empty, "b": full})


def test_plot_groups_runs_by_our_budget_and_leaves_technique_runs_out(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_peer", ROOT / "benchmarks" / "plot_peer.py")
    plot_peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_peer)
    rows = {"this pipeline": {"image_steps": 4608, "dice": 0.4, "images": 10, "empty_truths": 6},
            "nnU-Net v2 2d": {"image_steps": 4680, "dice": 0.3, "images": 10, "empty_truths": 6}}
    paths = []
    for i, overrides in enumerate(([], [], ["train.loss=lovasz"])):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"variant": "full", "overrides": overrides, "rows": rows}))
    data = plot_peer.collect(paths)
    assert data["full"]["nnU-Net v2 2d"] == [(4608, 0.3), (4608, 0.3)]  # nnU-Net plotted at our budget
    assert data["full"]["all-empty"] == [(0, 0.6), (0, 0.6)]
    plot_peer.plot(data, tmp_path / "out" / "peer.png")
    assert Image.open(tmp_path / "out" / "peer.png").size[0] > 100


def _result(path: Path, seed: int, rows: dict, budget=None, overrides=()) -> Path:
    path.write_text(json.dumps({"variant": "full", "scale": 0.1875, "seed": seed, "budget": budget,
                                "overrides": list(overrides), "rows": rows}))
    return path


def test_peer_table_leaves_out_recipe_changes_but_not_speed_knobs_or_defaults(tmp_path):
    spec = importlib.util.spec_from_file_location("peer_table", ROOT / "benchmarks" / "peer_table.py")
    peer_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_table)
    default_lr = f"train.lr={Params().train.lr!r}"
    assert peer_table.recipe_changes(["train.threads=1", "train.workers=2", default_lr]) == []
    assert peer_table.recipe_changes(["train.threads=1", "train.loss=lovasz", "train.nope=1"]) == [
        "train.loss=lovasz", "train.nope=1"]
    row = {"this pipeline": {"dice": 0.5, "image_steps": 4864}}
    paths = [_result(tmp_path / "a.json", 42, row, overrides=["train.threads=1", default_lr]),
             _result(tmp_path / "b.json", 43, row, overrides=["train.loss=lovasz"]),
             _result(tmp_path / "c.json", 44, row, overrides=["train.folds=5"])]
    assert [run["seed"] for run in peer_table.join(paths)] == [42]


def test_peer_table_names_a_rerun_of_the_same_seed_instead_of_merging_it_silently(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("peer_table", ROOT / "benchmarks" / "peer_table.py")
    peer_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_table)
    first, again = ({"this pipeline": {"dice": d, "image_steps": 4864}} for d in (0.5, 0.6))
    paths = [_result(tmp_path / "a.json", 42, first), _result(tmp_path / "b.json", 42, again)]
    tables = peer_table.collect(paths)
    assert tables[("full", 0.1875, 4864)][42]["this pipeline"]["dice"] == 0.6
    err = capsys.readouterr().err
    assert "seed 42" in err and "two this pipeline runs" in err and "the table shows " + str(paths[1]) in err


def test_separate_ours_only_and_nnunet_only_runs_join_by_seed(tmp_path):
    spec = importlib.util.spec_from_file_location("peer_table", ROOT / "benchmarks" / "peer_table.py")
    peer_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_table)
    ours = {s: {"dice": d, "image_steps": 4864, "train_cpu": 400.0, "train_wall": 200.0, "images": 40,
                "empty_truths": 0, "estimated_train_seconds": 180.0} for s, d in ((42, 0.55), (43, 0.60))}
    peer = {s: {"dice": d, "image_steps": 4896, "train_cpu": 900.0} for s, d in ((42, 0.50), (43, 0.40), (44, 0.45))}
    paths = [_result(tmp_path / f"o{s}.json", s, {"this pipeline": r}) for s, r in ours.items()]
    paths += [_result(tmp_path / f"n{s}.json", s, {"nnU-Net v2 2d": r}, 4896) for s, r in peer.items()]
    tables = peer_table.collect(paths)
    assert list(tables) == [("full", 0.1875, 4864)]  # nnU-Net's 4,896 joins our 4,864 (within 5%)
    text = peer_table.table("full", 0.1875, 4864, tables[("full", 0.1875, 4864)])
    assert "| 42 | 0.5500 | 0.5000 | 1.100 |" in text and "| 44 | - | 0.4500 | - |" in text
    # the ratio of the means over the seeds both methods ran, and its range over those seeds
    assert f"| {(0.55 + 0.60) / 2 / ((0.50 + 0.40) / 2):.3f} (per seed 1.100-1.500) |" in text
    assert "180 / 200 (0.90)" in text

    spec = importlib.util.spec_from_file_location("plot_peer", ROOT / "benchmarks" / "plot_peer.py")
    plot_peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_peer)
    data = plot_peer.collect(paths)
    assert sorted(data["full"]["nnU-Net v2 2d"]) == [(4864, 0.4), (4864, 0.5), (4896, 0.45)]  # joined: at our steps
    far = _result(tmp_path / "far.json", 42, {"nnU-Net v2 2d": peer[42]}, 14_592)  # a 3x budget run: its own
    assert sorted(peer_table.collect([*paths, far])) == [("full", 0.1875, 4864), ("full", 0.1875, 14_592)]
