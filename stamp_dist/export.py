"""`stamp export`: a pruned (or fine-tuned) model as a deployable file, checked against PyTorch.

* ``onnx``: ``model.onnx`` through torch's ONNX exporter (``torch.onnx.export(dynamo=True)``), then run
  with onnxruntime on a fixed random batch; its logits must equal PyTorch's within ``TOLERANCE``.
* ``torch.export``: ``model.pt2``, a ``torch.export`` program (``torch.export.save``), loaded back and
  run on the same batch, with the same check.

Both take any batch size (a dynamic batch dimension). The file is written under a temporary name and
renamed only after the check passed: a failed export leaves nothing. ONNX needs the optional extra
``pip install 'stamp_dist[export]'`` (onnx, onnxruntime, onnxscript); torch.export needs nothing more.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_file
from .errors import StampError
from .pruning.spec import load_pruned

TOLERANCE = 1e-4  # max |exported - PyTorch| on the check batch
CHECK_BATCH = 4
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    TORCH_EXPORT = "torch.export"

    @property
    def suffix(self) -> str:
        return {ExportFormat.ONNX: ".onnx", ExportFormat.TORCH_EXPORT: ".pt2"}[self]


@dataclass
class ExportReport:
    path: str
    format: str
    max_abs_diff: float  # exported vs PyTorch logits on the check batch
    input_shape: list[int]  # one image; the batch dimension is dynamic
    bytes: int


def export_model(model_dir: str | os.PathLike, fmt: ExportFormat | str, out: str | os.PathLike | None = None) -> ExportReport:
    """Export the pruned model in ``model_dir`` (``stamp prune`` / ``stamp finetune`` output) to ``out``
    (default ``model_dir/model.onnx`` or ``model.pt2``); raises ``StampError`` if it exists, if the
    directory is not a pruned model, or if the exported model's outputs differ from PyTorch's."""
    try:
        fmt = ExportFormat(fmt)
    except ValueError:
        raise StampError(f"unknown export format {fmt!r}; choose one of "
                         f"{', '.join(f.value for f in ExportFormat)}") from None
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / f"model{fmt.suffix}"
    if out.exists():
        raise StampError(f"{out} already exists; remove it or choose another --out")
    if not model_dir.is_dir():
        raise StampError(f"{model_dir} is not a directory; --model takes a pruned model directory "
                         "(written by `stamp prune` or `stamp finetune`)")
    model, spec = load_pruned(model_dir)
    model.eval()
    example = torch.zeros(2, *spec.input_size)  # batch 2: a batch of 1 would be specialised as a constant
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x = torch.randn(CHECK_BATCH, *spec.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).numpy()
    with atomic_file(out) as tmp:
        run = _onnx if fmt is ExportFormat.ONNX else _torch_export
        got = run(model, example, batch, x, tmp)
        diff = float(np.abs(got - reference).max())
        if not diff <= TOLERANCE:
            raise StampError(f"the {fmt.value} export of {model_dir} differs from PyTorch by {diff:.3g} "
                             f"(> {TOLERANCE:g}) on a check batch; nothing was written")
    return ExportReport(str(out), fmt.value, diff, list(spec.input_size), out.stat().st_size)


def _onnx(model: nn.Module, example: torch.Tensor, batch, x: torch.Tensor, path: Path) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise StampError("ONNX export needs onnx, onnxscript and onnxruntime: "
                         "pip install 'stamp_dist[export]' (torch.export needs nothing more)") from None
    # The exporter narrates each pass on stdout and warns about torchvision ops this model does not use.
    with contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx"):
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},))
        program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _torch_export(model: nn.Module, example: torch.Tensor, batch, x: torch.Tensor, path: Path) -> np.ndarray:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # through a buffer: torch.export wants a .pt2 name, the temporary file has none
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())
    with torch.no_grad():
        return torch.export.load(io.BytesIO(path.read_bytes())).module()(x).numpy()
