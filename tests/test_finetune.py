import torch

from stamp_dist.config import FinetuneConfig
from stamp_dist.data.readers import Normalization
from stamp_dist.finetune import finetune_model
from stamp_dist.models.backbones import build_backbone
from stamp_dist.training import Schedule


def _data(n: int = 24, classes: int = 3):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % classes


def _run(backbone_lr: float):
    torch.manual_seed(0)
    model = build_backbone("convnet", num_classes=3, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=0.05, backbone_lr=backbone_lr)
    finetune_model(model, (x, y), (x, y), Normalization([0.5] * 3, [0.25] * 3), Schedule.finetuning(cfg, 0),
                   torch.device("cpu"))
    moved = {k: not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point()}
    return model, moved


def test_backbone_lr_zero_trains_only_the_head():
    _, moved = _run(0.0)
    assert moved["fc.weight"] and moved["fc.bias"]
    weights = [k for k in moved if k.endswith("weight") and not k.startswith("fc.")]
    assert weights and not any(moved[k] for k in weights)  # conv / BN weights stay (running stats may move)


def test_backbone_lr_scales_the_backbone_step():
    torch.manual_seed(0)
    reference = build_backbone("convnet", num_classes=3, width=8).state_dict()
    full, _ = _run(1.0)
    small, _ = _run(0.1)
    name = next(k for k in reference if k.endswith("weight") and reference[k].dim() == 4)
    step_full = (full.state_dict()[name] - reference[name]).norm()
    step_small = (small.state_dict()[name] - reference[name]).norm()
    assert 0 < step_small < 0.5 * step_full
