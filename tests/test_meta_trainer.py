import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from stamp_dist.errors import StampError
from stamp_dist.meta.artifact import GeneratorStore, load_generator, resolve
from stamp_dist.meta.trainer import MetaTrainer, meta_train


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
    assert gen.info["backbone"]["backbone"] == "convnet" and len(gen.groups) == len(gen.info["groups"])


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


def test_stop_signal_checkpoints_then_resume_matches_uninterrupted_run(tiny_run, tmp_path, capsys):
    """SIGUSR1 (SLURM's pre-timeout signal) after step 1 — not a checkpoint step — checkpoints there."""
    straight = tmp_path / "straight"
    meta_train(tiny_config(tiny_run, f"meta.out={straight}"))
    split = tmp_path / "split"
    trainer = MetaTrainer(tiny_config(tiny_run, f"meta.out={split}"))
    step = trainer.meta_step

    def step_then_signal(episodes):
        out = step(episodes)
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.meta_step = step_then_signal
    trainer.run()
    assert "stopped at step 1 with a checkpoint" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone after the run
    resumed = MetaTrainer(tiny_config(tiny_run, f"meta.out={split}"))
    resumed.run()
    assert "from step 1" in capsys.readouterr().out  # resumed, not restarted
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
