"""Task-level domain transforms: one transform applied to every image of a task.

Meta-training tasks drawn from one reference dataset all look alike (same colours, resolution and
contrast), so a generator meta-trained on them only learns which channels serve *that* domain. Real
targets differ first in such low-level statistics — the demo's real targets are grayscale and
low-resolution — and channels tuned to colour or fine texture are dead weight there. Transforming a
whole task (support and query alike) makes meta-training see shifted domains, as task augmentation
does for meta-learning (Yao et al., ICML 2021; Ni et al., ICLR 2021). The names are
``choices.TASK_TRANSFORMS``; ``meta.task_transforms`` chooses which are drawn, each with probability
``meta.task_transform_prob`` per task.

* ``gray``: luminance (ITU-R 601 weights) in all three channels.
* ``invert``: 255 − x (dark strokes on light ground and the reverse).
* ``lowres``: area-downsampled to a quarter of the side and bilinearly upsampled (as the digits target
  is 8×8 upsampled to 32×32).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8).expand_as(x).contiguous()


def _invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def _lowres(x: torch.Tensor) -> torch.Tensor:
    size = x.shape[-2:]
    small = F.interpolate(x.float(), size=(max(1, size[0] // 4), max(1, size[1] // 4)), mode="area")
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gray": _gray, "invert": _invert, "lowres": _lowres}


def apply_task_transforms(x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """uint8 images ``[n, 3, H, W]`` with each named transform applied, in order."""
    for name in names:
        x = TRANSFORMS[name](x)
    return x
