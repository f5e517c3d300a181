"""How tensors and streams cross into the native module: no libtorch, only numbers.

Eager calls pay for every step here, so it stays short: a dtype code from a table,
the raw stream handle without making a ``torch.cuda.Stream`` object.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._native import MoeInputError

# The dtypes the native module takes, by code (its `Elem::from_code`, same order).
DTYPE_CODES = {
    dtype: code
    for code, dtype in enumerate((
        torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int32, torch.int64, torch.uint8,
    ))
}

try:  # The handle PyTorch's own Triton launcher reads; a public fallback below.
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older or CPU-only builds
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def describe(name: str, tensor: torch.Tensor) -> tuple:
    """``(data_ptr, shape, strides, dtype code, device index)``: -1 for the CPU."""
    if not isinstance(tensor, torch.Tensor):
        raise MoeInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_cuda:
        index = tensor.get_device()
    elif tensor.device.type == "cpu":
        index = -1
    else:
        raise MoeInputError(
            f"{name} is on {tensor.device}; moe_permute runs on CPU and CUDA tensors"
        )
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise MoeInputError(
            f"{name}: dtype {tensor.dtype} is not supported (float32, float16, bfloat16, "
            "float8_e4m3fn, float8_e5m2 rows; int32 or int64 ids)"
        )
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), code, index)


def describe_optional(name: str, tensor: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if tensor is None else describe(name, tensor)


def stream_of(tensor: torch.Tensor) -> int:
    """The handle of the current stream of the tensor's device (0 on the CPU)."""
    if not tensor.is_cuda:
        return 0
    return _raw_stream(tensor.get_device())
