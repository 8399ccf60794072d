"""A run directory under kills and concurrency: metrics.jsonl holds each step once, one run at a time."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_config
from stamp_dist.errors import StampError
from stamp_dist.meta import local as local_module
from stamp_dist.meta.trainer import MetaTrainer
from stamp_dist.metatrain import meta_train
from stamp_dist.runlog import MetricsLog, run_lock


class Killed(BaseException):
    """Stands for SIGKILL at a chosen instant: nothing after it runs (no handler, no cleanup code of ours)."""


def _steps(run) -> list[int]:
    return [r["step"] for r in MetricsLog(run / "metrics.jsonl").steps()]


def test_metrics_hold_each_step_once_across_kills(tiny_run, tmp_path, monkeypatch):
    """Defect 11 of issue 15: kills right after a checkpoint (the old order logged the step after it: lost),
    in the middle of a step after an uncheckpointed one (logged again on resume: repeated) and during a
    line's write (torn line); each resume continues, and the log ends holding steps 1..6 once each."""
    run = tmp_path / "run"
    cfg = tiny_config(tiny_run, f"meta.out={run}", "meta.steps=6", "meta.checkpoint_every=2")
    real_save, real_step = local_module.save_state, MetaTrainer.meta_step

    def save_then_die(directory, state):
        real_save(directory, state)
        if state["step"] == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(local_module, "save_state", save_then_die)
        with pytest.raises(Killed):
            meta_train(cfg)
    assert _steps(run) == [1, 2]

    def die_in_step_4(self, episodes):
        if self.step == 3:
            raise Killed
        return real_step(self, episodes)

    with monkeypatch.context() as m:
        m.setattr(MetaTrainer, "meta_step", die_in_step_4)
        with pytest.raises(Killed):
            meta_train(cfg)
    assert _steps(run) == [1, 2, 3]  # step 3 is after the checkpoint: the resume redoes it

    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # a kill while the line was being written
    meta_train(cfg)
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())  # all valid JSON


def test_metrics_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(1, {"loss": float("nan"), "acc": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "acc": 0.5}


def test_a_second_run_on_the_same_directory_is_refused(tiny_run, tmp_path):
    """Defect 12 of issue 15: two runs could share one meta.out and interleave their metrics."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from stamp_dist.runlog import run_lock
        with run_lock({str(run)!r}, "meta.out"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StampError, match=rf"in use by another run \(pid {holder.pid} .*meta.out"):
            meta_train(tiny_config(tiny_run, f"meta.out={run}"))
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run, "meta.out"):  # the kernel released the killed holder's lock
        pass
