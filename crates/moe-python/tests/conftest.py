"""Devices the tests run on: the CPU always; CUDA when PyTorch sees a GPU, and then the
CUDA cases fail instead of skipping when MOE_REQUIRE_GPU=1 (the project's rule)."""

import os

import pytest
import torch

REQUIRE_GPU = os.environ.get("MOE_REQUIRE_GPU") == "1"


def cuda_or_skip():
    if torch.cuda.is_available():
        return
    if REQUIRE_GPU:
        pytest.fail("MOE_REQUIRE_GPU=1 but PyTorch sees no CUDA device")
    pytest.skip("no CUDA device")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        cuda_or_skip()
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@pytest.fixture
def cuda():
    cuda_or_skip()
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def unchecked():
    """Every test starts and ends outside checked mode."""
    import moe_permute

    moe_permute.set_checked(False)
    yield
    moe_permute.set_checked(False)
