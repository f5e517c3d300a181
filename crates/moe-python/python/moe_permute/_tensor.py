"""How tensors and streams cross into the native module: no libtorch, only numbers."""

from __future__ import annotations

from typing import Optional

import torch

from ._native import MoeInputError


def describe(name: str, tensor: torch.Tensor) -> tuple:
    """``(data_ptr, shape, strides, dtype, device index)``: -1 for the CPU."""
    if not isinstance(tensor, torch.Tensor):
        raise MoeInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    device = tensor.device
    if device.type == "cpu":
        index = -1
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        raise MoeInputError(f"{name} is on {device}; moe_permute runs on CPU and CUDA tensors")
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype), index)


def describe_optional(name: str, tensor: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if tensor is None else describe(name, tensor)


def stream_of(tensor: torch.Tensor) -> int:
    """The handle of the current stream of the tensor's device (0 on the CPU)."""
    if tensor.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(tensor.device).cuda_stream


def is_capturing(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
