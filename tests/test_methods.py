"""The registry of pruning methods (stamp_dist/methods.py): one entry per name, the same artifact from
every method through `stamp prune --method` and ``prune_with``, and the bench's cache keys."""

import pytest
import torch

import stamp_dist
from conftest import tiny_config
from stamp_dist.bench import plan, run
from stamp_dist.cli import main
from stamp_dist.choices import METHOD_NAMES, Method
from stamp_dist.data.readers import Normalization, load_split
from stamp_dist.errors import StampError
from stamp_dist.methods import METHODS, Family

BUDGET = 0.5


@pytest.fixture(scope="module")
def digits(tiny_run):
    return tiny_run / "data" / "targets" / "digits"


def test_the_registry_holds_every_method_name_once():
    assert list(METHODS) == list(Method) and [str(m) for m in METHODS] == list(METHOD_NAMES)
    assert all(m.name is name for name, m in METHODS.items())
    assert [m for m in METHODS if not METHODS[m].prunes] == [Method.DENSE]
    assert [m for m in METHODS if METHODS[m].uses_generator] == [Method.STAMP, Method.TRAIN_STAMP]
    assert {m for m in METHODS if METHODS[m].family is Family.TRAINED} == {Method.TRAIN_PRUNE, Method.LEARN_GATES,
                                                                          Method.TRAIN_STAMP}


def test_bench_accepts_exactly_the_registered_methods(tiny_run):
    cfg = tiny_config(tiny_run, f"bench.methods=[{','.join(METHODS)}]", f"bench.targets=[{tiny_run}/data/targets/digits]")
    assert [c.method for c in plan.plan_cells(cfg)] == list(METHOD_NAMES)
    with pytest.raises(StampError, match="bench.methods.*magic"):
        tiny_config(tiny_run, "bench.methods=[magic]")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_writes_a_pruned_model_within_the_budget(method, tiny_run, tiny_generator, digits, tmp_path):
    cfg = tiny_config(tiny_run, "bench.gate_steps=3")
    out = tmp_path / "pruned"
    report = stamp_dist.prune_with(method, digits, BUDGET, out, cfg, generator=tiny_generator, device="cpu")
    model, spec = stamp_dist.load_pruned(out)
    assert spec.report == report and report["method"] == method and model.fc.out_features == 10
    if METHODS[method].prunes:
        assert report["macs_ratio"] <= BUDGET + 0.02 and report["budget"] == BUDGET
    else:
        assert report["macs_ratio"] > 0.999 and report["budget"] == 1.0  # (a head for 10 classes, not 12)
    x = Normalization.of(spec)(load_split(digits, "test", per_class=2)[0])
    again, _ = stamp_dist.load_pruned(out)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_prune_cli_takes_a_method_and_warns_about_the_generator_it_ignores(tiny_run, tiny_generator, digits,
                                                                           tmp_path, capsys):
    argv = ["prune", "--method", "l1", "--generator", str(tiny_generator), "--data", str(digits), "--budget", "0.4",
            "--out", str(tmp_path / "l1"), "runtime.device=cpu", "prune.samples_per_class=5",
            f"pretrain.out={tiny_run}/pretrain"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "pruned model (l1)" in captured.out
    assert "warning: --generator is not used by --method l1; ignored" in captured.err
    _, spec = stamp_dist.load_pruned(tmp_path / "l1")
    assert spec.report["method"] == "l1" and spec.report["backbone"] == f"{tiny_run}/pretrain"
    # the same artifact as STAMP's: fine-tuned, then exported, by the same commands
    assert main(["finetune", "--model", str(tmp_path / "l1"), "--data", str(digits), "--epochs", "1",
                 "--out", str(tmp_path / "l1-ft"), "runtime.device=cpu", "finetune.train_per_class=5"]) == 0
    assert main(["export", "--model", str(tmp_path / "l1-ft"), "--format", "torch.export",
                 "--out", str(tmp_path / "l1.pt2")]) == 0
    assert stamp_dist.load_pruned(tmp_path / "l1-ft")[1].report["method"] == "l1"
    assert (tmp_path / "l1.pt2").stat().st_size > 0


def test_bench_cache_keys_hold_each_methods_settings(tiny_run, tiny_generator, tmp_path):
    """The keys of cached cells must not change with the code's layout: the cache on disk depends on them."""
    cfg = tiny_config(tiny_run, f"meta.out={tiny_generator}", f"bench.targets=[{tiny_run}/data/targets/digits]",
                      f"bench.methods=[{','.join(METHODS)}]")
    b = run.Bench(cfg, torch.device("cpu"))
    keys = {c.method: b.key(c) for c in plan.plan_cells(cfg)}
    common = {"target", "train_per_class", "epochs", "seed", "method", "budget", "backbone", "eval_per_class",
              "pruning_batch_per_class", "finetune"}
    extra = {m: set(k) - common for m, k in keys.items()}
    assert extra == {**{m: set() for m in METHOD_NAMES}, "learn_gates": {"gates"},
                     "stamp": {"generator", "allocation", "selection"},
                     "train_stamp": {"generator", "allocation", "selection"}}
    assert keys["learn_gates"]["gates"] == {"steps": 50, "lr": 0.05, "batch": 32, "tau": 0.5, "straight_through": False,
                                            "prior": "bernoulli", "prior_weight": 0.01, "budget_weight": 50.0}
    assert keys["stamp"]["generator"] == b.source.generator_id and keys["stamp"]["selection"] == "sample"


def _digits_bench(tiny_run, tiny_generator, *overrides):
    """A Bench on the tiny digits target, its cells, and the first cell's sample, pruning batch and scoring set."""
    from stamp_dist.bench import samples

    cfg = tiny_config(tiny_run, f"meta.out={tiny_generator}", f"bench.targets=[{tiny_run}/data/targets/digits]",
                      *overrides)
    b = run.Bench(cfg, torch.device("cpu"))
    cells = plan.plan_cells(cfg)
    sample, evaluation = samples.split_sample(b.data(cells[0].target), cells[0].train_per_class, cells[0].seed)
    return b, cells, sample, samples.pruning_batch(sample, 5, cells[0].seed, b.device), evaluation


def test_train_stamp_cuts_stamps_channels_from_the_fine_tuned_network(tiny_run, tiny_generator):
    b, [cell], sample, batch, evaluation = _digits_bench(tiny_run, tiny_generator, "bench.methods=[train_stamp]")
    src = b.source
    job = b.job(cell, sample, batch, evaluation)
    g = src.net.groups[1]
    chosen = METHODS[Method.STAMP].masks(src, job)

    def fine_tune(model, cell, sample, evaluation):  # a "fine-tune" that silences the filters STAMP keeps
        with torch.no_grad():
            model.get_submodule(g.name).weight[chosen[1]] = 0
        return {"seconds": 1.0, "top1": 0.5, "top1_before": 0.1}

    b.finetune = fine_tune
    pruned = METHODS[Method.TRAIN_STAMP].prune(src, job)
    dense = b.dense_finetune(cell, sample, batch, evaluation).pruned.model
    by_l1 = METHODS[Method.TRAIN_PRUNE].choose(dense, src, job)
    assert not all(torch.equal(a, c) for a, c in zip(chosen, by_l1))  # train_prune's rule would choose otherwise
    assert all(torch.equal(a, c) for a, c in zip(pruned.masks, chosen))  # STAMP's channels, read as stamp reads them
    kept_out, kept_in = chosen[1].nonzero().squeeze(1), chosen[0].nonzero().squeeze(1)
    weight = pruned.model.get_submodule(g.name).weight
    assert torch.equal(weight, dense.get_submodule(g.name).weight[kept_out][:, kept_in]) and not weight.any()
    assert torch.equal(pruned.model.fc.bias, dense.fc.bias)  # the fine-tuned head is kept


def test_warmup_epochs_set_the_dense_fine_tune_before_pruning_only(tiny_run, tiny_generator):
    b, [dense_cell, *pruning_cells], sample, batch, evaluation = _digits_bench(
        tiny_run, tiny_generator, "bench.methods=[dense,train_prune,train_stamp]", "prune.warmup_epochs=2")
    epochs = []

    def fine_tune(model, cell, sample, evaluation):
        epochs.append(cell.epochs)
        return {"seconds": 1.0, "top1": 0.5, "top1_before": 0.1}

    b.finetune = fine_tune
    b.dense_finetune(dense_cell, sample, batch, evaluation)  # the dense reference: the regime's epochs
    for cell in pruning_cells:
        METHODS[cell.method].prune(b.source, b.job(cell, sample, batch, evaluation))
    assert dense_cell.epochs != 2 and epochs == [dense_cell.epochs, 2]  # one 2-epoch warm-up, shared
    keys = {c.method: b.key(c) for c in pruning_cells}
    assert keys["train_prune"]["warmup_epochs"] == keys["train_stamp"]["warmup_epochs"] == 2


def test_prune_with_warms_up_for_warmup_epochs(tiny_run, tiny_generator, digits, tmp_path, monkeypatch):
    import stamp_dist.methods as methods

    seen = []
    real = methods.finetune_model
    monkeypatch.setattr(methods, "finetune_model", lambda *a, **k: seen.append(a[4].epochs) or real(*a, **k))
    cfg = tiny_config(tiny_run, "prune.warmup_epochs=1", "finetune.epochs=3")
    report = stamp_dist.prune_with("train_stamp", digits, BUDGET, tmp_path / "p", cfg, generator=tiny_generator,
                                   device="cpu")
    assert seen == [1] and report["warmup_epochs"] == 1
