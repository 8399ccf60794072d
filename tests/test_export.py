"""`stamp export`: a pruned model as ONNX / torch.export, equal to PyTorch's outputs; refusals leave nothing."""

import io
import json

import numpy as np
import pytest
import torch
import torch_pruning as tp

from stamp_dist.cli import main
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import CostModel, PruningSpec, budget_mask, discover_groups, prune_model, save_pruned

SIZE = 32


def pruned_artifact(path, name, width=8, budget=0.4):
    """A pruned ``name`` (random keep scores, BN statistics not trivial) saved as `stamp prune` saves one."""
    torch.manual_seed(0)
    model = build_backbone(name, 10, width=width).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.zeros(1, 3, SIZE, SIZE)
    groups = discover_groups(model, x)
    keep = budget_mask([torch.rand(c) for c in groups.sizes], CostModel(model, groups, (3, SIZE, SIZE)), budget)
    pruned = prune_model(model, groups, keep, num_classes=10).eval()
    macs, params = tp.utils.count_ops_and_params(pruned, x)
    dense_macs, dense_params = tp.utils.count_ops_and_params(model, x)
    meta = {"backbone": name, "width": width, "image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}
    spec = PruningSpec.from_masks(meta, groups, keep, 10, {"macs": macs, "params": params, "dense_macs": dense_macs,
                                                           "dense_params": dense_params})
    return save_pruned(path, pruned, spec), pruned


def run_exported(path, fmt, x):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        return torch.export.load(io.BytesIO(path.read_bytes())).module()(x).numpy()


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torch.export", ".pt2")])
@pytest.mark.parametrize("name", ["convnet", "resnet20", "resnet18", "mobilenet_v2_cifar",
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_export_equals_pytorch_at_another_batch_size(tmp_path, capsys, name, fmt, suffix):
    model_dir, pruned = pruned_artifact(tmp_path / "pruned", name, width=16 if name == "resnet50" else 8)
    assert main(["export", "--model", str(model_dir), "--format", fmt]) == 0
    out = model_dir / f"model{suffix}"
    assert f"→ {out}" in capsys.readouterr().out
    x = torch.randn(7, 3, SIZE, SIZE)  # not the check batch's size: the batch dimension is dynamic
    with torch.no_grad():
        want = pruned(x).numpy()
    assert np.abs(run_exported(out, fmt, x) - want).max() <= 1e-4


def test_export_refusals_exit_2_and_leave_nothing(tmp_path, capsys, monkeypatch):
    model_dir, _ = pruned_artifact(tmp_path / "pruned", "convnet")
    before = sorted(p.name for p in model_dir.iterdir())
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert main(["export", "--model", str(empty), "--format", "onnx"]) == 2
    assert main(["export", "--model", str(model_dir), "--format", "tflite"]) == 2
    assert "choose one of onnx, torch.export" in capsys.readouterr().err
    # An export whose outputs differ from PyTorch's is an error and leaves no file behind.
    monkeypatch.setattr("stamp_dist.export.TOLERANCE", -1.0)
    assert main(["export", "--model", str(model_dir), "--format", "torch.export"]) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before and list(empty.iterdir()) == []
    monkeypatch.undo()
    # An existing output is never overwritten.
    (tmp_path / "model.onnx").write_text("mine")
    assert main(["export", "--model", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 2
    assert (tmp_path / "model.onnx").read_text() == "mine"
    spec = json.loads((model_dir / "spec.json").read_text())
    assert spec["backbone"] == "convnet"  # the artifact itself untouched
