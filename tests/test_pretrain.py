import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stamp_dist import training
from stamp_dist.data.readers import Normalization
from stamp_dist.config import load_config
from stamp_dist.devices import pick_device
from stamp_dist.data import demo
from stamp_dist.data.readers import load_split
from stamp_dist.data.shards import PerClassShardWriter
from stamp_dist.errors import StampError
from stamp_dist.models.saved import load_backbone
from stamp_dist.pretrain import pretrain

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny synthetic reference: 4 classes, 12 train / 4 test images each."""
    root = tmp_path_factory.mktemp("ref") / "reference"
    combos = demo.REFERENCE_COMBOS[:4]
    writer = PerClassShardWriter(root, [demo.class_name(c) for c in combos], 32)
    rng = np.random.default_rng(0)
    for label, combo in enumerate(combos):
        for split, n in (("train", 12), ("test", 4)):
            for image in demo.render_class(combo, n, rng):
                writer.add(split, label, image)
    writer.finish()
    return root


def tiny_config(reference, out, *overrides):
    return load_config(DEMO_YAML, [f"data.reference={reference}", f"pretrain.out={out}", "model.backbone=convnet",
                                   "model.width=8", "pretrain.epochs=2", "pretrain.batch_size=16",
                                   "pretrain.num_threads=0", "runtime.device=cpu", *overrides])


def count_epochs(monkeypatch, fail_at: int | None = None) -> list:
    """Record train_epoch calls; optionally raise KeyboardInterrupt (a user's Ctrl-C) at call ``fail_at``."""
    calls, real = [], training.train_epoch

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", wrapped)
    return calls


@pytest.fixture(scope="module")
def finished(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "pretrain"
    pretrain(tiny_config(reference, out))
    return out


def weights(out):
    return load_backbone(out)[0].state_dict()


def test_artifact_round_trips(finished, reference):
    model, meta = load_backbone(finished)
    assert (meta["backbone"], meta["width"], meta["num_classes"], meta["epochs"]) == ("convnet", 8, 4, 2)
    assert meta["classes"] == [demo.class_name(c) for c in demo.REFERENCE_COMBOS[:4]] and meta["image_size"] == 32
    assert [h["epoch"] for h in meta["history"]] == [1, 2] and meta["wall_seconds"] > 0
    images, labels, manifest = load_split(reference, "test")
    top1 = training.evaluate(model, images, labels, Normalization.of(manifest), 64, torch.device("cpu"))
    assert top1 == pytest.approx(meta["test_top1"], abs=1e-4)  # the loaded weights are the trained ones
    assert json.loads((finished / "backbone.json").read_text())["run"]["backbone"] == "convnet"


def test_same_config_is_cached(finished, reference, monkeypatch, capsys):
    calls = count_epochs(monkeypatch)
    assert pretrain(tiny_config(reference, finished)) == finished
    assert calls == [] and "reusing" in capsys.readouterr().out


def test_more_epochs_resume_from_the_checkpoint(finished, reference, tmp_path, monkeypatch):
    one = tmp_path / "one"
    pretrain(tiny_config(reference, one, "pretrain.epochs=1"))
    first = json.loads((one / "backbone.json").read_text())["history"]
    calls = count_epochs(monkeypatch)
    pretrain(tiny_config(reference, one, "pretrain.epochs=2"))
    history = json.loads((one / "backbone.json").read_text())["history"]
    assert len(calls) == 1 and len(history) == 2 and history[0] == first[0]


def test_interrupted_run_resumes_to_the_same_weights(finished, reference, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    count_epochs(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(reference, out))
    assert (out / "checkpoint" / "state.json").is_file() and not (out / "backbone.json").exists()
    calls = count_epochs(monkeypatch)
    pretrain(tiny_config(reference, out))
    assert len(calls) == 1
    resumed, uninterrupted = weights(out), weights(finished)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_changed_settings_are_an_error(finished, reference):
    with pytest.raises(StampError, match="lr"):
        pretrain(tiny_config(reference, finished, "pretrain.lr=0.2"))
    with pytest.raises(StampError, match="not found"):
        pretrain(tiny_config(finished / "nowhere", finished))


def test_load_backbone_rejects_mismatched_weights(finished, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((finished / "backbone.json").read_text())
    (broken / "backbone.json").write_text(json.dumps({**meta, "width": 16}))
    (broken / "backbone.safetensors").write_bytes((finished / "backbone.safetensors").read_bytes())
    with pytest.raises(StampError, match="does not match"):
        load_backbone(broken)


def test_augment_crops_and_flips_uint8():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    out = training.augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):  # every output is a window of the padded image, mirrored or not
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    same = training.augment(images, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, same)
    assert torch.equal(training.augment(images, torch.Generator(), flip=False, pad=0), images)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_streaming_from_the_shards_trains_the_same_weights(finished, reference, tmp_path, monkeypatch):
    """runtime.data_memory_mb=0 streams both splits through 2 DataLoader workers (nothing loaded whole):
    the same batches, order and augmentation as in memory, so bit-identical weights and history."""
    from stamp_dist.data import readers

    def refuse(*a, **k):
        raise AssertionError("a split was loaded whole")

    monkeypatch.setattr(readers, "load_split", refuse)
    bounded = []  # streaming also fixes glibc's mmap threshold, so that decode buffers do not pile up
    monkeypatch.setattr(training, "bound_host_allocator", lambda: bounded.append(1) or True)
    out = tmp_path / "streamed"
    pretrain(tiny_config(reference, out, "runtime.data_memory_mb=0", "runtime.data_workers=2"))
    assert bounded
    streamed, expected = weights(out), weights(finished)
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    history = lambda o: [{k: v for k, v in h.items() if k != "seconds"} for h in load_backbone(o)[1]["history"]]
    assert history(out) == history(finished)
