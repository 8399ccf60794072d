"""`stamp prune` / `stamp finetune` and the Python API, on the tiny run's generator."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import stamp_dist
from stamp_dist.cli import main
from stamp_dist.config import PruneConfig
from stamp_dist.data.readers import Normalization, load_split
from stamp_dist.data.shards import PerClassShardWriter
from stamp_dist.integrity import sha256_file
from stamp_dist.meta.artifact import resolve


@pytest.fixture(scope="module")
def digits(tiny_run):
    return tiny_run / "data" / "targets" / "digits"


def prune_args(generator, data, out, *extra):
    return ["prune", "--generator", str(generator), "--data", str(data), "--out", str(out), "runtime.device=cpu",
            "prune.samples_per_class=5", *extra]


def test_prune_cli_writes_a_smaller_model_that_reloads_bit_exactly(tiny_generator, digits, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_generator, digits, out, "--budget", "0.4")) == 0
    assert "pruned model" in capsys.readouterr().out
    model, spec = stamp_dist.load_pruned(out)
    report = spec.report
    assert abs(report["macs_ratio"] - 0.4) <= 0.02 and report["macs"] < report["dense_macs"]
    assert report["latency_ms_b64"] > 0 and report["seconds_to_prune"] > 0
    assert all(1 <= len(g.kept) <= g.channels for g in spec.groups)
    assert model.fc.out_features == 10
    x, _, _ = load_split(digits, "test", per_class=2)
    x = Normalization.of(spec)(x)
    again, _ = stamp_dist.load_pruned(out)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_python_api_with_adaptation(tiny_generator, digits, tmp_path):
    report = stamp_dist.prune(tiny_generator, digits, 0.5, tmp_path / "adapted",
                              PruneConfig(adapt_steps=2, samples_per_class=4), device="cpu")
    assert report["adapt_steps"] == 2 and abs(report["macs_ratio"] - 0.5) <= 0.02


def test_uniform_allocation_keeps_the_same_fraction_per_group(tiny_generator, digits, tmp_path):
    report = stamp_dist.prune(tiny_generator, digits, 0.5, tmp_path / "uniform",
                              PruneConfig(samples_per_class=4, allocation="uniform"), device="cpu")
    spec = json.loads((tmp_path / "uniform" / "spec.json").read_text())
    fractions = [len(g["kept"]) / g["channels"] for g in spec["groups"]]
    assert report["allocation"] == "uniform" and 0.45 <= report["macs_ratio"] <= 0.5
    assert max(fractions) - min(fractions) <= max(1 / g["channels"] for g in spec["groups"]) + 1e-6


def test_keep_probabilities_depend_on_the_target_not_on_sample_order(tiny_generator, tiny_run):
    from stamp_dist.downstream import load_target
    from stamp_dist.meta.artifact import load_generator
    from stamp_dist.models.generator import keep_probability

    gen = load_generator(tiny_generator)
    norm = gen.net.norm

    def probs(target, order=None):
        x = target.x if order is None else target.x.view(target.num_classes, -1, *target.x.shape[1:])[:, order]
        inputs = gen.stamp.read(gen.net, norm(x.reshape(-1, *target.x.shape[1:])), target.num_classes)
        with torch.no_grad():
            return torch.cat([keep_probability(a) for a in gen.stamp.eval()(inputs, 0.3)])

    digits = load_target(tiny_run / "data" / "targets" / "digits", 5, gen.net.record)
    shapes = load_target(tiny_run / "data" / "targets" / "synthetic_heldout", 5, gen.net.record)
    across_targets = (probs(digits) - probs(shapes)).abs().max()
    across_orders = (probs(digits) - probs(digits, torch.tensor([4, 2, 0, 1, 3]))).abs().max()
    assert across_orders < 1e-5  # a set function: the order of the sample does not matter
    assert across_targets > 10 * max(float(across_orders), 1e-7)  # ...but what is in it does


def test_finetune_cli_reports_top1(tiny_generator, digits, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(prune_args(tiny_generator, digits, pruned)) == 0
    out = tmp_path / "tuned"
    assert main(["finetune", "--model", str(pruned), "--data", str(digits), "--epochs", "1", "--out", str(out),
                 "runtime.device=cpu", "finetune.train_per_class=5"]) == 0
    assert "top-1" in capsys.readouterr().out
    _, spec = stamp_dist.load_pruned(out)
    assert 0 <= spec.report["finetune"]["top1"] <= 1 and spec.report["finetune"]["train_images"] == 50


def _one_class_target(path):
    w = PerClassShardWriter(path, ["only"], 32)
    for _ in range(6):
        w.add("train", 0, np.zeros((32, 32, 3), np.uint8))
    w.finish()


def _small_images_target(path):
    w = PerClassShardWriter(path, ["a", "b"], 16)
    for c in range(2):
        for _ in range(6):
            w.add("train", c, np.zeros((16, 16, 3), np.uint8))
    w.finish()


@pytest.mark.parametrize("case, words", [
    ("budget_zero", ["budget", "(0, 1]"]),
    ("budget_big", ["budget", "(0, 1]"]),
    ("one_class", ["1 class", "at least 2"]),
    ("few_images", ["fewer", "asked"]),
    ("other_backbone", ["backbone.safetensors", "sha256", "generator artifact", "damaged"]),
    ("other_backbone_rehashed", ["fingerprint", "damaged"]),  # backbone.json's hash updated with the swap
    ("wrong_size", ["16", "--image-size 32"]),
    ("not_a_generator", ["no generator artifact"]),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, words, tiny_generator, digits, tmp_path, capsys):
    generator, data, extra = tiny_generator, digits, []
    if case == "budget_zero":
        extra = ["--budget", "0"]
    elif case == "budget_big":
        extra = ["--budget", "1.5"]
    elif case == "one_class":
        data = tmp_path / "one"
        _one_class_target(data)
    elif case == "few_images":
        extra = ["prune.samples_per_class=1000"]
    elif case.startswith("other_backbone"):
        generator = tmp_path / "swapped"
        shutil.copytree(resolve(tiny_generator), generator)
        weights = load_file(str(generator / "backbone.safetensors"))
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()},
                  str(generator / "backbone.safetensors"))
        if case == "other_backbone_rehashed":
            record = json.loads((generator / "backbone.json").read_text())
            record["weights_sha256"] = sha256_file(generator / "backbone.safetensors")
            (generator / "backbone.json").write_text(json.dumps(record))
    elif case == "wrong_size":
        data = tmp_path / "small"
        _small_images_target(data)
    elif case == "not_a_generator":
        generator = digits
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    assert main(prune_args(generator, data, out, *extra)) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert set(tmp_path.iterdir()) == before and not out.exists()


def test_finetune_streamed_from_the_shards_gives_the_same_model(tiny_generator, digits, tmp_path, monkeypatch):
    """`stamp finetune` with runtime.data_memory_mb=0 reads both splits through 2 DataLoader workers (neither is
    loaded whole) and trains the same weights, with the same score, as in memory."""
    from stamp_dist.data import readers

    pruned = tmp_path / "pruned"
    assert main(prune_args(tiny_generator, digits, pruned)) == 0
    common = ["finetune", "--model", str(pruned), "--data", str(digits), "--epochs", "1"]
    overrides = ["runtime.device=cpu", "finetune.train_per_class=5"]
    assert main([*common, "--out", str(tmp_path / "memory"), *overrides]) == 0
    monkeypatch.setattr(readers, "load_split", lambda *a, **k: pytest.fail("a split was loaded whole"))
    assert main([*common, "--out", str(tmp_path / "streamed"), *overrides, "runtime.data_memory_mb=0",
                 "runtime.data_workers=2"]) == 0
    (a, spec_a), (b, spec_b) = (stamp_dist.load_pruned(tmp_path / d) for d in ("memory", "streamed"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert spec_a.report["finetune"]["top1"] == spec_b.report["finetune"]["top1"]


def test_the_pruned_head_reads_the_sample_in_micro_batches(tiny_generator, digits):
    """``runtime.micro_batch`` bounds the pruned network's pass over the target sample too: the same head."""
    from stamp_dist.downstream import build_pruned, load_target
    from stamp_dist.meta.artifact import load_generator

    gen = load_generator(tiny_generator)
    target = load_target(digits, 5, gen.net.record)
    masks = [torch.arange(n) % 2 == 0 for n in gen.net.groups.sizes]
    whole = build_pruned(gen.net, masks, target)
    gen.net.micro_batch = 7
    chunked = build_pruned(gen.net, masks, target)
    torch.testing.assert_close(chunked.fc.weight, whole.fc.weight)
    torch.testing.assert_close(chunked.fc.bias, whole.fc.bias)
