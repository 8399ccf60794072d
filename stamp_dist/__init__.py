"""stamp_dist: Set-based Task-Adaptive Meta-Pruning at cluster scale."""

__version__ = "0.1.0"
