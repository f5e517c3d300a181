"""The PyTorch custom ops: ``torch.ops.moe_permute.*``.

Each op writes into tensors it is given and returns nothing, so that eager calls,
``torch.cuda.graph`` capture and ``torch.compile(fullgraph=True)`` see the same thing: an
opaque call that mutates the arguments named in ``mutates_args``. With a scratch
(``*_with_scratch``) the index outputs live in the scratch: views of its ``workspace``
argument, made by the Python wrappers after the op (``_api.py``). Without one
(``permute``, ``align``) the op makes a scratch for the call and copies them into the
tensors it is given. Every op runs on the current stream of its tensors' device and
never waits for the device, except in checked mode outside graph capture.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _native, _state
from ._tensor import describe, describe_optional, stream_of

_ELEMENT_BYTES = {torch.int32: 4, torch.int64: 8}


def workspace_slice(workspace: torch.Tensor, offset: int, count, dtype: torch.dtype) -> torch.Tensor:
    """``count`` elements of ``dtype`` at byte ``offset`` of a scratch's workspace."""
    return workspace[offset: offset + count * _ELEMENT_BYTES[dtype]].view(dtype)


def _registered(scratch_id: int) -> "_native.NativeScratch":
    native = _state.scratches.get(scratch_id)
    if native is None:
        raise _native.MoeInputError(
            f"scratch {scratch_id} no longer exists (its MoEPermuteScratch was collected)"
        )
    return native


def _transient(device_tensor: torch.Tensor, num_tokens: int, topk: int, num_experts: int,
               num_local_experts: int, align_block_size: Optional[int]):
    """A scratch for one call, over a workspace from PyTorch's allocator (freed, stream-
    ordered, when the call's tensors are)."""
    layout = _native.NativeScratch.layout(
        num_tokens, topk, num_experts, num_local_experts, align_block_size
    )
    workspace = torch.empty(layout["bytes"], dtype=torch.uint8, device=device_tensor.device)
    native = _native.NativeScratch(
        describe("workspace", workspace), num_tokens, topk, num_experts, num_local_experts,
        align_block_size, stream_of(workspace),
    )
    return native, workspace, layout


def _permute(native, workspace, hidden_states, topk_ids, expert_map, scales,
             permuted_hidden_states, permuted_scales) -> None:
    _native.permute(
        native,
        describe("hidden_states", hidden_states),
        describe("topk_ids", topk_ids),
        describe_optional("expert_map", expert_map),
        describe_optional("a1q_scale", scales),
        describe("permuted_hidden_states", permuted_hidden_states),
        describe_optional("permuted a1q_scale", permuted_scales),
        describe("workspace", workspace),
        stream_of(hidden_states),
        _state.checked,
    )


def permute_with_scratch_impl(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    scales: Optional[torch.Tensor],
    permuted_hidden_states: torch.Tensor,
    permuted_scales: Optional[torch.Tensor],
    workspace: torch.Tensor,
    scratch_id: int,
) -> None:
    """Rows of ``hidden_states`` ``[N, H]`` grouped by local expert into
    ``permuted_hidden_states`` (and ``scales`` into ``permuted_scales``); the index
    outputs into the scratch's ``workspace`` at its layout's offsets."""
    _permute(_registered(scratch_id), workspace, hidden_states, topk_ids, expert_map, scales,
             permuted_hidden_states, permuted_scales)




def permute_impl(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    scales: Optional[torch.Tensor],
    permuted_hidden_states: torch.Tensor,
    permuted_scales: Optional[torch.Tensor],
    expert_first_token_offset: torch.Tensor,
    inv_permuted_idx: torch.Tensor,
    permuted_idx: torch.Tensor,
    num_experts: int,
    num_local_experts: int,
) -> None:
    """``permute_with_scratch`` with a scratch made for the call, its index outputs
    copied into the tensors given (three copies more than with a scratch)."""
    num_tokens, topk = topk_ids.shape
    native, workspace, layout = _transient(
        hidden_states, num_tokens, topk, num_experts, num_local_experts, None
    )
    _permute(native, workspace, hidden_states, topk_ids, expert_map, scales,
             permuted_hidden_states, permuted_scales)
    entries = num_tokens * topk
    expert_first_token_offset.copy_(workspace_slice(
        workspace, layout["expert_first_token_offset"], num_local_experts + 1, torch.int64))
    inv_permuted_idx.copy_(
        workspace_slice(workspace, layout["inv_permuted_idx"], entries, torch.int32))
    permuted_idx.copy_(workspace_slice(workspace, layout["permuted_idx"], entries, torch.int32))




def unpermute_impl(
    out: torch.Tensor,
    permuted_hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    inv_permuted_idx: torch.Tensor,
    expert_first_token_offset: torch.Tensor,
) -> None:
    """``out[t] = sum_k topk_weights[t, k] * permuted_hidden_states[inv[t*K + k]]`` over
    the kept entries (rows below ``expert_first_token_offset[-1]``)."""
    _native.unpermute(
        describe("out", out),
        describe("permuted_hidden_states", permuted_hidden_states),
        describe("topk_weights", topk_weights),
        describe("inv_permuted_idx", inv_permuted_idx),
        describe("expert_first_token_offset", expert_first_token_offset),
        # Bad row indices and valid counts are recorded here; `check_errors` reads it.
        _state.status_arg(out),
        stream_of(out),
        _state.checked,
    )




def _align(native, workspace, topk_ids, expert_map) -> None:
    _native.align(
        native,
        describe("topk_ids", topk_ids),
        describe_optional("expert_map", expert_map),
        describe("workspace", workspace),
        stream_of(topk_ids),
        _state.checked,
    )


def align_with_scratch_impl(
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    workspace: torch.Tensor,
    scratch_id: int,
) -> None:
    """The index-only sort of ``topk_ids`` by local expert, each expert's group padded
    to the scratch's block size, into its ``workspace`` at its layout's offsets."""
    _align(_registered(scratch_id), workspace, topk_ids, expert_map)




def align_impl(
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    num_experts: int,
    num_local_experts: int,
    block_size: int,
) -> None:
    """``align_with_scratch`` with a scratch made for the call, its outputs copied into
    the tensors given."""
    num_tokens, topk = topk_ids.shape
    native, workspace, layout = _transient(
        topk_ids, num_tokens, topk, num_experts, num_local_experts, block_size
    )
    _align(native, workspace, topk_ids, expert_map)
    sorted_ids.copy_(
        workspace_slice(workspace, layout["sorted_ids"], sorted_ids.numel(), torch.int32))
    expert_ids.copy_(
        workspace_slice(workspace, layout["block_expert_ids"], expert_ids.numel(), torch.int32))
    num_tokens_post_pad.copy_(
        workspace_slice(workspace, layout["num_rows_post_padded"], 1, torch.int32))


def _no_outputs(*_args, **_kwargs) -> None:
    """The fake (meta) implementation of every op: they only write tensors they are
    given, so tracing needs no shapes from them."""
    return None


_ON = ("cpu", "cuda")
permute_with_scratch = torch.library.custom_op(
    "moe_permute::permute_with_scratch", permute_with_scratch_impl,
    mutates_args=("permuted_hidden_states", "permuted_scales", "workspace"), device_types=_ON,
)
permute = torch.library.custom_op(
    "moe_permute::permute", permute_impl,
    mutates_args=("permuted_hidden_states", "permuted_scales", "expert_first_token_offset",
                  "inv_permuted_idx", "permuted_idx"),
    device_types=_ON,
)
unpermute = torch.library.custom_op(
    "moe_permute::unpermute", unpermute_impl, mutates_args=("out",), device_types=_ON
)
align_with_scratch = torch.library.custom_op(
    "moe_permute::align_with_scratch", align_with_scratch_impl, mutates_args=("workspace",),
    device_types=_ON,
)
align = torch.library.custom_op(
    "moe_permute::align", align_impl,
    mutates_args=("sorted_ids", "expert_ids", "num_tokens_post_pad"), device_types=_ON,
)
for _op in (permute_with_scratch, permute, unpermute, align_with_scratch, align):
    _op.register_fake(_no_outputs)
