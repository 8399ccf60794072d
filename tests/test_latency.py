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
    record = {"image_size": size, "backbone": "convnet", "mean": [0.5] * 3, "std": [0.25] * 3}
    return PrunableBackbone.build(model, record)


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


def test_bench_cells_of_a_latency_budget_are_apart_and_macs_cells_keep_their_keys(tiny_run):
    from types import SimpleNamespace

    from stamp_dist.bench import plan

    source = SimpleNamespace(fingerprint="f")
    macs_cfg = tiny_config(tiny_run, "bench.methods=[dense,l1]")
    latency_cfg = tiny_config(tiny_run, "bench.methods=[dense,l1]", "prune.budget_kind=latency")
    macs, lat = plan.plan_cells(macs_cfg), plan.plan_cells(latency_cfg)
    assert macs[0] == lat[0] and macs[0].method == "dense"  # the dense reference serves both kinds
    macs_key = plan.cell_key(macs[1], macs_cfg, source)
    assert "budget_kind" not in macs_key and "latency_batch" not in macs_key  # as written before budgets had kinds
    assert macs[1].path("out").name == "l1_b0.5_s0.json"
    lat_key = plan.cell_key(lat[1], latency_cfg, source)
    assert lat_key["budget_kind"] == "latency" and lat_key["latency_batch"] == 64
    assert lat[1].path("out").name == "l1_b0.5_latency_s0.json"


def test_an_episode_trained_for_latency_takes_its_budget_term_from_the_latency_model(tiny_grid):
    from stamp_dist.config import MetaConfig
    from stamp_dist.data.episodes import Task, build_episode
    from stamp_dist.meta.objective import Stamp, StampSettings, episode_loss
    from stamp_dist.models.generator import keep_probability

    net = _net(width=8, size=16)
    cfg = MetaConfig(encoder_dim=16, encoder_heads=2, encoder_inducing=4, generator_hidden=16, inner_steps=1,
                     budget_kind="latency", latency_batch=4)
    stamp = Stamp(net.backbone.feature_dim, net.groups.sizes, StampSettings.of(cfg))
    assert stamp.settings.budget_kind == "latency"
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8, generator=gen) for _ in range(2)]
    episode = build_episode(images, Task([0, 1], 0.4), k_shot=2)
    out = episode_loss(net, stamp, episode, torch.Generator().manual_seed(1))
    out.loss.backward()
    assert net.budget("latency", 4) is net.budget("latency", 4)  # measured once
    with torch.no_grad():
        probs = [keep_probability(a) for a in stamp(stamp.read(net, net.norm(episode.support_x), 2), 0.4)]
    want = cost_ratio(net.budget("latency", 4), probs)
    assert float(out.expected_ratio) == pytest.approx(float(want), rel=1e-6)
    assert float(out.expected_ratio) != pytest.approx(float(cost_ratio(net.cost, probs)), rel=1e-3)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stamp.generator.parameters())


@pytest.mark.slow
def test_a_generator_trained_for_macs_prunes_at_a_latency_budget(tiny_grid, tiny_run, tiny_generator, tmp_path):
    import stamp_dist
    from stamp_dist.meta.artifact import load_generator, resolve

    artifact = tmp_path / "generator"
    shutil.copytree(resolve(tiny_generator), artifact)
    record = json.loads((artifact / "generator.json").read_text())
    del record["stamp"]["budget_kind"]  # an artifact from before budgets had kinds
    (artifact / "generator.json").write_text(json.dumps(record))
    assert load_generator(artifact).stamp.settings.budget_kind == "macs"
    cfg = tiny_config(tiny_run, "prune.latency_batch=64")
    report = stamp_dist.prune_with("stamp", tiny_run / "data/targets/digits", 0.95, tmp_path / "out", cfg,
                                   generator=artifact, device="cpu", budget_kind="latency")
    assert report["budget_kind"] == "latency" and report["latency_ratio_predicted"] <= 0.95 + 0.02
    assert list(artifact.glob("latency-cpu-*-b64.json"))  # measured next to the generator's backbone
    record["stamp"]["budget_kind"] = "flops"
    (artifact / "generator.json").write_text(json.dumps(record))
    with pytest.raises(StampError, match="budget_kind"):
        load_generator(artifact)


@pytest.mark.slow
def test_bench_prunes_every_method_to_the_same_latency_budget(tiny_grid, tiny_run, tiny_generator, tmp_path):
    from stamp_dist.bench import run

    pretrain = tmp_path / "pretrain"
    shutil.copytree(tiny_run / "pretrain", pretrain)  # the same weights: the generator's backbone
    cfg = tiny_config(tiny_run, f"meta.out={tiny_generator}", f"bench.out={tmp_path / 'results'}",
                      f"pretrain.out={pretrain}", f"bench.targets=[{tiny_run}/data/targets/digits]",
                      "bench.methods=[dense,l1,stamp]", "bench.budgets=[0.9]", "prune.budget_kind=latency",
                      "prune.latency_batch=64")
    cells = run.run_bench(cfg, "cpu").cells
    net = PrunableBackbone.load(pretrain, "cpu")
    model = net.budget("latency", 64)  # the table the bench measured, read back
    assert model.path.parent == pretrain
    for cell in cells:
        ratio = float(model(torch.tensor(cell.kept, dtype=torch.float64))) / model.dense
        if cell.method == "dense":
            assert ratio == pytest.approx(1.0) and "budget_kind" not in cell.key
        else:
            assert cell.key["budget_kind"] == "latency" and ratio <= 0.9 + 0.02


def test_round_to_defaults_to_what_suits_the_devices_kernels():
    from stamp_dist.config import PruneConfig
    from stamp_dist.downstream import default_round_to

    assert PruneConfig().round_to is None  # unset: the device decides
    assert default_round_to(torch.device("cuda")) == 8 and default_round_to(torch.device("cpu")) == 1
