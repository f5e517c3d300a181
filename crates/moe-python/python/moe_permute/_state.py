"""Process-wide state: checked mode, the scratches ops find by id, status blocks."""

from __future__ import annotations

import itertools
import threading
from typing import Dict

import torch

from . import _native
from ._native import MoeDeviceError
from ._tensor import DTYPE_CODES

_lock = threading.Lock()
# Read by every call (as an attribute: cheaper than a function call on the hot path).
checked = False
_ids = itertools.count()
# NativeScratch objects by the id the ops receive (torch.library ops take tensors and
# numbers, not Python objects). MoEPermuteScratch removes its entries when collected.
scratches: Dict[int, "_native.NativeScratch"] = {}
# One status block per CUDA device for unpermute (which is given no scratch), and its
# description for the native module (made once: the block never moves).
_status_blocks: Dict[int, torch.Tensor] = {}
_status_args: Dict[int, tuple] = {}
_NO_STATUS = (0, (0,), (1,), DTYPE_CODES[torch.uint8], -1)


def set_checked(on: bool) -> None:
    """Checked mode: after every call outside graph capture, wait for the device and
    raise the error it recorded, if any (bad ``expert_map`` entries, negative
    ``inv_permuted_idx``, a valid count larger than the rows). Off by default: a check
    is a host wait."""
    global checked
    checked = bool(on)


def is_checked() -> bool:
    return checked


def register(native: "_native.NativeScratch") -> int:
    with _lock:
        scratch_id = next(_ids)
        scratches[scratch_id] = native
    return scratch_id


def unregister(scratch_id: int) -> None:
    with _lock:
        scratches.pop(scratch_id, None)


def status_block(device: torch.device) -> torch.Tensor:
    """The device's status block for unpermute, made on first use (not while a graph
    is being captured: the fill that clears it would only run at replay)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    block = _status_blocks.get(index)
    if block is None:
        if torch.cuda.is_current_stream_capturing():
            raise MoeDeviceError(
                f"moe_permute has no status block on cuda:{index} yet and cannot make one "
                "while a CUDA graph is being captured: call moe_unpermute (or build a "
                "MoEPermuteScratch) once on this device before capturing, as a warm-up"
            )
        block = torch.full(
            (_native.STATUS_BYTES,),
            _native.STATUS_CLEAR_BYTE,
            dtype=torch.uint8,
            device=torch.device("cuda", index),
        )
        _status_blocks[index] = block
    return block


def status_arg(out: torch.Tensor) -> tuple:
    """The description of the status block for a call writing ``out``: its device's
    block on a GPU, an empty CPU tensor's on the CPU (where errors are raised at once)."""
    if not out.is_cuda:
        return _NO_STATUS
    index = out.get_device()
    arg = _status_args.get(index)
    if arg is None:
        block = status_block(torch.device("cuda", index))
        arg = (block.data_ptr(), (block.numel(),), (1,), DTYPE_CODES[torch.uint8], index)
        _status_args[index] = arg
    return arg
