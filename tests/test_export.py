"""Export stage: the bundle's contents, ONNX Runtime against PyTorch on a tiny trained model, refusals."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_THRESHOLDS
from helpers import TINY_MODEL
from pipeline.deploy import bundle as fmt
from pipeline.deploy.resize import preprocess as np_preprocess
from pipeline.model.checkpoints import CheckpointError
from pipeline.model.network import build_model
from pipeline.params import DataParams, Params
from pipeline.stages import export

GRAPH_TOLERANCE = 1e-5   # ONNX Runtime vs PyTorch on the same input tensor (measured ~6e-7: float32 rounding)
CHAIN_TOLERANCE = 1e-4   # uint8 image -> probabilities: numpy preprocessing + ONNX Runtime vs predict's torch path


def test_bundle_describes_the_model(tiny_bundle, tiny_folds):
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["README.md", "bundle.json", "model.onnx"]
    assert meta["model"]["sha256"] == fmt.sha256(tiny_bundle / "model.onnx")
    assert meta["postprocess"] == TINY_THRESHOLDS
    assert meta["preprocess"] | {"folds": None} == {
        "channels": "gray", "in_channels": 1, "height": TINY_MODEL.height, "width": TINY_MODEL.width,
        "resize": "stretch", "scale": 1 / 255, "interpolation": "bilinear, antialiased",
        "normalisation": "inside the graph, per fold: (x - mean) / std", "folds": None}
    assert [(f["checkpoint"], f["mean"], f["std"]) for f in meta["preprocess"]["folds"]] == [
        ("fold_0/best.pt", 0.3, 0.2), ("fold_1/best.pt", 0.35, pytest.approx(0.22))]
    assert meta["ensemble"] == {"folds": 2, "tta_flip": True, "views": 4}
    assert meta["rle"] == {"order": "column", "start": 1, "submission_columns": ["img", "pixels"], "numeric_ids": True}
    assert meta["object_name"] == "nerve" and meta["params_sha256"] == export.params_sha256(Params())
    assert export.params_sha256(Params(seed=1)) != meta["params_sha256"]
    assert {"torch", "onnx", "onnxruntime", "python", "numpy"} <= set(meta["versions"])
    assert meta["export_check"]["max_abs_diff_mask"] <= export.TOLERANCE
    b = fmt.read_bundle(tiny_bundle)
    assert (b.size, b.resize, b.channels, b.rle_order, b.rle_start) == ((64, 64), "stretch", "gray", "F", 1)
    text = (tiny_bundle / "README.md").read_text()
    assert "`image`" in text and "`mask_prob`" in text and "`presence_prob`" in text and "> 0.5" in text


def test_graph_names_and_dynamic_batch(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["mask_prob", "presence_prob"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 64, 64] and isinstance(dims[0], str)  # the batch axis is symbolic


def _torch_ensemble(folds):
    _, loaded = export.load_folds(folds)
    return export.FlipEnsemble([m.eval() for m, _ in loaded], [s["norm"] for _, s in loaded], tta_flip=True).eval()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_equals_pytorch_on_the_trained_folds(tiny_bundle, tiny_folds, batch):
    x = torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(batch))
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    mask, presence = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        want_mask, want_presence = _torch_ensemble(tiny_folds)(x)
    assert mask.shape == (batch, 1, 64, 64) and presence.shape == (batch,)
    assert np.abs(mask - want_mask.numpy()).max() <= GRAPH_TOLERANCE
    assert np.abs(presence - want_presence.numpy()).max() <= GRAPH_TOLERANCE
    assert want_mask.std() > 0.01  # the probabilities vary: the comparison is not of constants


def test_image_to_probabilities_equals_predict(tiny_bundle, tiny_folds, tiny_interim):
    """The whole chain before thresholds: uint8 test images -> numpy preprocessing -> ONNX Runtime, against
    predict's own Ensemble (torch preprocessing, each fold's normalisation, flip views) on the same images."""
    from pipeline.data.artifacts import open_arrays
    from pipeline.stages.predict import Ensemble

    images = np.array(open_arrays(tiny_interim, "test")[0])
    want_mask, want_presence = Ensemble(tiny_folds, torch.device("cpu"))(images, True)
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([np_preprocess(image, (64, 64), "stretch") for image in images])
    mask, presence = session.run(None, {"image": x})
    assert np.abs(mask - want_mask.numpy()).max() <= CHAIN_TOLERANCE
    assert np.abs(presence - want_presence.numpy()).max() <= CHAIN_TOLERANCE


def test_refuses_a_models_folder_without_trained_folds(tmp_path, tiny_bundle):
    (tmp_path / "thresholds.json").write_text(json.dumps(TINY_THRESHOLDS))
    with pytest.raises(Exception, match="folds.json: not found"):
        export.run(Params(), models=tmp_path / "nothing", thresholds=tmp_path / "thresholds.json", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_folds_of_other_channels(tmp_path, tiny_folds):
    (tmp_path / "thresholds.json").write_text(json.dumps(TINY_THRESHOLDS))
    with pytest.raises(CheckpointError, match="data.channels"):
        export.run(Params(data=DataParams(channels="rgb")), models=tiny_folds, thresholds=tmp_path / "thresholds.json",
                   out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_unfinished_fold(tmp_path, tiny_folds):
    models = shutil.copytree(tiny_folds, tmp_path / "train")
    (models / "fold_1" / "done.json").unlink()
    (tmp_path / "thresholds.json").write_text(json.dumps(TINY_THRESHOLDS))
    with pytest.raises(CheckpointError, match="fold_1: not finished"):
        export.run(Params(), models=models, thresholds=tmp_path / "thresholds.json", out=tmp_path / "out")


def _export_one(tmp_path, t, model) -> tuple[dict, onnx.ModelProto]:
    """Export `model` (trained with `t`) as the one fold of a run: (the bundle's export check, the graph)."""
    from helpers import NORM, mark_trained
    from pipeline.model.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "train" / "fold_0" / "best.pt", model.eval(), t, NORM)
    mark_trained(tmp_path / "train")
    (tmp_path / "thresholds.json").write_text(json.dumps(TINY_THRESHOLDS))
    export.run(Params(), models=tmp_path / "train", thresholds=tmp_path / "thresholds.json", out=tmp_path / "out")
    check = json.loads((tmp_path / "out" / "bundle.json").read_text())["export_check"]
    return check, onnx.load(str(tmp_path / "out" / "model.onnx"))


def test_an_instance_norm_model_exports_and_onnx_runtime_agrees(tmp_path):
    """`train.norm: instance` (per-image GroupNorm) goes through the exporter; export itself refuses a graph
    that differs from PyTorch beyond its tolerance, and records the differences it measured."""
    t = dataclasses.replace(TINY_MODEL, norm="instance")
    torch.manual_seed(0)
    model = build_model(t)
    with torch.no_grad():  # affine weights away from their initial ones, so normalisation shows in the output
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    check, graph = _export_one(tmp_path, t, model)
    assert check["max_abs_diff_mask"] <= GRAPH_TOLERANCE and check["probe_images"] >= 1
    assert not any(node.op_type == "BatchNormalization" for node in graph.graph.node)


def test_a_max_pooled_presence_head_exports_and_onnx_runtime_agrees(tmp_path):
    """`train.presence_pooling: max` goes through the exporter, and the bundle's presence is the max-pooled one."""
    t = dataclasses.replace(TINY_MODEL, presence_pooling="max")
    torch.manual_seed(0)
    check, graph = _export_one(tmp_path, t, build_model(t))
    assert check["max_abs_diff_presence"] <= GRAPH_TOLERANCE
    assert any(node.op_type in ("GlobalMaxPool", "ReduceMax") for node in graph.graph.node)
