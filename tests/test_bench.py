import json
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from stamp_dist import methods
from stamp_dist.bench import plan, run, samples
from stamp_dist.errors import StampError


def _digits_cfg(tiny_run, tiny_generator, out, *overrides):
    return tiny_config(tiny_run, f"meta.out={tiny_generator}", f"bench.out={out}",
                       f"bench.targets=[{tiny_run}/data/targets/digits]", *overrides)


def test_cells_run_once_then_cached_and_stale_cells_rerun(tiny_run, tiny_generator, tmp_path, monkeypatch):
    cfg = _digits_cfg(tiny_run, tiny_generator, tmp_path)
    results = run.run_bench(cfg, "cpu").cells
    assert [(r.method, r.budget) for r in results] == [("dense", 1.0), ("random", 0.5), ("stamp", 0.5)]
    for r in results:
        assert 0 <= r.top1 <= 1 and r.train_images == 50 and r.eval_images > 1000
        assert r.macs_ratio <= r.budget + 0.02
        assert set(r.latency_ms) == {"cpu_b1", "cpu_b64"} and all(v > 0 for v in r.latency_ms.values())
        assert r.seconds_total == pytest.approx(r.seconds_to_prune + r.seconds_to_finetune)
    sizes = [g.channels for g in run.Bench(cfg, torch.device("cpu")).source.net.groups]
    assert results[0].kept == sizes and all(0 < k <= c for k, c in zip(results[1].kept, sizes))
    cached = json.loads((tmp_path / "digits" / "tpc5" / "stamp_b0.5_s0.json").read_text())
    assert cached["top1"] == results[2].top1 and cached["key"]["generator"]

    calls = []
    monkeypatch.setattr(run, "run_cell", lambda b, cell: calls.append(cell) or replace(results[0], key=b.key(cell)))
    assert run.run_bench(cfg, "cpu").cells == results and calls == []  # cached cells are not re-run
    # another generator changes only the stamp cells' keys; another epoch count every cell's key
    with monkeypatch.context() as m:
        m.setattr(run.Bench, "__init__", _with_generator_id(run.Bench.__init__, "another"))
        run.run_bench(cfg, "cpu")
    assert [c.method for c in calls] == ["stamp"]
    run.run_bench(_digits_cfg(tiny_run, tiny_generator, tmp_path, "prune.adapt_steps=2"), "cpu")
    assert [c.method for c in calls] == ["stamp", "stamp"]  # adaptation steps: a STAMP setting only
    run.run_bench(_digits_cfg(tiny_run, tiny_generator, tmp_path, "prune.allocation=uniform"), "cpu")
    assert [c.method for c in calls] == ["stamp"] * 3  # so is the allocation rule
    run.run_bench(_digits_cfg(tiny_run, tiny_generator, tmp_path, "finetune.epochs=2"), "cpu")
    assert len(calls) == 6


def _with_generator_id(init, gen_id):
    def patched(self, *a, **k):
        init(self, *a, **k)
        self.source.generator_id = gen_id
    return patched


def test_plan_cells_per_regime_epochs_and_seeds(tiny_run):
    cfg = tiny_config(tiny_run, "bench.methods=[dense,random,l1]", "bench.budgets=[0.5,0.25]", "bench.seeds=[0,1,2]",
                      "bench.train_per_class=[10,0]", "bench.epochs=[7,2]", "bench.seed_counts=[3,1]",
                      f"bench.targets=[{tiny_run}/data/targets/digits]")
    cells = plan.plan_cells(cfg)
    per_block = 1 + 2 * 2  # dense once, two methods at two budgets
    assert len(cells) == per_block * (3 + 1)
    assert {(c.train_per_class, c.epochs, c.seed) for c in cells} == {(10, 7, 0), (10, 7, 1), (10, 7, 2), (0, 2, 0)}
    assert [c.budget for c in cells if c.method == "dense"] == [1.0] * 4
    assert cells[0].path("out").as_posix() == "out/digits/tpc10/dense_b1_s0.json"
    assert "full data" in cells[-1].label()


@pytest.mark.parametrize("overrides,match", [
    (["bench.methods=[stamp,magic]"], "bench.methods.*magic"),
    (["bench.train_per_class=[10,50]", "bench.epochs=[3]"], "bench.epochs.*one value per regime"),
    (["bench.seed_counts=[5]"], "seed_counts.*seeds"),
    (["bench.train_per_class=-1"], "train_per_class"),
])
def test_bad_bench_config_is_named(tiny_run, overrides, match):
    with pytest.raises(StampError, match=match):
        tiny_config(tiny_run, *overrides)


def test_sample_pruning_batch_and_scoring_sets(tiny_run):
    data = samples.TargetData.load(tiny_run / "data" / "targets" / "digits")
    sample, (ex, ey) = samples.split_sample(data, 5, seed=1)
    assert sample.y.tolist() == sorted(sample.y.tolist()) and len(sample.y) == 50
    picked = {x.numpy().tobytes() for x in sample.x}
    assert len(picked) == 50 and not picked & {x.numpy().tobytes() for x in ex}
    assert len(ey) == 1797 - 50
    full, (_, fy) = samples.split_sample(data, 0, seed=1, eval_per_class=7)
    assert len(full.y) == len(data.train[1]) and torch.bincount(fy).tolist() == [7] * 10  # test split, capped
    batch = samples.pruning_batch(sample, 3, seed=1, device=torch.device("cpu"))
    assert torch.bincount(batch.y).tolist() == [3] * 10 and batch.y.tolist() == sorted(batch.y.tolist())


def test_stamp_cells_adapt_the_generator_when_configured(tiny_run, tiny_generator, tmp_path, monkeypatch):
    seen = []
    real = methods.adapt_generator
    monkeypatch.setattr(methods, "adapt_generator", lambda gen, target, b, steps, lr, seed:
                        seen.append((b, steps, lr, seed)) or real(gen, target, b, steps, lr, seed))
    cfg = _digits_cfg(tiny_run, tiny_generator, tmp_path, "prune.adapt_steps=2", "prune.adapt_lr=0.001",
                      "bench.methods=[stamp]")
    (cell,) = run.run_bench(cfg, "cpu").cells
    assert seen == [(0.5, 2, 0.001, 0)] and cell.key["adapt"] == {"steps": 2, "lr": 0.001}
