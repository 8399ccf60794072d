"""Tracking: ``tracking.wandb_mode=disabled`` runs without wandb (a cluster image may not have it); plots are
still written."""

import subprocess
import sys
from pathlib import Path

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

SCRIPT = """
import sys
from pathlib import Path
from stamp_dist.config import load_config
from stamp_dist.tracking import Tracker

run = Path(sys.argv[1])
cfg = load_config(sys.argv[2], ["tracking.wandb_mode=disabled", f"tracking.dir={run}/wandb"])
tracker = Tracker(cfg, run)
tracker.log({"loss": 1.0}, step=1)
png = tracker.keep_ratio_plot(["a", "b"], [0.5, 0.25], 0.25, step=1)
tracker.log_generator(run, 1, {})
tracker.finish({"best": 1.0})
print(png.stat().st_size > 0, "wandb" in sys.modules)
"""


def test_disabled_tracking_needs_no_wandb(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(DEMO_YAML)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]  # the plot was written; wandb was never imported
    assert not (tmp_path / "wandb").exists()
