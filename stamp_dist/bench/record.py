"""The typed record of one finished bench cell: what ``run_cell`` measured, what the report reads. On disk it
is one JSON object per cell with these fields, in this order (``plan.store``); cells written before this
record existed have the same fields and load as they are."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CellRecord:
    target: str  # the target directory's name
    train_per_class: int  # the data regime (0 = whole train split)
    epochs: int  # fine-tune epochs
    method: str
    budget: float  # MACs ratio asked for; 1.0 for dense
    seed: int
    top1: float  # on the scoring set, after fine-tuning
    top1_before_finetune: float  # with the prototype head only
    params: int
    macs: int
    macs_ratio: float  # of the dense backbone's (likewise params_ratio)
    params_ratio: float
    kept: list[int]  # channels left per channel group
    latency_ms: dict[str, float]  # cpu_b1, cpu_b64 (and cuda_b1, cuda_b64 with a GPU)
    seconds: dict[str, float]  # per stage: masks, surgery, finetune (train_prune: dense_finetune)
    seconds_to_prune: float  # every stage but the final fine-tune
    seconds_to_finetune: float
    seconds_total: float
    train_images: int
    eval_images: int
    key: dict  # ``plan.cell_key``: what the result depends on

    @classmethod
    def from_json(cls, data: dict) -> "CellRecord":
        return cls(**data)

    def to_json(self) -> dict:
        return asdict(self)
