"""Process-wide state: checked mode, the scratches ops find by id, status blocks."""

from __future__ import annotations

import itertools
import threading
from typing import Dict

import torch

from . import _native
from ._native import MoeDeviceError

_lock = threading.Lock()
_checked = False
_ids = itertools.count()
# NativeScratch objects by the id the ops receive (torch.library ops take tensors and
# numbers, not Python objects). MoEPermuteScratch removes its entries when collected.
scratches: Dict[int, "_native.NativeScratch"] = {}
# One status block per CUDA device for unpermute (which is given no scratch).
_status_blocks: Dict[int, torch.Tensor] = {}


def set_checked(checked: bool) -> None:
    """Checked mode: after every call outside graph capture, wait for the device and
    raise the error it recorded, if any (bad ``expert_map`` entries, negative
    ``inv_permuted_idx``, a valid count larger than the rows). Off by default: a check
    is a host wait."""
    global _checked
    _checked = bool(checked)


def is_checked() -> bool:
    return _checked


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
