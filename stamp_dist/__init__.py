"""stamp_dist: Set-based Task-Adaptive Meta-Pruning at cluster scale.

Python API: ``stamp_dist.prune(generator, data, budget, out)`` makes a pruned model for a target
dataset; ``stamp_dist.load_pruned(dir)`` rebuilds one from safetensors + JSON;
``stamp_dist.export_model(dir, "onnx" | "torch.export")`` writes it as a deployable file.
"""

__version__ = "0.1.0"
__all__ = ["prune", "load_pruned", "export_model"]


def __getattr__(name: str):
    # Lazy, so `stamp --help` and config loading do not pay for importing torch.
    if name == "prune":
        from .downstream import prune

        return prune
    if name == "load_pruned":
        from .pruning.spec import load_pruned

        return load_pruned
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(f"module 'stamp_dist' has no attribute {name!r}")
