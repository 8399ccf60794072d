"""Latency budgets (stamp_dist/pruning/latency.py, budget.py): the interpolated table, its gradient, the hard-mask
rules at a latency budget, the cached table's checks, the config key and `stamp prune --budget-kind latency`."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO_YAML, TINY, tiny_config
from stamp_dist.cli import main
from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import latency
from stamp_dist.pruning.budget import cost_ratio, kept_counts
from stamp_dist.pruning.hardmask import budget_mask, uniform_ratio_masks
from stamp_dist.pruning.prunable import PrunableBackbone


@pytest.fixture
def tiny_grid(monkeypatch):
    """A 2×2 grid (half and all of a group's channels), 2 timed repeats, one calibration mask: seconds, not minutes."""
    monkeypatch.setattr(latency, "DIVISIONS", 2)
    monkeypatch.setattr(latency, "REPEATS", 2)
    monkeypatch.setattr(latency, "MIN_TIME_S", 0.0)
    monkeypatch.setattr(latency, "CALIBRATION_MASKS", 1)


def _net(width: int = 4, size: int = 8) -> PrunableBackbone:
    torch.manual_seed(0)
    model = build_backbone("convnet", 5, width=width, image_size=size).eval().requires_grad_(False)
    return PrunableBackbone.build(model, {"image_size": size, "backbone": "convnet"})


def _synthetic(net: PrunableBackbone, directory=None) -> latency.LatencyModel:
    """A measured table whose times are replaced by a known function of the counts (deterministic tests)."""
    model = latency.latency_model(net.backbone, net.groups, net.input_size, 4, directory)
    table = model.table
    for e in table["calls"]:
        e["ms"] = [[0.1 + 0.01 * x * y + 0.02 * x for y in e["ys"]] for x in e["xs"]]
    table["calibration"] = {"scales": [2.0, 3.0], "offset": 0.5}
    return latency.LatencyModel(net.groups, table)


def _on_grid_counts(net, rng):
    return [int(rng.choice(latency.grid_points(c))) for c in net.groups.sizes]


def test_the_model_is_exact_at_the_grid_points(tiny_grid):
    net = _net()
    model = _synthetic(net)
    rng = np.random.default_rng(0)
    for _ in range(5):
        counts = _on_grid_counts(net, rng)
        want = 0.0
        for e in model.table["calls"]:
            scale = 2.0 if e["compute"] else 3.0
            n_in = sum(n if g is None else counts[g] for g, n in e["inputs"])
            n_out = 1 if e["tied"] else sum(n if g is None else counts[g] for g, n in e["outputs"])
            want += scale * e["ms"][e["xs"].index(n_in)][e["ys"].index(n_out)]
        got = float(model(torch.tensor(counts, dtype=torch.float64)))
        assert got == pytest.approx(want + 0.5, rel=1e-12)
    assert model.dense == pytest.approx(float(model(torch.tensor(net.groups.sizes, dtype=torch.float64))))


def test_the_expected_latency_is_differentiable_in_the_keep_probabilities(tiny_grid):
    net = _net()
    model = _synthetic(net)
    probs = [torch.full((c,), 0.6, requires_grad=True) for c in net.groups.sizes]
    ratio = cost_ratio(model, probs)
    ratio.backward()
    assert 0 < float(ratio.detach()) < 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and (p.grad > 0).all() for p in probs)


@pytest.mark.parametrize("rule", [budget_mask, uniform_ratio_masks])
def test_the_hard_mask_rules_meet_a_latency_budget_on_the_grid(rule, tiny_grid):
    net = _net(width=8)
    model = _synthetic(net)
    torch.manual_seed(0)
    masks = rule([torch.rand(c) for c in net.groups.sizes], model, 0.5)
    counts = kept_counts(net.groups, masks)
    ratio = float(model(counts)) / model.dense
    assert 0.4 < ratio <= 0.5
    assert all(int(n) in latency.grid_points(c) for n, c in zip(counts, net.groups.sizes))


def test_a_table_is_measured_once_then_read(tiny_grid, tmp_path):
    net = _net()
    first = latency.latency_model(net.backbone, net.groups, net.input_size, 4, tmp_path)
    path = first.path
    assert path.parent == tmp_path and path.name == f"latency-cpu-t{torch.get_num_threads()}-b4.json"
    stored = json.loads(path.read_text())
    assert stored["environment"]["architecture"] == latency.architecture_fingerprint(net.backbone, net.groups,
                                                                                   net.input_size)
    again = latency.latency_model(net.backbone, net.groups, net.input_size, 4, tmp_path)
    assert again.table == stored and again.dense == first.dense  # read, not re-measured


def _stale(edit):
    def make(path, tmp_path):
        table = json.loads(path.read_text())
        edit(table)
        path.write_text(json.dumps(table))
        return path
    return make


def _other_backbone(path, tmp_path):
    wider = _net(width=6)  # another architecture: the table of width 4 copied next to it
    target = latency.table_path(tmp_path / "wider", latency.environment(wider.backbone, wider.groups,
                                                                        wider.input_size, 4, wider.device))
    target.parent.mkdir()
    shutil.copy(path, target)
    return target


STALE = {
    "other backbone": (_other_backbone, "another backbone architecture"),
    "other device": (_stale(lambda t: t["environment"].update(device="NVIDIA H100")), "another device"),
    "architecture changed": (_stale(lambda t: t["environment"].update(architecture="0123456789abcdef")),
                             "another backbone architecture"),
    "torch upgraded": (_stale(lambda t: t["environment"].update(torch="1.0.0")), "another torch version"),
    "not a table": (_stale(lambda t: t.update(format="something else")), "not a stamp_dist/latency/v1 table"),
}


@pytest.mark.parametrize("case", sorted(STALE))
def test_a_table_for_another_backbone_device_or_torch_is_refused(case, tiny_grid, tmp_path, monkeypatch):
    net = _net()
    path = latency.latency_model(net.backbone, net.groups, net.input_size, 4, tmp_path).path
    make, words = STALE[case]
    bad = make(path, tmp_path)
    before = bad.read_bytes()
    monkeypatch.setattr(latency, "measure_table", lambda *a: pytest.fail("re-measured instead of refusing"))
    owner = _net(width=6) if case == "other backbone" else net
    with pytest.raises(StampError) as e:
        latency.latency_model(owner.backbone, owner.groups, owner.input_size, 4, bad.parent)
    assert words in str(e.value) and str(bad) in str(e.value) and f"delete {bad} to re-measure" in str(e.value)
    assert bad.read_bytes() == before


@pytest.mark.parametrize("key", ["prune.budget_kind", "meta.budget_kind"])
def test_the_config_refuses_an_unknown_budget_kind(key, tiny_run):
    with pytest.raises(StampError, match=f"'{key}' is 'flops'; valid choices: macs, latency"):
        tiny_config(tiny_run, f"{key}=flops")
    assert tiny_config(tiny_run, f"{key}=latency")


@pytest.mark.slow
def test_prune_cli_with_a_latency_budget(tiny_grid, tiny_run, tmp_path, capsys):
    pretrain = tmp_path / "pretrain"
    shutil.copytree(tiny_run / "pretrain", pretrain)  # the table is written next to the backbone
    argv = ["prune", "--method", "l1", "--backbone", str(pretrain), "--data", str(tiny_run / "data/targets/digits"),
            "--budget", "0.95", "--budget-kind", "latency", "-c", str(DEMO_YAML), *TINY, "prune.latency_batch=64"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "spec.json").read_text())["report"]
    assert report["budget_kind"] == "latency" and report["latency_ratio_predicted"] <= 0.95 + 0.02
    tables = list(pretrain.glob("latency-cpu-*-b64.json"))
    assert len(tables) == 1 and "latency budget" in capsys.readouterr().out
    # a stale table: exit 2, one error line naming the file and the fix, nothing written
    table = json.loads(tables[0].read_text())
    table["environment"]["torch"] = "1.0.0"
    tables[0].write_text(json.dumps(table))
    assert main([*argv, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: latency table") and f"delete {tables[0]}" in err
    assert not (tmp_path / "out2").exists()
