"""The demo's three-line verdict, on hand-made bench cells."""

from stamp_dist.bench.stats import aggregate
from stamp_dist.verdict import duels, verdict
from test_report import _cell


def _setting(target, budget, accs, regime=10):
    """Cells of one setting: ``accs`` maps method → top-1 per seed."""
    seeds = range(len(next(iter(accs.values()))))
    cells = [_cell("dense", 1.0, s, 0.9, target=target, regime=regime) for s in seeds]
    for method, per_seed in accs.items():
        cells += [_cell(method, budget, s, a, target=target, regime=regime) for s, a in enumerate(per_seed)]
    return cells


def test_stamp_wins_loses_and_is_not_judged_with_one_seed():
    far = {"random": [0.50, 0.51, 0.49], "l1": [0.40, 0.41, 0.39], "stamp": [0.80, 0.81, 0.79]}
    near = {"random": [0.60, 0.70, 0.65], "l1": [0.65, 0.75, 0.85], "stamp": [0.55, 0.75, 0.62]}
    one = {"random": [0.5], "stamp": [0.6]}
    cells = _setting("far", 0.5, far) + _setting("near", 0.5, near) + _setting("one", 0.25, one)
    lines = verdict(aggregate(cells))
    assert lines == [
        "stamp is best in 2 of 3 settings: far (10/class, budget 0.5): stamp 80.0 % vs random 50.0 %, 30.0 points, "
        "beyond noise; one (10/class, budget 0.25): stamp 60.0 % vs random 50.0 %, 10.0 points, not judged (1 seed).",
        "stamp is behind in 1: near (10/class, budget 0.5): l1 75.0 % vs stamp 64.0 %, 11.0 points, within noise.",
        "Beyond noise in 1 of 2 judged settings (the means differ by more than 2 standard errors over the seeds: "
        "stamp_dist/bench/stats.py); 1 with one seed not judged. Unpruned reference: far 90.0 %, near 90.0 %, one 90.0 %.",
    ]


def test_stamp_is_compared_with_the_best_even_when_it_ranks_lower():
    [d] = duels(aggregate(_setting("t", 0.5, {"stamp": [0.3, 0.3], "l1": [0.6, 0.6], "random": [0.5, 0.5]})))
    assert (d.winner, d.loser) == ("l1", "stamp") and round(d.margin, 6) == 30.0


def test_without_stamp_the_best_meets_the_runner_up_over_every_regime():
    cells = (_setting("t", 0.5, {"random": [0.5, 0.6], "l1": [0.8, 0.81]})
             + _setting("t", 0.5, {"random": [0.7, 0.71], "l1": [0.6, 0.61]}, regime=0))
    lines = verdict(aggregate(cells))
    assert lines[0] == "Best pruning method per setting (stamp did not run): l1, random."
    assert lines[1].startswith("Best vs runner-up: t (10/class, budget 0.5): l1 80.5 % vs random 55.0 %, 25.5 points")
    assert "t (full data, budget 0.5): random 70.5 % vs l1 60.5 %, 10.0 points, beyond noise" in lines[1]
    assert lines[2].endswith("Unpruned reference: t (10/class) 90.0 %, t (full data) 90.0 %.")


def test_long_listings_are_cut_and_a_lone_method_has_no_verdict():
    cells = []
    for i in range(6):
        cells += _setting(f"t{i}", 0.5, {"random": [0.5, 0.5], "stamp": [0.6 + i / 100, 0.6 + i / 100]})
    first = verdict(aggregate(cells))[0]
    assert first.startswith("stamp is best in 6 of 6 settings: t5 ") and first.endswith("; and 2 more.")
    assert first.count("points") == 4
    assert verdict(aggregate(_setting("t", 0.5, {"stamp": [0.5, 0.6]}))) == [
        "No setting has two pruning methods to compare: no verdict."]
