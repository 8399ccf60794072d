"""Shared test settings: deterministic, quiet, few threads (the CI machine has 2 cores)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
