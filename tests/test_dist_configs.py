"""The cluster-facing files: the ImageNet/ResNet-50 and demo Ray configs, the launchers, the SLURM scripts."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from stamp_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_imagenet_resnet50_config_builds_the_meta_model():
    from stamp_dist.distributed.engine import deepspeed_config
    from stamp_dist.meta.objective import Stamp, StampSettings
    from stamp_dist.models.backbones import build_backbone
    from stamp_dist.pruning.prunable import PrunableBackbone

    cfg = load_config(ROOT / "configs" / "imagenet_resnet50.yaml")
    assert cfg.runtime.backend == "ray" and cfg.runtime.use_gpu and cfg.model.backbone == "resnet50"
    backbone = build_backbone(cfg.model.backbone, 1000, width=cfg.model.width).eval()
    assert sum(p.numel() for p in backbone.parameters()) == 25_557_032  # torchvision's ResNet-50
    net = PrunableBackbone.build(backbone, {"image_size": 224})
    assert 4.0e9 < float(net.cost.dense_macs) < 4.2e9  # ResNet-50: 4.1 GMACs at 224x224
    stamp = Stamp(backbone.feature_dim, net.groups.sizes, StampSettings.of(cfg.meta))
    inputs = stamp.read(net, torch.randn(10, 3, 64, 64), 5)  # any image size: global pooling
    logits = stamp(inputs, 0.3)
    assert [a.shape[-1] for a in logits] == net.groups.sizes
    ds = deepspeed_config(cfg, cfg.runtime.num_workers)
    # meta.meta_batch is global: each worker accumulates its share of it.
    assert ds["train_batch_size"] == cfg.meta.meta_batch == 32
    assert ds["gradient_accumulation_steps"] * cfg.runtime.num_workers == cfg.meta.meta_batch
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1


def test_demo_ray_config_loads():
    cfg = load_config(ROOT / "configs" / "demo_ray.yaml")
    assert cfg.runtime.backend == "ray" and cfg.runtime.address is None and cfg.runtime.host == "127.0.0.1"
    # The same global meta-batch as the local demo, split over the workers.
    assert cfg.meta.meta_batch == load_config(ROOT / "configs" / "demo.yaml").meta.meta_batch
    assert cfg.meta.meta_batch % cfg.runtime.num_workers == 0


def test_meta_batch_not_divisible_by_the_workers_is_refused_naming_both():
    """meta.meta_batch is global; a value the workers cannot split evenly is a config error, before Ray starts."""
    from stamp_dist.distributed.engine import deepspeed_config
    from stamp_dist.errors import StampError

    with pytest.raises(StampError, match=r"meta.meta_batch=6 is not divisible by runtime.num_workers=4.*multiple of 4"):
        deepspeed_config(load_config(None, ["meta.meta_batch=6", "runtime.num_workers=4"]), 4)


def test_zero3_is_refused_with_a_reason():
    from stamp_dist.distributed.engine import deepspeed_config
    from stamp_dist.errors import StampError

    with pytest.raises(StampError, match="zero_stage"):
        deepspeed_config(load_config(None, ["runtime.zero_stage=3"]), 2)


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launchers_build_the_meta_train_command():
    local = _launcher("local").parse(["-c", "configs/demo_ray.yaml", "--workers", "3", "meta.steps=10"])
    assert local == ["meta-train", "-c", "configs/demo_ray.yaml", "meta.steps=10", "runtime.backend=ray",
                     "runtime.address=null", "runtime.num_workers=3"]
    cluster = _launcher("cluster").parse(["-c", "c.yaml", "--address", "10.0.0.1:6379"])
    assert cluster == ["meta-train", "-c", "c.yaml", "runtime.backend=ray", "runtime.address=10.0.0.1:6379"]
    from stamp_dist.cli import build_parser

    args = build_parser().parse_args(local)
    assert load_config(ROOT / args.config, args.overrides).runtime.num_workers == 3


SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + [ROOT / "tests" / "slurm" / "cluster.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_slurm_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_slurm_script_passes_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_meta_train_script_requeues_on_the_time_limit_signal():
    text = (ROOT / "slurm" / "meta_train.sbatch").read_text()
    from stamp_dist.errors import EXIT_STOPPED

    assert f"stopped={EXIT_STOPPED}" in text and "((status == stopped))" in text  # requeues on "stopped, resumable"
    for needed in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                   "trap on_time_limit USR1", 'kill -USR1 "${train_pid}"', 'scontrol requeue "${job}"',
                   "--num-cpus=", "--num-gpus=", ') &\ntrain_pid=$!'):  # `cmd & wait`: traps run during wait
        assert needed in text, needed


def test_a_user_error_inside_a_worker_reaches_the_command_as_one():
    """A StampError a Ray Train worker raises (a diverged run, a damaged checkpoint) comes back wrapped in
    Ray Train's failure; the launcher finds it, so `stamp` prints an error line and exits 2."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from stamp_dist.distributed.launch import _user_error
    from stamp_dist.errors import StampError

    inner = StampError("meta-training diverged at step 3")
    assert _user_error(WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: inner})) is inner
    assert _user_error(ControllerError(WorkerGroupError("x", {0: inner}))) is inner
    assert _user_error(WorkerGroupError("x", {0: RuntimeError("a bug")})) is None
