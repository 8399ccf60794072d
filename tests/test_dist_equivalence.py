"""The DeepSpeed engine computes the local engine's meta-gradient on the same global meta-batch.

Two ranks over gloo (``torch.multiprocessing``), each running the one loop's ``MetaTrainer.meta_step``
with the Ray backend's ``DeepSpeedEngine`` and ``TorchGroup`` (what the Ray Train workers run) on its
half of a global meta-batch of 4, must end a step with the weights of the local backend's step on the
whole meta-batch: same masks (global episode indices), same scaling (mean over all episodes),
clipping on the averaged gradient, same AdamW update. (The same through Ray, end to end:
``tests/test_one_loop.py``.)
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import tiny_config

WORLD, PER_RANK, STEPS = 2, 2, 2
META_BATCH = WORLD * PER_RANK  # global
CLIP = 0.005  # small enough that clipping binds, so its placement (after averaging) matters
VARIANTS = {"zero0": ["runtime.zero_stage=0"], "zero2": ["runtime.zero_stage=2"],
            "bf16": ["runtime.precision=bf16", "runtime.zero_stage=1"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_episodes(episodes: list, path: Path) -> None:
    """Episodes as safetensors + JSON (no pickle, as everywhere in stamp_dist)."""
    tensors = {f"{i}.{k}": getattr(ep, k) for i, ep in enumerate(episodes)
               for k in ("support_x", "support_y", "query_x", "query_y")}
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps([[ep.classes, ep.budget] for ep in episodes]))


def load_episodes(path: Path) -> list:
    from stamp_dist.data.episodes import Episode

    tensors = load_file(str(path.with_suffix(".safetensors")))
    return [Episode(*(tensors[f"{i}.{k}"] for k in ("support_x", "support_y", "query_x", "query_y")), classes, budget)
            for i, (classes, budget) in enumerate(json.loads(path.with_suffix(".json").read_text()))]


class GivenEpisodes:
    """An episode source over a fixed list of global meta-batches (this rank's share of each)."""

    def __init__(self, episodes: list, first: int):
        self.episodes, self.first, self.count = episodes, first, PER_RANK

    def take(self, step: int):
        batch = self.episodes[step * META_BATCH:(step + 1) * META_BATCH]
        return batch[self.first:self.first + self.count], 0.0

    def state(self) -> list:
        return []

    def restore(self, states: list) -> None:
        pass


def _rank(rank: int, port: int, cfg_path: str, episodes_path: str, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from stamp_dist.config import load_config
    from stamp_dist.distributed.engine import DeepSpeedEngine, TorchGroup
    from stamp_dist.meta.backend import Backend
    from stamp_dist.meta.local import RunDirectory
    from stamp_dist.meta.trainer import MetaTrainer

    episodes = load_episodes(Path(episodes_path))

    def deepspeed_backend(cfg, model, classes):
        return Backend(DeepSpeedEngine(model.trained, cfg), TorchGroup(torch.device("cpu")),
                       GivenEpisodes(episodes, rank * PER_RANK), RunDirectory(cfg))

    def step(trainer: MetaTrainer) -> dict:
        return trainer.group.mean(trainer.meta_step(trainer.source.take(trainer.step)[0]))

    for name, overrides in VARIANTS.items():
        cfg = load_config(cfg_path, [*overrides, f"meta.out={out}/{name}"])
        trainer = MetaTrainer(cfg, deepspeed_backend, torch.device("cpu"))
        metrics = [step(trainer) for _ in range(STEPS)]
        save_file(trainer.model.weights()["stamp"], f"{out}/{name}_rank{rank}.safetensors")
        if rank == 0:
            with open(f"{out}/{name}_metrics.json", "w") as f:
                json.dump(metrics, f)
        # Checkpoint (rank 0 writes safetensors + JSON), load into a fresh engine, take one more step on both.
        trainer._save(metrics[-1])
        trainer.group.barrier()
        resumed = MetaTrainer(cfg, deepspeed_backend, torch.device("cpu"))
        assert resumed._resume() and resumed.step == trainer.step == STEPS
        for which in (trainer, resumed):
            step(which)
            save_file({k: v.contiguous() for k, v in which.engine.training_state().items()},
                      f"{out}/{name}_{'resumed' if which is resumed else 'continued'}_rank{rank}.safetensors")
    trainer.group.close()


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """Single-process reference and distributed results for every variant, from the same episodes."""
    from stamp_dist.meta.trainer import MetaTrainer

    tmp = tmp_path_factory.mktemp("equivalence")
    cfg = tiny_config(tiny_run, f"meta.out={tmp}/meta", f"meta.meta_batch={META_BATCH}", f"meta.grad_clip={CLIP}")
    OmegaConf.save(cfg, tmp / "cfg.yaml")
    trainer = MetaTrainer(cfg)
    episodes = [ep for step in range(STEPS + 1) for ep in trainer.source.take(step)[0]]  # +1: after the resume
    save_episodes(episodes, tmp / "episodes")
    initial = {k: v.detach().clone() for k, v in trainer.stamp.state_dict().items()}
    reference = [trainer.meta_step(episodes[step * META_BATCH:(step + 1) * META_BATCH]) for step in range(STEPS)]
    weights = {k: v.detach().clone() for k, v in trainer.stamp.state_dict().items()}
    mp.spawn(_rank, args=(_free_port(), str(tmp / "cfg.yaml"), str(tmp / "episodes"), str(tmp)), nprocs=WORLD)
    return tmp, initial, weights, reference


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["zero0", "zero2"])
def test_two_deepspeed_ranks_equal_the_local_engine_on_the_same_global_meta_batch(runs, variant):
    tmp, _, reference_weights, reference_metrics = runs
    assert all(m["grad_norm"] > CLIP for m in reference_metrics)  # clipping was active
    ranks = [load_file(str(tmp / f"{variant}_rank{r}.safetensors")) for r in range(WORLD)]
    assert ranks[0].keys() == reference_weights.keys()
    diff = max(float((ranks[0][k] - reference_weights[k]).abs().max()) for k in reference_weights)
    print(f"{variant}: max |distributed - single-process| after {STEPS} steps = {diff:.3g}")
    assert diff < 1e-5
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in reference_weights)
    metrics = json.loads((tmp / f"{variant}_metrics.json").read_text())
    for dist_m, ref_m in zip(metrics, reference_metrics):
        for key in ("loss", "ce", "expected_ratio", "query_acc", "budget"):
            assert dist_m[key] == pytest.approx(ref_m[key], abs=1e-5), key
        # AdamW and a binding clip hide the gradient's scale from the weights; the pre-clip norm does not.
        assert dist_m["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_bf16_engine_trains(runs):
    """bf16 (ZeRO-1) has no exact counterpart; it must take finite steps that move the weights."""
    tmp, initial, _, _ = runs
    weights = load_file(str(tmp / "bf16_rank0.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in json.loads((tmp / "bf16_metrics.json").read_text()))
    assert any(float((weights[k] - initial[k]).abs().max()) > 0 for k in weights)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_is_safetensors_and_resumes_exactly(runs, variant):
    """Defect 1 of issue 15: Ray-backend training state was DeepSpeed's pickles. Now a checkpoint is
    safetensors + JSON only, and an engine loaded from it (ZeRO 0, ZeRO 2, bf16 with ZeRO 1) takes the
    same next step as the engine that wrote it: weights, fp32 masters and AdamW moments all equal."""
    from stamp_dist.checkpoint import FILES

    tmp = runs[0]
    assert sorted(p.name for p in (tmp / variant / "checkpoint").iterdir()) == sorted(FILES)
    for rank in range(WORLD):
        continued = load_file(str(tmp / f"{variant}_continued_rank{rank}.safetensors"))
        resumed = load_file(str(tmp / f"{variant}_resumed_rank{rank}.safetensors"))
        assert continued.keys() == resumed.keys() and any(k.startswith("exp_avg_sq.") for k in continued)
        for k in continued:
            assert torch.equal(continued[k], resumed[k]), (variant, rank, k)
