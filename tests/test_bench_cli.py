import json

from conftest import DEMO_YAML, TINY
from stamp_dist.cli import main


def test_stamp_bench_writes_report_json_and_plots_then_reuses_cells(tiny_run, tiny_generator, tmp_path, capsys):
    """`stamp bench` at toy size (two methods, one target, one budget, one epoch) through the CLI."""
    out = tmp_path / "bench"
    args = ["bench", "-c", str(DEMO_YAML), *TINY, f"data.root={tiny_run}/data", f"pretrain.out={tiny_run}/pretrain",
            f"meta.out={tiny_generator}", f"bench.out={out}", f"bench.targets=[{tiny_run}/data/targets/digits]",
            "bench.methods=[random,stamp]", "bench.num_threads=1",
            "meta.steps=9"]  # the generator was meta-trained for 4: the report must say what it ran with
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/2] random | digits | b=0.5 | 5/class | seed 0" in printed and "ETA" in printed
    assert (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    for field in ("command", "machine", "meta_training_seconds", "groups", "rows", "cells", "stamp_vs_best",
                  "discrimination", "time_ratios", "plots", "config", "generator"):
        assert field in report, field
    # the generator's own meta-training settings, not the bench config's defaults
    assert report["generator"]["meta"]["steps"] == 4 and report["generator"]["allocation"] == "uniform"
    assert report["generator"]["selection"] == "sample"
    assert "4-step meta-training run" in (out / "report.md").read_text()
    assert report["command"].startswith("stamp bench -c")
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_threads"] == 1
    assert [r["method"] for r in report["rows"]] == ["random", "stamp"]
    for row in report["rows"]:
        for field in ("top1_mean", "top1_std", "macs_ratio", "params", "latency_ms", "seconds_to_prune",
                      "seconds_to_finetune", "seconds_total", "kept"):
            assert field in row, field
    assert report["stamp_vs_best"][0]["best_baseline"] == "random"
    plots = [p for names in report["plots"].values() for p in names]
    assert {"plots/top1_vs_macs_digits.png", "plots/time_to_model.png", "plots/keep_ratio_digits.png"} == set(plots)
    for p in plots:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| random | 0.5 |" in md and "| stamp | 0.5 |" in md and "one-off cost" in md

    assert main(args) == 0  # every cell cached: nothing re-runs
    assert "2 cached, 0 to run (0 of them" in capsys.readouterr().out


def test_stamp_bench_rejects_a_bad_regime_list(tiny_run, capsys):
    args = ["bench", "-c", str(DEMO_YAML), *TINY, "bench.train_per_class=[10,50]", "bench.epochs=[3]"]
    assert main(args) == 2
    assert "bench.epochs" in capsys.readouterr().err
