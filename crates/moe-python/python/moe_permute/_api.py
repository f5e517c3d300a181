"""The vLLM-compatible functions: the names, arguments and results of
``vllm/model_executor/layers/fused_moe/moe_permute_unpermute.py`` (``moe_permute``,
``moe_unpermute``) and ``moe_align_block_size.py``, so that a stack swaps an import.

Deliberate differences are listed in the package README ("Against vLLM").
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _native, _ops, _state
from ._native import MoeInputError
from ._scratch import MoEPermuteScratch
from ._tensor import describe, describe_optional, stream_of

_ID_TYPES = (torch.int32, torch.int64)


def _through_dispatcher(tensor: torch.Tensor) -> bool:
    """Whether to call the registered op rather than its implementation: under
    torch.compile (which must see the op) and for tensor subclasses (fake tensors,
    DTensor). Plain eager calls skip the dispatcher's custom-op path, which costs tens
    of microseconds a call from Python."""
    return torch.compiler.is_compiling() or type(tensor) is not torch.Tensor


def moe_permute(
    hidden_states: torch.Tensor,
    a1q_scale: Optional[torch.Tensor],
    topk_ids: torch.Tensor,
    n_expert: int,
    n_local_expert: int = -1,
    expert_map: Optional[torch.Tensor] = None,
    permuted_hidden_states: Optional[torch.Tensor] = None,
    scratch: Optional[MoEPermuteScratch] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups the rows of ``hidden_states`` ``[N, H]`` by the experts ``topk_ids``
    ``[N, K]`` chose, local experts in ascending order, entries in ascending ``t*K + k``
    inside an expert (deterministic).

    Returns ``(permuted_hidden_states [N*K, H], permuted a1q_scale or None,
    expert_first_token_offset [L + 1] int64, inv_permuted_idx [N*K] int32,
    permuted_idx [N*K] int32)``. Entries whose expert is out of range or, with
    ``expert_map`` ``[E]`` int32, maps to -1 are dropped: they get no row, their
    ``inv_permuted_idx`` is ``>= expert_first_token_offset[-1]`` and rows from there on
    are not written. With a ``scratch`` the index outputs are views of it (the next
    call with it overwrites them); without one they are fresh.
    """
    if hidden_states.dim() != 2:
        raise MoeInputError(
            f"hidden_states must be [num_tokens, hidden_size], got shape {tuple(hidden_states.shape)}"
        )
    if topk_ids.dim() != 2:
        raise MoeInputError(f"topk_ids must be [num_tokens, topk], got shape {tuple(topk_ids.shape)}")
    n_token, n_hidden = hidden_states.shape
    topk = topk_ids.shape[1]
    if n_local_expert == -1:
        n_local_expert = n_expert
    device = hidden_states.device
    hidden_states = hidden_states.contiguous()
    topk_ids = _ids(topk_ids)
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32).contiguous()
    scales, scales_1d = _scales(a1q_scale, n_token)
    entries = n_token * topk
    if scratch is not None:
        _check_scratch(scratch, device, n_expert, n_local_expert)
        if scratch._native is None or topk != scratch.topk or n_token > scratch.max_num_tokens:
            scratch.reserve(n_token, topk)
        if not _through_dispatcher(hidden_states):
            return _permute_eager(
                scratch, hidden_states, topk_ids, expert_map, scales, scales_1d,
                permuted_hidden_states, n_token, n_hidden, topk,
            )
        own = scratch.permuted_hidden_states
        if permuted_hidden_states is None and own is not None \
                and scratch.hidden_size == n_hidden and scratch.hidden_dtype == hidden_states.dtype:
            permuted_hidden_states = own[:entries]
    if permuted_hidden_states is None:
        permuted_hidden_states = torch.empty(
            (entries, n_hidden), dtype=hidden_states.dtype, device=device
        )
    permuted_scales = None
    if scales is not None:
        permuted_scales = torch.empty((entries, scales.shape[1]), dtype=torch.float32, device=device)
    if scratch is not None:
        workspace, layout = scratch._workspace, scratch._layout
        op = _ops.permute_with_scratch if _through_dispatcher(hidden_states) else _ops.permute_with_scratch_impl
        op(hidden_states, topk_ids, expert_map, scales, permuted_hidden_states, permuted_scales,
           workspace, scratch._id)
        offsets = _ops.workspace_slice(
            workspace, layout["expert_first_token_offset"], n_local_expert + 1, torch.int64)
        inv = _ops.workspace_slice(workspace, layout["inv_permuted_idx"], entries, torch.int32)
        permuted_idx = _ops.workspace_slice(workspace, layout["permuted_idx"], entries, torch.int32)
    else:
        offsets = torch.empty(n_local_expert + 1, dtype=torch.int64, device=device)
        inv = torch.empty(entries, dtype=torch.int32, device=device)
        permuted_idx = torch.empty(entries, dtype=torch.int32, device=device)
        op = _ops.permute if _through_dispatcher(hidden_states) else _ops.permute_impl
        op(hidden_states, topk_ids, expert_map, scales, permuted_hidden_states, permuted_scales,
           offsets, inv, permuted_idx, n_expert, n_local_expert)
    if permuted_scales is not None and scales_1d:
        permuted_scales = permuted_scales.view(-1)
    return permuted_hidden_states, permuted_scales, offsets, inv, permuted_idx


def _permute_eager(scratch, hidden_states, topk_ids, expert_map, scales, scales_1d,
                   permuted_hidden_states, n_token, n_hidden, topk):
    """``moe_permute`` with a scratch, called eagerly: the shortest path from Python (the
    output views come from the scratch's cache, the workspace is the scratch's own)."""
    own_rows, offsets, inv, permuted_idx = scratch._outputs(n_token, n_hidden, hidden_states.dtype)
    rows = permuted_hidden_states if permuted_hidden_states is not None else own_rows
    if rows is None:
        rows = torch.empty((n_token * topk, n_hidden), dtype=hidden_states.dtype,
                           device=hidden_states.device)
    permuted_scales = None
    if scales is not None:
        permuted_scales = torch.empty((n_token * topk, scales.shape[1]), dtype=torch.float32,
                                      device=hidden_states.device)
    _native.permute(
        scratch._native,
        describe("hidden_states", hidden_states),
        describe("topk_ids", topk_ids),
        describe_optional("expert_map", expert_map),
        describe_optional("a1q_scale", scales),
        describe("permuted_hidden_states", rows),
        describe_optional("permuted a1q_scale", permuted_scales),
        None,
        stream_of(hidden_states),
        _state.checked,
    )
    if permuted_scales is not None and scales_1d:
        permuted_scales = permuted_scales.view(-1)
    return rows, permuted_scales, offsets, inv, permuted_idx


def moe_unpermute(
    out: torch.Tensor,
    permuted_hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    inv_permuted_idx: torch.Tensor,
    expert_first_token_offset: Optional[torch.Tensor] = None,
) -> None:
    """Writes ``out[t] = sum_k topk_weights[t, k] * permuted_hidden_states[inv[t*K + k]]``
    over the kept entries, accumulated in float32 in ascending ``k`` and rounded once;
    a token whose entries were all dropped gets zeros. Without
    ``expert_first_token_offset`` every row of ``permuted_hidden_states`` counts as kept.
    """
    # Shapes, layouts and devices are checked by the native call (with the tensors'
    # names); here only what must be settled before it.
    if expert_first_token_offset is None:
        if permuted_hidden_states.dim() != 2:
            raise MoeInputError(
                "permuted_hidden_states must be [rows, hidden_size], got shape "
                f"{tuple(permuted_hidden_states.shape)}"
            )
        expert_first_token_offset = torch.full(
            (1,), permuted_hidden_states.shape[0], dtype=torch.int64,
            device=permuted_hidden_states.device,
        )
    if topk_weights.dtype != torch.float32:
        topk_weights = topk_weights.float()
    if inv_permuted_idx.dtype != torch.int32:
        inv_permuted_idx = inv_permuted_idx.to(torch.int32)
    if expert_first_token_offset.dtype != torch.int64:
        expert_first_token_offset = expert_first_token_offset.to(torch.int64)
    # Inputs are made contiguous (a copy only when they are not); `out` must be.
    permuted_hidden_states = permuted_hidden_states.contiguous()
    topk_weights = topk_weights.contiguous()
    inv_permuted_idx = inv_permuted_idx.contiguous()
    expert_first_token_offset = expert_first_token_offset.contiguous()
    op = _ops.unpermute if _through_dispatcher(out) else _ops.unpermute_impl
    op(out, permuted_hidden_states, topk_weights, inv_permuted_idx, expert_first_token_offset)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: Optional[torch.Tensor] = None,
    pad_sorted_ids: bool = False,
    *,
    num_local_experts: int = -1,
    scratch: Optional[MoEPermuteScratch] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index-only permute for GEMMs that gather rows themselves (vLLM's
    ``moe_align_block_size``): returns ``(sorted_ids, expert_ids, num_tokens_post_pad)``.

    ``sorted_ids`` holds the flat entries ``t*K + k`` grouped by local expert, each group
    padded to a multiple of ``block_size`` with ``N*K``; ``expert_ids`` the local expert
    of each block (-1 for blocks at or after ``num_tokens_post_pad``); and
    ``num_tokens_post_pad`` ``[1]`` int32 the rows in use, left on the device.
    ``pad_sorted_ids`` is accepted for vLLM's signature: the rows in use are always a
    multiple of ``block_size``.
    """
    del pad_sorted_ids
    if topk_ids.dim() != 2:
        raise MoeInputError(f"topk_ids must be [num_tokens, topk], got shape {tuple(topk_ids.shape)}")
    if block_size < 1:
        raise MoeInputError(f"block_size must be at least 1, got {block_size}")
    n_token, topk = topk_ids.shape
    if num_local_experts == -1:
        num_local_experts = num_experts
    device = topk_ids.device
    topk_ids = _ids(topk_ids)
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32).contiguous()
    # The runtime's `max_padded_rows`: each of the at most min(L, N*K) non-empty
    # experts adds at most block_size - 1 rows of padding (tests check the two agree).
    entries = n_token * topk
    sorted_len = entries + min(num_local_experts, entries) * (block_size - 1)
    blocks = (sorted_len + block_size - 1) // block_size
    if scratch is not None:
        _check_scratch(scratch, device, num_experts, num_local_experts)
        if scratch.align_block_size != block_size or topk != scratch.topk \
                or n_token > scratch.max_num_tokens:
            scratch.reserve(n_token, topk, align_block_size=block_size)
        if scratch.align_block_size != block_size:
            raise MoeInputError(
                f"the scratch aligns to blocks of {scratch.align_block_size}, the call asks for "
                f"{block_size}"
            )
        workspace, layout = scratch._workspace, scratch._layout
        op = _ops.align_with_scratch if _through_dispatcher(topk_ids) else _ops.align_with_scratch_impl
        op(topk_ids, expert_map, workspace, scratch._id)
        sorted_ids = _ops.workspace_slice(workspace, layout["sorted_ids"], sorted_len, torch.int32)
        expert_ids = _ops.workspace_slice(workspace, layout["block_expert_ids"], blocks, torch.int32)
        rows = _ops.workspace_slice(workspace, layout["num_rows_post_padded"], 1, torch.int32)
    else:
        sorted_ids = torch.empty(sorted_len, dtype=torch.int32, device=device)
        expert_ids = torch.empty(blocks, dtype=torch.int32, device=device)
        rows = torch.empty(1, dtype=torch.int32, device=device)
        op = _ops.align if _through_dispatcher(topk_ids) else _ops.align_impl
        op(topk_ids, expert_map, sorted_ids, expert_ids, rows, num_experts, num_local_experts,
           block_size)
    return sorted_ids, expert_ids, rows


def moe_permute_unpermute_supported() -> bool:
    """Whether the ops can run: always (the CPU path is the fallback), as vLLM's guard
    asks before building a scratch."""
    return True


def check_errors(device: "torch.device | str | int | None" = None) -> None:
    """Waits for the device's current stream and raises the first error that
    ``moe_unpermute`` calls recorded on it since the last check (a negative
    ``inv_permuted_idx``, a valid count beyond the rows given). A scratch's own calls
    are checked with ``MoEPermuteScratch.check``. A host wait; not during capture."""
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return
    block = _state.status_block(device)
    _native.check_status(
        describe("status", block), torch.cuda.current_stream(device).cuda_stream
    )


def _ids(topk_ids: torch.Tensor) -> torch.Tensor:
    if topk_ids.dtype not in _ID_TYPES:
        if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise MoeInputError(f"topk_ids must be integers, got {topk_ids.dtype}")
        topk_ids = topk_ids.to(torch.int32)
    return topk_ids.contiguous()


def _scales(a1q_scale: Optional[torch.Tensor], n_token: int):
    """``a1q_scale`` as ``[N, S]`` float32, and whether it came as ``[N]``."""
    if a1q_scale is None:
        return None, False
    if a1q_scale.dim() == 1:
        if a1q_scale.shape[0] != n_token:
            raise MoeInputError(
                f"a1q_scale has {a1q_scale.shape[0]} values for {n_token} tokens: per-token "
                "scales travel with their rows (a per-tensor scale needs no permute)"
            )
        return a1q_scale.to(torch.float32).reshape(n_token, 1).contiguous(), True
    if a1q_scale.dim() != 2 or a1q_scale.shape[0] != n_token:
        raise MoeInputError(
            f"a1q_scale must be [{n_token}] or [{n_token}, S], got shape {tuple(a1q_scale.shape)}"
        )
    return a1q_scale.to(torch.float32).contiguous(), False


def _check_scratch(scratch: MoEPermuteScratch, device: torch.device, experts: int, local: int) -> None:
    if not isinstance(scratch, MoEPermuteScratch):
        raise MoeInputError(f"scratch must be a MoEPermuteScratch, got {type(scratch).__name__}")
    if scratch.device != device:
        raise MoeInputError(f"the scratch is on {scratch.device}, the tensors on {device}")
    if (scratch.num_experts, scratch.num_local_experts) != (experts, local):
        raise MoeInputError(
            f"the scratch is for {scratch.num_experts} experts ({scratch.num_local_experts} "
            f"local), the call for {experts} ({local} local)"
        )
