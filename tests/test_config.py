import pytest

from stamp_dist.cli import main
from stamp_dist.config import load_config
from stamp_dist.errors import StampError


def test_defaults_and_overrides():
    cfg = load_config(None, ["meta.steps=7", "prune.budget=0.5", "model.backbone=resnet18"])
    assert cfg.meta.steps == 7 and cfg.prune.budget == 0.5 and cfg.model.backbone == "resnet18"
    assert cfg.data.reference == "runs/demo/data/reference"  # interpolation resolved


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("meta:\n  steps: 3\n  k_shot: 5\nmodel:\n  backbone: convnet\n")
    cfg = load_config(path, ["meta.steps=4"])
    assert (cfg.meta.steps, cfg.meta.k_shot, cfg.model.backbone) == (4, 5, "convnet")


@pytest.mark.parametrize("override, words", [
    ("meta.stepz=3", ["meta.stepz", "steps", "k_shot"]),  # unknown key → names it and the valid keys
    ("nosuch=1", ["nosuch", "meta", "prune"]),
    ("meta.steps=abc", ["meta.steps", "abc"]),  # wrong type
    ("model.backbone=resnet99", ["model.backbone", "resnet18", "vgg19_bn"]),  # not a valid choice
    ("tracking.wandb_mode=cloud", ["tracking.wandb_mode", "offline"]),
    ("prune.budget=1.5", ["prune.budget", "(0.0, 1.0]"]),
    ("meta.family_tasks=1.5", ["meta.family_tasks", "[0, 1]"]),
    ("finetune.backbone_lr=-0.1", ["finetune.backbone_lr", ">= 0"]),
    ("prune.allocation=global", ["prune.allocation", "learned, uniform"]),
    ("meta.steps", ["key=value"]),
])
def test_bad_config_is_named(override, words):
    with pytest.raises(StampError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_bad_yaml_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  epochz: 3\n")
    with pytest.raises(StampError, match="bad.yaml.*pretrain.epochz.*epochs"):
        load_config(path)


def test_cli_exits_nonzero_on_bad_config(tmp_path, capsys):
    assert main(["pretrain", "meta.nope=1"]) == 2
    assert "meta.nope" in capsys.readouterr().err
    assert main(["pretrain", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)
