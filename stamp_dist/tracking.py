"""Experiment tracking with wandb: run config, metrics, keep-ratio plots, generator artifacts.

``tracking.wandb_mode`` decides: ``offline`` (default; the run is written under ``tracking.dir`` and
can be uploaded later with `wandb sync`), ``online`` (needs a wandb login or ``WANDB_API_KEY``) or
``disabled`` (wandb is then not imported). The mode is passed to ``wandb.init`` explicitly, so a ``WANDB_MODE`` left in the
environment does not override the config. A run directory keeps one wandb run id (``wandb_id``
in the run directory), so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: workers and cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_file  # noqa: E402
from .config import StampConfig, to_dict  # noqa: E402


def run_id(run_dir: str | Path) -> str:
    """The wandb run id of a run directory, created on first use."""
    path = Path(run_dir) / "wandb_id"
    if not path.is_file():
        with atomic_file(path) as tmp:
            tmp.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class Tracker:
    """One wandb run (rank 0 only); PNG plots are also kept in ``<run_dir>/plots``."""

    def __init__(self, cfg: StampConfig, run_dir: str | Path):
        t = cfg.tracking
        self.run_dir = Path(run_dir)
        self.log_artifacts = t.log_artifacts and t.wandb_mode != "disabled"
        self.run = None  # ``disabled``: wandb is not even imported (plots are still written)
        if t.wandb_mode != "disabled":
            import wandb

            Path(t.dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(mode=t.wandb_mode, project=t.project, dir=t.dir,
                                  name=t.name or self.run_dir.name, id=run_id(self.run_dir), resume="allow",
                                  config=to_dict(cfg))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def keep_ratio_plot(self, names: list[str], ratios: list[float], budget: float, step: int) -> Path:
        """Bar chart of the fraction of channels kept per group; saved as PNG and logged as an image."""
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names)), 3.5))
        ax.bar(range(len(names)), ratios, color="tab:blue")
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"mean MACs budget {budget:.2f}")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of channels kept")
        ax.set_title(f"hard-mask keep ratio per channel group, step {step}")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        path = self.run_dir / "plots" / f"keep_ratio_{step:06d}.png"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        if self.run is not None:
            import wandb

            self.run.log({"keep_ratio": wandb.Image(str(path))}, step=step)
        return path

    def log_generator(self, path: str | Path, step: int, metrics: dict) -> None:
        """Log a published generator version as a wandb model artifact."""
        if not self.log_artifacts:
            return
        import wandb

        art = wandb.Artifact(f"generator-{self.run.id}", type="model", metadata={"step": step, **metrics})
        art.add_dir(str(path))
        self.run.log_artifact(art, aliases=["latest", f"step-{step}"])

    def finish(self, summary: dict | None = None) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update(summary)
        self.run.finish()
