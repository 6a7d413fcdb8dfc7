"""The CUDA tests run on a GPU (the GPU check: nccl, cuDNN, CUDA autocast); without one they skip, unless
GPU_CHECK_DRY=1 runs the same code on the CPU (gloo), which checks the tests themselves."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("GPU_CHECK_DRY") == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA (GPU_CHECK_DRY=1 runs the CUDA tests on the CPU)")
