import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from stamp_dist.errors import StampError, Stopped
from stamp_dist.meta.artifact import GeneratorStore, load_generator, resolve
from stamp_dist.meta.trainer import MetaTrainer
from stamp_dist.metatrain import meta_train
from stamp_dist.runlog import MetricsLog


def test_run_publishes_versions_and_pointers(tiny_generator):
    store = GeneratorStore(tiny_generator)
    latest, best = store.pointer("latest"), store.pointer("best")
    assert latest["step"] == 4 and latest["version"] == "v000004"
    assert best["version"] in {"v000002", "v000004"}
    assert resolve(tiny_generator).name == best["version"]  # a run directory resolves to best
    lines = [json.loads(line) for line in (tiny_generator / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "ce", "expected_ratio", "budget", "query_acc", "seconds"} <= set(lines[0])
    assert "val_acc" in lines[1] and 0 <= lines[1]["val_acc"] <= 1


def test_published_generator_loads_and_matches_training_weights(tiny_run, tiny_generator):
    gen = load_generator(tiny_generator)
    weights = load_file(str(resolve(tiny_generator) / "generator.safetensors"))
    for k, v in gen.stamp.state_dict().items():
        assert torch.equal(v, weights[k])
    assert gen.info["backbone"]["backbone"] == "convnet" and len(gen.net.groups) == len(gen.info["groups"])


def test_resume_equals_uninterrupted_run(tiny_run, tmp_path):
    """Stop after 2 steps, restart with the same run directory: same weights as 4 steps in one go."""
    straight = tmp_path / "straight"
    meta_train(tiny_config(tiny_run, f"meta.out={straight}"))
    split = tmp_path / "split"
    meta_train(tiny_config(tiny_run, f"meta.out={split}", "meta.steps=2"))
    resumed = MetaTrainer(tiny_config(tiny_run, f"meta.out={split}"))
    resumed.run()
    a = load_file(str(straight / "checkpoint" / "state.safetensors"))
    b = load_file(str(split / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_checkpoints_then_resume_matches_uninterrupted_run(tiny_run, tmp_path, capsys, sig):
    """SIGUSR1 (SLURM's pre-timeout signal), SIGTERM or Ctrl-C after step 1 — not a checkpoint step —
    checkpoints there and stops (``Stopped``: the CLI exits with EXIT_STOPPED); the rerun resumes exactly."""
    straight = tmp_path / "straight"
    meta_train(tiny_config(tiny_run, f"meta.out={straight}"))
    split = tmp_path / "split"
    trainer = MetaTrainer(tiny_config(tiny_run, f"meta.out={split}"))
    step = trainer.meta_step

    def step_then_signal(episodes):
        out = step(episodes)
        if trainer.step == 1:
            os.kill(os.getpid(), sig)
        return out

    trainer.meta_step = step_then_signal
    before = signal.getsignal(sig)
    with pytest.raises(Stopped, match="stopped at step 1 of 4 with a checkpoint"):
        trainer.run()
    assert signal.getsignal(sig) is before  # the handler is gone after the run
    assert [r["step"] for r in MetricsLog(split / "metrics.jsonl").steps()] == [1]
    resumed = MetaTrainer(tiny_config(tiny_run, f"meta.out={split}"))
    resumed.run()
    assert "from step 1" in capsys.readouterr().out  # resumed, not restarted
    assert [r["step"] for r in MetricsLog(split / "metrics.jsonl").steps()] == [1, 2, 3, 4]
    a = load_file(str(straight / "checkpoint" / "state.safetensors"))
    b = load_file(str(split / "checkpoint" / "state.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_diverged_loss_stops_before_the_optimizer_step(tiny_run, tmp_path, monkeypatch):
    """A NaN outer loss at step 3 → StampError naming the step and the fix; the step-2 checkpoint stays."""
    from stamp_dist.meta import trainer as trainer_module

    run = tmp_path / "run"
    meta_train(tiny_config(tiny_run, f"meta.out={run}", "meta.steps=2"))
    saved = load_file(str(run / "checkpoint" / "state.safetensors"))
    real = trainer_module.episode_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "episode_loss", nan_loss)
    with pytest.raises(StampError, match="diverged at step 3.*meta.inner_lr"):
        meta_train(tiny_config(tiny_run, f"meta.out={run}"))
    after = load_file(str(run / "checkpoint" / "state.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_resume_with_another_generator_shape_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    meta_train(tiny_config(tiny_run, f"meta.out={run}", "meta.steps=1"))
    with pytest.raises(StampError, match="another shape.*new meta.out"):
        meta_train(tiny_config(tiny_run, f"meta.out={run}", "meta.steps=2", "meta.channel_stats=false"))


def test_old_format_checkpoint_is_refused_naming_the_directory_and_the_fix(tiny_run, tmp_path):
    """A local checkpoint of the format before both backends shared one (stamp/optimizer state dicts) is not
    misloaded: the error names the directory and says to remove it or choose a new meta.out."""
    from stamp_dist.checkpoint import save_state

    run = tmp_path / "run"
    save_state(run / "checkpoint", {"step": 2, "stamp": {"w": torch.zeros(2)}, "optimizer": {"state": {}},
                                    "backbone": {}, "torch_rng": torch.zeros(4, dtype=torch.uint8)})
    with pytest.raises(StampError, match=rf"{run / 'checkpoint'} was written by an older .*remove it.*meta.out"):
        meta_train(tiny_config(tiny_run, f"meta.out={run}"))


def test_store_keeps_last_k_and_best(tmp_path):
    store = GeneratorStore(tmp_path, keep=2)

    def save(directory):
        directory.mkdir(parents=True)
        (directory / "generator.json").write_text("{}")

    for step, score in [(1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)]:
        store.publish(step, score, save)
    versions = sorted(p.name for p in store.root.glob("v*"))
    assert versions == ["v000001", "v000003", "v000004"]  # best (step 1) survives pruning
    assert store.pointer("best")["version"] == "v000001" and store.pointer("latest")["version"] == "v000004"


@pytest.fixture(scope="module")
def big_classes(tmp_path_factory):
    """A reference dataset whose classes hold 520 training images: more than the default sampler buffer (512)."""
    import numpy as np

    from stamp_dist.data.shards import PerClassShardWriter

    root = tmp_path_factory.mktemp("big_classes")
    writer = PerClassShardWriter(root, [f"c{i}" for i in range(6)], 32)
    rng = np.random.default_rng(0)
    for c in range(6):
        for split, n in (("train", 520), ("test", 8)):
            for _ in range(n):
                writer.add(split, c, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    writer.finish()
    return root


def _stopped_at(trainer: MetaTrainer, at: int) -> None:
    """Run ``trainer``, sending SIGTERM to this process during step ``at``; expect the checkpoint-and-stop."""
    step = trainer.meta_step

    def step_then_signal(episodes):
        out = step(episodes)
        if trainer.step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.meta_step = step_then_signal
    with pytest.raises(Stopped):
        trainer.run()


@pytest.mark.parametrize("overrides", [[], ["runtime.sampler_buffer=10", "runtime.sampler_reuse=1"]],
                         ids=["520_per_class", "small_buffer_refilled"])
def test_resume_is_exact_when_classes_exceed_the_sampler_buffer(tiny_run, big_classes, tmp_path, overrides):
    """Defect 4 of issue 15: with more images per class than the buffer holds, a resumed run drew other
    images than an uninterrupted one (0.029 apart at 600 per class). The buffers' contents are now a
    function of (seed, class, fill number), saved with the checkpoint: resume is bit-exact, also when
    buffers are refilled during the run (second case)."""
    def config(out):
        return tiny_config(tiny_run, f"data.reference={big_classes}", f"meta.out={out}", "meta.steps=6",
                           "meta.checkpoint_every=100", *overrides)

    meta_train(config(tmp_path / "straight"))
    _stopped_at(MetaTrainer(config(tmp_path / "split")), 3)
    meta_train(config(tmp_path / "split"))
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_autocast_on_the_local_backend(tiny_run, tmp_path, monkeypatch):
    """``runtime.precision: bf16`` runs the episode's convolutions and matmuls in bf16 on the local backend
    too (the Ray learner did already): the same step's loss moves by bf16 round-off, not more, and stays
    finite; weights and the optimizer stay fp32."""
    import stamp_dist.meta.trainer as trainer_module

    seen = []
    real = trainer_module.episode_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "episode_loss", spy)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        trainer = MetaTrainer(tiny_config(tiny_run, f"meta.out={tmp_path / precision}", "runtime.device=cpu",
                                          f"runtime.precision={precision}"))
        episodes, _ = trainer.source.take(0)
        losses[precision] = trainer.meta_step(episodes)["loss"]
        assert all(p.dtype == torch.float32 for p in trainer.stamp.parameters())
    assert seen[0] is None and seen[-1] == torch.bfloat16
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
