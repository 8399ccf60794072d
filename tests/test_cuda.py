"""CUDA smoke tests: they run where a GPU is present (skipped on CPU-only machines such as CI)."""

import pytest
import torch

import stamp_dist
from stamp_dist.config import PruneConfig
from stamp_dist.models.generator import hard_concrete_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_generator_samples_masks_for_cuda_logits():
    logits = torch.zeros(64, device="cuda")
    z = hard_concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(0))
    again = hard_concrete_sample(logits.cpu(), 0.5, generator=torch.Generator().manual_seed(0))
    assert z.device.type == "cuda"
    torch.testing.assert_close(z.cpu(), again)  # the same draw on every device (CUDA's log/sigmoid may differ in ulps)


def test_prune_with_adaptation_on_cuda(tiny_run, tiny_generator, tmp_path):
    # round_to=1: CUDA's default (multiples of 8) cannot meet 0.5 on the tiny run's 8-channel groups
    digits = tiny_run / "data" / "targets" / "digits"
    report = stamp_dist.prune(tiny_generator, digits, 0.5, tmp_path / "adapted",
                              PruneConfig(adapt_steps=2, samples_per_class=4, round_to=1), device="cuda")
    assert report["adapt_steps"] == 2 and abs(report["macs_ratio"] - 0.5) <= 0.02


def test_masked_features_on_cuda_match_the_cpu():
    """The CUDA path computes in channels_last (devices.memory_format), micro-batched and checkpointed: the
    same masked features, and the same mask gradients, as the CPU's NCHW path."""
    from stamp_dist.models.backbones import build_backbone
    from stamp_dist.pruning.prunable import PrunableBackbone

    torch.manual_seed(0)
    record = {"image_size": 16, "backbone": "convnet"}
    nets = {d: PrunableBackbone.build(build_backbone("convnet", 10, 8, 16).eval().requires_grad_(False).to(d), record)
            for d in ("cpu", "cuda")}
    nets["cuda"].backbone.load_state_dict(nets["cpu"].backbone.state_dict())
    x = torch.randn(12, 3, 16, 16)
    drawn = [torch.rand(n) for n in nets["cpu"].groups.sizes]
    grads = {}
    for device, net in nets.items():
        net.micro_batch = 5
        masks = [m.to(device).detach().requires_grad_() for m in drawn]
        feats = net.features(x.to(device), masks)
        feats.square().sum().backward()
        grads[device] = (feats.detach().cpu(), [m.grad.cpu() for m in masks])
    conv = next(p for p in nets["cuda"].backbone.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(grads["cuda"][0], grads["cpu"][0], rtol=1e-3, atol=1e-3)
    for g_cuda, g_cpu in zip(grads["cuda"][1], grads["cpu"][1]):
        torch.testing.assert_close(g_cuda, g_cpu, rtol=1e-3, atol=1e-3)


def test_meta_train_on_cuda_in_bf16(tiny_run, tmp_path):
    from conftest import tiny_config

    from stamp_dist.meta.artifact import resolve
    from stamp_dist.metatrain import meta_train

    out = meta_train(tiny_config(tiny_run, "runtime.device=cuda", "runtime.precision=bf16", f"meta.out={tmp_path}"))
    assert (resolve(out) / "generator.json").is_file()
