"""Shared test settings and fixtures: deterministic, quiet, few threads (CI has 2 cores).

``tiny_run`` builds, once per test session, the demo pipeline's inputs at toy size: the demo
datasets with 12 reference classes and a ConvNet pretrained for one epoch. Tests derive configs
from it with ``tiny_config``.
"""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

TINY = [
    "model.backbone=convnet", "model.width=8", "runtime.device=cpu",
    "data.demo_classes=12", "data.demo_train_per_class=24", "data.demo_test_per_class=8",
    "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.num_threads=0",
    "meta.steps=4", "meta.meta_batch=2", "meta.n_way_min=2", "meta.n_way_max=3", "meta.k_shot=3",
    "meta.q_query=3", "meta.val_every=2", "meta.val_tasks=2", "meta.val_classes=3", "meta.checkpoint_every=2",
    "meta.encoder_dim=16", "meta.encoder_heads=2", "meta.encoder_inducing=4", "meta.generator_hidden=16",
    "finetune.epochs=1", "prune.samples_per_class=5",
    "bench.budgets=[0.5]", "bench.seeds=[0]", "bench.train_per_class=5", "tracking.wandb_mode=disabled",
]


def tiny_config(root: Path, *overrides: str):
    from stamp_dist.config import load_config

    return load_config(DEMO_YAML, [*TINY, f"data.root={root}/data", f"data.reference={root}/data/reference",
                                   f"data.fashion_mnist={root}/fashion_idx",
                                   f"pretrain.out={root}/pretrain", f"meta.out={root}/meta",
                                   f"bench.out={root}/results", f"tracking.dir={root}/wandb", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a log a run may still be appending to (a poll can catch the last one half-written)."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def write_fake_fashion_mnist(folder: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Fashion-MNIST's four IDX files at toy size (10 classes, 28×28 noise images), where Debian's
    package puts them: what the demo reads for its second real target."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", per_class), ("t10k", per_class // 2)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A directory with ``data/`` (demo datasets, small) and ``pretrain/`` (a ConvNet backbone)."""
    from stamp_dist.data.demo import make_demo_data
    from stamp_dist.pretrain import pretrain

    root = tmp_path_factory.mktemp("tiny_run")
    write_fake_fashion_mnist(root / "fashion_idx")
    cfg = tiny_config(root)
    make_demo_data(cfg.data.root, cfg.data)
    pretrain(cfg)
    return root


@pytest.fixture(scope="session")
def tiny_generator(tiny_run, tmp_path_factory) -> Path:
    """A meta-trained generator run directory (4 steps) on ``tiny_run``."""
    from stamp_dist.metatrain import meta_train

    out = tmp_path_factory.mktemp("tiny_meta")
    meta_train(tiny_config(tiny_run, f"meta.out={out}"))
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """The test session's one Ray instance (4 logical CPUs: 2 workers + 2 half-CPU samplers), on 127.0.0.1:
    one per pytest-xdist worker, and the tests using it share one worker (``xdist_group("ray")``).
    Its processes inherit this process's environment (PYTHONPATH included: they import the same stamp_dist)."""
    import ray

    from stamp_dist.config import RuntimeConfig
    from stamp_dist.distributed.launch import start_ray

    # Ray Train's controller polls workers every 2 s and a worker's second report waits for that poll;
    # with these toy steps (~0.1 s) checkpoints would wait on it. Ray's processes inherit the variable.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Ray renices its workers to 15: beside the other pytest-xdist worker (nice 0) on 2 cores a rank then gets
    # a few % of a core, and every collective waits for it (phase A of test_dist_ray took minutes, not 20 s).
    os.environ.setdefault("RAY_worker_niceness", "0")
    start_ray(RuntimeConfig(host="127.0.0.1"), num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
