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
    assert z.device.type == "cuda" and torch.equal(z.cpu(), again)  # the same draw on every device


def test_prune_with_adaptation_on_cuda(tiny_run, tiny_generator, tmp_path):
    digits = tiny_run / "data" / "targets" / "digits"
    report = stamp_dist.prune(tiny_generator, digits, 0.5, tmp_path / "adapted",
                              PruneConfig(adapt_steps=2, samples_per_class=4), device="cuda")
    assert report["adapt_steps"] == 2 and abs(report["macs_ratio"] - 0.5) <= 0.02
