"""moe-permute for PyTorch: the token shuffles of Mixture-of-Experts layers.

``moe_permute``, ``moe_unpermute``, ``moe_align_block_size`` and ``MoEPermuteScratch``
take the names, arguments and results of vLLM's (``vllm.model_executor.layers.fused_moe``
after PR #43014), so a stack swaps an import. Underneath are the ops
``torch.ops.moe_permute.*`` (eager, CUDA-graph capture, ``torch.compile``), which run the
moe-permute library's kernels on the current stream of the tensors' device, or its CPU
path for CPU tensors. The wheel carries the kernels as PTX and loads the NVIDIA driver at
run time: no CUDA toolkit, no link to libtorch.
"""

from . import _ops as ops
from ._api import (
    check_errors,
    moe_align_block_size,
    moe_permute,
    moe_permute_unpermute_supported,
    moe_unpermute,
)
from ._native import MoeDeviceError, MoeInputError, cuda_available
from ._scratch import MoEPermuteScratch
from ._state import is_checked, set_checked

__all__ = [
    "MoEPermuteScratch",
    "MoeDeviceError",
    "MoeInputError",
    "check_errors",
    "cuda_available",
    "is_checked",
    "moe_align_block_size",
    "moe_permute",
    "moe_permute_unpermute_supported",
    "moe_unpermute",
    "ops",
    "set_checked",
]
