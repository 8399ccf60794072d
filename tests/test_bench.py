import json

import pytest

from conftest import tiny_config
from stamp_dist import bench
from stamp_dist.meta.artifact import load_generator


def test_cells_run_once_and_summarize(tiny_run, tiny_generator, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_run, f"meta.out={tiny_generator}", f"bench.out={tmp_path}",
                      f"bench.targets=[{tiny_run}/data/targets/digits]")
    gen = load_generator(tiny_generator)
    results = bench.run_bench(cfg, gen, "cpu")
    assert [(r["method"], r["budget"]) for r in results] == [("dense", 1.0), ("random", 0.5), ("stamp", 0.5)]
    for r in results:
        assert 0 <= r["top1"] <= 1 and r["train_images"] == 50 and r["eval_images"] > 1000
        assert r["macs_ratio"] <= r["budget"] + 0.02
    assert json.loads((tmp_path / "digits" / "stamp_b0.5_s0.json").read_text())["top1"] == results[2]["top1"]

    calls = []
    monkeypatch.setattr(bench, "run_cell", lambda *a: calls.append(a))
    assert bench.run_bench(cfg, gen, "cpu") == results and calls == []  # cached cells are not re-run

    table = bench.summarize(results)
    assert table.count("\n") == 4 and "| digits | stamp | 0.5 |" in table


def test_sample_and_scoring_sets_are_disjoint(tiny_run):
    sample, (ex, ey) = bench.split_sample(tiny_run / "data" / "targets" / "digits", 5, seed=1)
    assert sample.y.tolist() == sorted(sample.y.tolist()) and len(sample.y) == 50
    picked = {x.numpy().tobytes() for x in sample.x}
    assert len(picked) == 50 and not picked & {x.numpy().tobytes() for x in ex}
    assert len(ey) == 1797 - 50


def test_bad_method_in_config_is_named(tiny_run):
    from stamp_dist.errors import StampError

    with pytest.raises(StampError, match="bench.methods.*magic"):
        tiny_config(tiny_run, "bench.methods=[stamp,magic]")
