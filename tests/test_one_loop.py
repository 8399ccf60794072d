"""One meta-training loop from a laptop to a cluster: the same config and seed train the same generator
on the local backend and on Ray (Ray Train + DeepSpeed workers + sampler actors), end to end through
`meta_train`: the same tasks, images and masks, the same global meta-batch, the same gradient scale.

- one Ray worker against the local process: the same operations in the same order, so the weights are
  compared EXACTLY (``torch.equal``) — DeepSpeed with one rank divides each loss by the accumulation
  steps as the local engine does, and averaging over one rank changes nothing;
- two Ray workers against the local process, on the same global meta-batch: each worker sums half of
  it and the halves are averaged across ranks, so the floating-point order differs and the weights are
  compared with allclose at 1e-6. AdamW normalises a gradient's scale away, so the test also compares
  every step's pre-clip gradient norm: a loss scaled by 2 in one path fails it.

Uses the test session's one Ray instance (``ray_cluster``).
"""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import tiny_config

# The tests using the session's Ray instance run on one pytest-xdist worker: one Ray per test session.
pytestmark = pytest.mark.xdist_group("ray")

STEPS = 3
# Several workers share a sampler actor: its image draws are keyed by (step, episode), so their order does
# not matter — but a class buffer's refill point is counted in arrival order; a reuse this high means none.
COMMON = [f"meta.steps={STEPS}", f"meta.val_every={STEPS}", "meta.checkpoint_every=2", "runtime.sampler_actors=2",
          "runtime.sampler_cpus=0.5", "runtime.sampler_reuse=1000"]


def generator(run):
    return load_file(str(run / "generators" / f"v{STEPS:06d}" / "generator.safetensors"))


def steps(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_run, tmp_path_factory):
    """The same config on the local backend, and on Ray with one and with two workers. The Ray runs are
    `stamp meta-train` commands joining the session's Ray, as a user runs them (one driver per run: what a
    run holds in the cluster ends with it)."""
    from stamp_dist.metatrain import meta_train

    tmp = tmp_path_factory.mktemp("one_loop")
    meta_train(tiny_config(tiny_run, *COMMON, f"meta.out={tmp / 'local'}"))
    for workers in (1, 2):
        name = f"ray{workers}"
        cfg = tiny_config(tiny_run, *COMMON, "runtime.backend=ray", f"runtime.address={ray_cluster}",
                          f"runtime.num_workers={workers}", f"meta.out={tmp / name}")
        OmegaConf.save(cfg, tmp / f"{name}.yaml")
        with open(tmp / f"{name}.log", "w") as log:
            command = [sys.executable, "-m", "stamp_dist.cli", "meta-train", "-c", str(tmp / f"{name}.yaml")]
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, timeout=2400).returncode
        assert status == 0, (tmp / f"{name}.log").read_text()[-3000:]
    return tmp


@pytest.mark.slow
def test_local_and_one_ray_worker_train_identical_generators(runs):
    local, ray = runs / "local", runs / "ray1"
    a, b = generator(local), generator(ray)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    same = ("step", "loss", "budget", "grad_norm")
    for x, y in zip(steps(local), steps(ray), strict=True):
        assert [x[k] for k in same] == [y[k] for k in same]
    summary = json.loads((ray / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["step"] == STEPS
    assert json.loads((local / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_two_ray_workers_equal_one_local_process_on_the_same_global_meta_batch(runs):
    local, ray = runs / "local", runs / "ray2"
    assert json.loads((ray / "summary.json").read_text())["world_size"] == 2
    a, b = generator(local), generator(ray)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |2 Ray workers - local| after {STEPS} steps: {diff:.3g}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    for x, y in zip(steps(local), steps(ray), strict=True):
        assert x["step"] == y["step"] and x["budget"] == pytest.approx(y["budget"], abs=1e-12)  # the same tasks
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        # AdamW hides the gradient's scale from the weights; the pre-clip norm shows it.
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_both_backends_keep_the_same_run_directory(runs):
    """Checkpoint format, tracking and logs are the loop's, not a backend's."""
    from stamp_dist.checkpoint import load_state

    local, ray = runs / "local", runs / "ray1"
    ray_checkpoint = max(p for p in (ray / "train").glob("checkpoint_*") if p.is_dir())
    a, b = load_state(local / "checkpoint"), load_state(ray_checkpoint)
    assert a.keys() == b.keys() == {"step", "adam_steps", "params", "samplers"}
    assert a["params"].keys() == b["params"].keys() and a["step"] == b["step"] == STEPS
    assert a["samplers"] == b["samplers"]  # the same pools, in the same state
    for run in (local, ray):
        assert (run / "plots" / f"keep_ratio_{STEPS:06d}.png").is_file()
        events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
        assert events == ["start", "finish"]
        assert {"loss", "grad_norm", "seconds", "episodes_per_s", "data_wait_fraction", "val_acc"} <= set(steps(run)[-1])
