"""Artifacts record the sha256 of their weights and are verified on load; non-finite weights are never written
(issue 15, defects 6 and 7)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stamp_dist.checkpoint import load_state, save_state
from stamp_dist.errors import StampError
from stamp_dist.integrity import HASH_KEY, load_tensors, save_tensors, sha256_file
from stamp_dist.meta.artifact import GeneratorStore, load_generator, resolve
from stamp_dist.models.saved import load_backbone


def test_every_artifact_records_the_hash_of_its_weights(tiny_run, tiny_generator):
    version = resolve(tiny_generator)
    for record, weights in (("generator.json", "generator.safetensors"), ("backbone.json", "backbone.safetensors")):
        assert json.loads((version / record).read_text())[HASH_KEY] == sha256_file(version / weights)
    pretrain = tiny_run / "pretrain"
    assert json.loads((pretrain / "backbone.json").read_text())[HASH_KEY] == sha256_file(pretrain / "backbone.safetensors")
    checkpoint = tiny_generator / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())[HASH_KEY] == sha256_file(checkpoint / "state.safetensors")


def test_a_bit_flip_in_a_backbone_is_refused(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run / "pretrain", tmp_path / "pretrain")
    path = tmp_path / "pretrain" / "backbone.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StampError, match="backbone.safetensors does not match the sha256.*re-run `stamp pretrain`"):
        load_backbone(tmp_path / "pretrain")


def test_a_damaged_checkpoint_is_refused_not_resumed(tmp_path):
    save_state(tmp_path / "ckpt", {"step": 3, "w": torch.ones(4)})
    path = tmp_path / "ckpt" / "state.safetensors"
    weights = load_file(str(path))
    save_file({"s.w": weights["s.w"] * 2}, str(path))
    with pytest.raises(StampError, match="checkpoint .*state.safetensors does not match the sha256.*start the run over"):
        load_state(tmp_path / "ckpt")


def test_artifacts_written_before_hashes_load_with_a_warning(tmp_path, capsys):
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_tensors(tmp_path / "w.safetensors", "weights", None, "fix")["w"], torch.ones(2))
    assert "no recorded sha256" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_saved(tmp_path, bad):
    with pytest.raises(StampError, match="non-finite .* not saved"):
        save_tensors({"w": torch.tensor([1.0, bad])}, tmp_path / "w.safetensors", "the model")
    assert not (tmp_path / "w.safetensors").exists()


def test_a_v1_generator_artifact_still_loads(tiny_generator, tmp_path):
    """Artifacts written before generator.json held the module's own settings (format v1: only the run's meta
    config) load with the settings taken from that config."""
    import shutil
    from dataclasses import asdict

    v1 = tmp_path / "v1"
    shutil.copytree(resolve(tiny_generator), v1)
    record = json.loads((v1 / "generator.json").read_text())
    settings = record.pop("stamp")
    (v1 / "generator.json").write_text(json.dumps({**record, "format": "stamp_dist/generator/v1"}))
    assert asdict(load_generator(v1).stamp.settings) == settings


def test_a_generator_with_nan_weights_is_not_published(tiny_run, tiny_generator, tmp_path):
    """Defect 7 of issue 15: an untrained or diverged generator must not become a published version."""
    gen = load_generator(tiny_generator)
    from stamp_dist.meta.artifact import save_generator

    with torch.no_grad():
        next(gen.stamp.parameters()).fill_(float("nan"))
    store = GeneratorStore(tmp_path / "run")
    with pytest.raises(StampError, match="generator of step 9 has non-finite values"):
        store.publish(9, 0.5, lambda d: save_generator(d, gen.stamp, gen.net, gen.info["meta"], 9, {}))
    assert not store.root.exists() or not any(store.root.iterdir())


def test_training_that_diverges_stops_before_its_checkpoint(tiny_run, tmp_path):
    """Pretraining with a learning rate that blows up: a clear error, and no NaN backbone or checkpoint."""
    from conftest import tiny_config
    from stamp_dist.pretrain import pretrain

    cfg = tiny_config(tiny_run, f"pretrain.out={tmp_path / 'pretrain'}", "pretrain.lr=1e30", "pretrain.epochs=2")
    with pytest.raises(StampError, match="pretrain diverged in epoch 1.*lower the learning rate"):
        pretrain(cfg)
    assert not (tmp_path / "pretrain" / "backbone.safetensors").exists()
    assert not (tmp_path / "pretrain" / "checkpoint").exists()
