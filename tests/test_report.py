import json

import pytest

from stamp_dist.bench import BenchRun, plots, stats, tables, write_report
from stamp_dist.bench.record import CellRecord

GROUPS = [{"name": "conv1", "channels": 4}, {"name": "layer1.0.conv1", "channels": 8}]


def _cell(method, budget, seed, top1, target="t", regime=10, total=10.0):
    return CellRecord(target=target, train_per_class=regime, epochs=3, method=method, budget=budget, seed=seed,
                      top1=top1, top1_before_finetune=top1 / 2, params=1000, macs=10, macs_ratio=budget,
                      params_ratio=budget, kept=[2, 4] if method != "dense" else [4, 8],
                      latency_ms={"cpu_b1": 1.0, "cpu_b64": 8.0}, seconds={}, seconds_to_prune=total / 2,
                      seconds_to_finetune=total / 2, seconds_total=total, train_images=20, eval_images=50, key={})


def _bench_run(cells):
    return BenchRun(cells, GROUPS, {"platform": "p", "cpu_count": 2, "torch": "x", "torch_threads": 1, "device": "cpu"},
                    None, {"bench": {"eval_per_class": 0}, "prune": {"samples_per_class": 10},
                           "pretrain": {"out": "pre"}, "meta": {"out": "m"},
                           "finetune": {"batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                                        "augment": True, "flip": False}})


def _cells(stamp_acc, other_acc):
    cells = []
    for seed, (a, b) in enumerate(zip(stamp_acc, other_acc)):
        cells += [_cell("dense", 1.0, seed, 0.9), _cell("random", 0.5, seed, b, total=20.0),
                  _cell("stamp", 0.5, seed, a, total=5.0), _cell("train_prune", 0.5, seed, b, total=40.0)]
    return cells


def test_rows_are_mean_and_sample_std_over_seeds_in_table_order():
    rows = stats.aggregate(_cells([0.8, 0.6, 0.7], [0.5, 0.5, 0.5]))
    assert [(r["method"], r["budget"]) for r in rows] == [("dense", 1.0), ("random", 0.5), ("stamp", 0.5),
                                                          ("train_prune", 0.5)]
    stamp = rows[2]
    assert stamp["top1_mean"] == pytest.approx(0.7) and stamp["top1_std"] == pytest.approx(0.1)  # ddof = 1
    assert stamp["seeds"] == [0, 1, 2] and stamp["kept"] == [2, 4]
    one_seed = stats.aggregate(_cells([0.8], [0.5]))
    assert one_seed[2]["top1_std"] is None and stats.beyond_noise(one_seed[2], one_seed[1]) is None


def test_stamp_vs_best_noise_and_discrimination():
    clear = stats.aggregate(_cells([0.80, 0.81, 0.79], [0.50, 0.51, 0.49]))
    [s] = stats.stamp_vs_best(clear)
    assert s["best_baseline"] in ("random", "train_prune") and s["delta"] == pytest.approx(0.3)
    assert s["beyond_noise"] is True and s["stamp_rank"] == 1
    assert stats.discrimination(clear)["t"]["discriminates"] is True

    noisy = stats.aggregate(_cells([0.6, 0.4, 0.5], [0.55, 0.45, 0.5]))
    d = stats.discrimination(noisy)["t"]
    assert d["discriminates"] is False
    assert sorted(d["detail"][0]["within_noise_of_best"]) == ["random", "stamp", "train_prune"]


def test_paired_delta_cancels_the_seed_to_seed_spread():
    # Seeds move both methods together by 0.2: unpaired the 0.02 gap is noise, paired it is not.
    cells = _cells([0.62, 0.82, 0.72], [0.60, 0.80, 0.70]) + [_cell("l1", 0.5, s, a) for s, a in
                                                              enumerate([0.70, 0.85, 0.75])]
    rows = stats.aggregate(cells)
    assert stats.beyond_noise(rows[2], rows[1]) is False
    [s] = stats.stamp_paired(cells, rows)
    assert s["vs_random"]["delta"] == pytest.approx(0.02) and s["vs_random"]["se"] == pytest.approx(0.0, abs=1e-9)
    assert s["vs_random"]["beyond_noise"] is True and s["vs_random"]["seeds"] == [0, 1, 2]
    best = s["vs_best_one_shot"]  # train_prune is not one-shot; l1 is the only one here
    assert best["other"] == "l1" and best["delta"] == pytest.approx(-0.14 / 3) and best["beyond_noise"] is True
    one = stats.stamp_paired(cells[:4], stats.aggregate(cells[:4]))[0]
    assert one["vs_random"]["se"] is None and one["vs_random"]["beyond_noise"] is None
    assert one["vs_best_one_shot"] is None


def test_room_is_dense_minus_random_paired_by_seed(tmp_path):
    cells = _cells([0.62, 0.82, 0.72], [0.60, 0.80, 0.70])  # dense at 0.9 every seed
    [s] = stats.stamp_paired(cells, stats.aggregate(cells))
    assert s["room"]["delta"] == pytest.approx(0.2) and s["room"]["beyond_noise"] is True
    level = _cells([0.9, 0.9, 0.9], [0.89, 0.91, 0.9])  # random channels as good as the dense network
    [s] = stats.stamp_paired(level, stats.aggregate(level))
    assert s["room"]["delta"] == pytest.approx(0.0, abs=1e-9) and s["room"]["beyond_noise"] is False
    write_report(_bench_run(level), tmp_path, "stamp bench -c x.yaml")
    assert "In 1 of them even the dense network is not ahead of random channels beyond noise" in \
        (tmp_path / "report.md").read_text()


def test_time_ratios_pair_cells_of_the_same_setting():
    ratios = stats.time_ratios(_cells([0.8, 0.7], [0.5, 0.5]))
    assert ratios["train_prune"]["overall"] == pytest.approx(5 / 40)
    assert ratios["train_prune"]["per_regime"] == {"10/class": pytest.approx(5 / 40)}
    assert "learn_gates" not in ratios


def test_write_report_files(tmp_path):
    cells = _cells([0.8, 0.7], [0.5, 0.6]) + [_cell("random", 0.5, 0, 0.4, target="u", regime=0)]
    out = write_report(_bench_run(cells), tmp_path, "stamp bench -c x.yaml")
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == json.loads(json.dumps(out["rows"]))
    md = (tmp_path / "report.md").read_text()
    assert "## t" in md and "## u" in md and "### full data" in md and "does not record its wall time" in md
    assert "Total time of STAMP / train_prune: **0.12**" in md
    assert set(out["plots"]["keep_ratio"]) == {"plots/keep_ratio_t.png"}  # no STAMP cells on target u
    assert all((tmp_path / p).is_file() for names in out["plots"].values() for p in names)
    assert "| t | stamp | 10/class | 0.5 | 75.0 ± 7.1 | 2 |" in tables.summarize(cells)


def test_overview_has_a_column_per_method_and_marks_the_best():
    table = tables.overview_table(stats.aggregate(_cells([0.8, 0.7], [0.5, 0.6])))
    header, _, line = table.splitlines()
    assert header == "| target | regime | budget | dense | random | stamp | train_prune |"
    assert line == "| t | 10/class | 0.5 | 90.0 ± 0.0 | 55.0 ± 7.1 | **75.0 ± 7.1** | 55.0 ± 7.1 |"
    before = tables.overview_table(stats.aggregate(_cells([0.8, 0.7], [0.5, 0.6])), before_finetune=True)
    assert before.splitlines()[2] == "| t | 10/class | 0.5 | 45.0 | 27.5 | **37.5** | 27.5 |"


def test_demo_plots_cover_every_target_regime_and_method_with_labels(tmp_path, monkeypatch):
    """One top-1 figure and one keep-ratio figure for all targets: a panel per (target, regime) and per
    (target, budget), labelled axes, and a legend naming every method (STAMP vs all others)."""
    cells = []
    for target in ("a", "b", "c"):
        for seed in range(2):
            cells.append(_cell("dense", 1.0, seed, 0.9, target=target))
            for method in ("random", "l1", "stamp"):
                for budget in (0.5, 0.25):
                    cells.append(_cell(method, budget, seed, 0.5 + 0.1 * seed, target=target))
    rows = stats.aggregate(cells)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_top1(rows, [(t, 10) for t in ("a", "b", "c")], tmp_path / "top1.png")
    assert plots.plot_keep_ratios(rows, GROUPS, tmp_path / "keep.png")
    top1, keep = figures
    panels = [ax for ax in top1.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{t}, 10/class, 2 seeds" for t in ("a", "b", "c")]
    assert all(ax.get_xlabel().startswith("MACs ratio") and ax.get_ylabel().startswith("top-1") for ax in panels)
    [legend] = top1.legends
    assert [t.get_text() for t in legend.get_texts()] == ["dense (unpruned)", "random", "l1", "stamp"]
    assert [ax.get_title().split(" of")[0] for ax in keep.axes] == [f"{t}, budget {b}" for t in ("a", "b", "c")
                                                                    for b in (0.5, 0.25)]
    for ax in keep.axes:
        assert ax.get_xlabel() == "channel group" and ax.get_ylabel() == "kept / channels"
        assert [t.get_text().split(" ")[0] for t in ax.get_legend().get_texts()] == ["stamp", "random", "l1"]
    assert not plots.plot_keep_ratios([r for r in rows if r["method"] != "stamp"], GROUPS, tmp_path / "none.png")
