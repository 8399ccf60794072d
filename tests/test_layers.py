"""The layers of docs/ARCHITECTURE.md: no module imports from a layer above its own, function-local imports
included, and pruning/ imports neither meta/ nor the config."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stamp_dist"
LAYERS = [  # lowest first; a module not named here is base
    {"data", "models"},
    {"pruning"},
    {"meta"},
    {"distributed", "pretrain", "training", "finetune", "downstream", "methods", "metatrain", "export"},
    {"bench", "verdict", "demo"},
    {"cli", "__init__"},
]


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next((i + 1 for i, names in enumerate(LAYERS) if top in names), 0)


def imports(path: Path):
    """(importing module, imported module, line) for every stamp_dist import in ``path``, at any depth."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    module = ".".join(parts)
    package = parts[:-1]  # an __init__.py's package is its own folder: the same parts without "__init__"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            yield module, ".".join(base + ([node.module] if node.module else [])), node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stamp_dist"):
            yield module, node.module, node.lineno
        elif isinstance(node, ast.Import):
            yield from ((module, a.name, node.lineno) for a in node.names if a.name.startswith("stamp_dist"))


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} -> {t} (line {n})" for path in PACKAGE.rglob("*.py") for m, t, n in imports(path)
              if layer(t) > layer(m)]
    assert not upward


def test_pruning_imports_neither_meta_nor_the_config():
    found = [f"{m} -> {t} (line {n})" for path in (PACKAGE / "pruning").rglob("*.py") for m, t, n in imports(path)
             if t.startswith(("stamp_dist.meta", "stamp_dist.config"))]
    assert not found
