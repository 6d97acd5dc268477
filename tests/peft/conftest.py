"""The PEFT tests train tiny models: one BLAS thread avoids thread start-up and contention
costs that dominate such small matmuls (and makes the runs deterministic)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
