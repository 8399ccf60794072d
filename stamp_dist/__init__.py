"""stamp_dist: Set-based Task-Adaptive Meta-Pruning at cluster scale.

Python API: ``stamp_dist.prune(generator, data, budget, out)`` makes a pruned model for a target
dataset with STAMP; ``stamp_dist.prune_with(method, data, budget, out, cfg, backbone=...)`` with any
method of the registry ``stamp_dist.METHODS`` (the same artifact); ``stamp_dist.load_pruned(dir)``
rebuilds one from safetensors + JSON; ``stamp_dist.export_model(dir, "onnx" | "torch.export")`` writes
it as a deployable file.
"""

__version__ = "0.1.0"
__all__ = ["prune", "prune_with", "METHODS", "load_pruned", "export_model"]


def __getattr__(name: str):
    # Lazy, so `stamp --help` and config loading do not pay for importing torch.
    if name in ("prune", "prune_with", "METHODS"):
        from . import methods

        return getattr(methods, name)
    if name == "load_pruned":
        from .pruning.spec import load_pruned

        return load_pruned
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(f"module 'stamp_dist' has no attribute {name!r}")
