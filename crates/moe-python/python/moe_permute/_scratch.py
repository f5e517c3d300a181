"""``MoEPermuteScratch``: the permute scratch, in memory from PyTorch's caching allocator."""

from __future__ import annotations

import weakref
from typing import List, Optional, Union

import torch

from . import _native, _state
from ._native import MoeDeviceError, MoeInputError
from ._tensor import describe, stream_of


class MoEPermuteScratch:
    """Every intermediate buffer of ``moe_permute`` and ``moe_align_block_size``, built
    once and reused by every call (and every MoE layer) that is given it.

    Its memory is one ``torch.uint8`` tensor from PyTorch's caching allocator, so it
    shows in ``torch.cuda.memory_allocated`` and, when reserved inside a graph pool, is
    that pool's. Calls given the scratch allocate nothing on the device and return views
    of it: two calls return the same memory, as vLLM's scratch does.

    The scratch grows on demand (``reserve``, or a call with more tokens than it holds)
    but never while a CUDA graph is being captured: run the largest batch once before
    capturing. Memory given up by growing is kept, so graphs captured before stay valid.

    ``num_local_experts=-1`` means all ``num_experts`` are local. ``hidden_size`` and
    ``hidden_dtype`` make the scratch also own ``permuted_hidden_states`` (vLLM's
    Humming-style backends), which ``moe_permute`` then fills when it is given none.
    """

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int = -1,
        device: Union[torch.device, str, int, None] = None,
        *,
        max_num_tokens: int = 0,
        topk: int = 0,
        hidden_size: Optional[int] = None,
        hidden_dtype: Optional[torch.dtype] = None,
        align_block_size: Optional[int] = None,
    ) -> None:
        if num_local_experts == -1:
            num_local_experts = num_experts
        self.num_experts = int(num_experts)
        self.num_local_experts = int(num_local_experts)
        self.device = _resolve_device(device)
        self.max_num_tokens = 0
        self.topk = 0
        self.hidden_size: Optional[int] = None
        self.hidden_dtype: Optional[torch.dtype] = None
        self.align_block_size: Optional[int] = None
        self.permuted_hidden_states: Optional[torch.Tensor] = None
        self._workspace: Optional[torch.Tensor] = None
        self._native: Optional[_native.NativeScratch] = None
        self._layout: dict = {}
        self._id = -1
        # Workspaces and row buffers given up by growing: a graph captured with them
        # still reads them at replay.
        self._retired: List[torch.Tensor] = []
        # Output views by call shape, for eager calls (see `_outputs`).
        self._views: dict = {}
        if self.device.type == "cuda":
            # Unpermute's status block, made now rather than first inside a capture.
            _state.status_block(self.device)
        if max_num_tokens or topk:
            self.reserve(max_num_tokens, topk, hidden_size, hidden_dtype, align_block_size)

    def reserve(
        self,
        max_num_tokens: int,
        topk: int,
        hidden_size: Optional[int] = None,
        hidden_dtype: Optional[torch.dtype] = None,
        align_block_size: Optional[int] = None,
    ) -> bool:
        """Makes room for calls of up to ``max_num_tokens`` tokens of ``topk`` experts
        (and permuted rows of ``hidden_size`` ``hidden_dtype``, and align with
        ``align_block_size``). Returns whether it had to grow. Raises ``MoeDeviceError``
        when it must grow while a graph is being captured."""
        max_num_tokens, topk = int(max_num_tokens), int(topk)
        if topk < 1:
            raise MoeInputError(f"topk must be at least 1, got {topk}")
        if max_num_tokens < 0:
            raise MoeInputError(f"max_num_tokens must be at least 0, got {max_num_tokens}")
        if (hidden_size is None) != (hidden_dtype is None):
            raise MoeInputError("hidden_size and hidden_dtype come together")
        same_topk = topk == self.topk
        tokens = max(max_num_tokens, self.max_num_tokens) if same_topk else max_num_tokens
        block = align_block_size if align_block_size is not None else self.align_block_size
        rows = (hidden_size, hidden_dtype) if hidden_size is not None else (
            (self.hidden_size, self.hidden_dtype) if same_topk else (None, None)
        )
        covered = (
            self._native is not None
            and same_topk
            and tokens == self.max_num_tokens
            and block == self.align_block_size
            and rows == (self.hidden_size, self.hidden_dtype)
        )
        if covered:
            return False
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise MoeDeviceError(
                f"the scratch must grow to {tokens} tokens of top-{topk} while a CUDA graph "
                "is being captured; reserve it (or run the largest batch once) before capturing"
            )
        layout = _native.NativeScratch.layout(
            tokens, topk, self.num_experts, self.num_local_experts, block
        )
        workspace = torch.empty(layout["bytes"], dtype=torch.uint8, device=self.device)
        native = _native.NativeScratch(
            describe("workspace", workspace),
            tokens,
            topk,
            self.num_experts,
            self.num_local_experts,
            block,
            stream_of(workspace),
        )
        permuted = None
        if rows[0] is not None:
            permuted = torch.empty((tokens * topk, rows[0]), dtype=rows[1], device=self.device)
        self._retire()
        self._views = {}
        self._workspace, self._native, self._layout = workspace, native, layout
        self.permuted_hidden_states = permuted
        self._id = _state.register(native)
        weakref.finalize(self, _state.unregister, self._id)
        self.max_num_tokens, self.topk, self.align_block_size = tokens, topk, block
        self.hidden_size, self.hidden_dtype = rows
        return True

    def _outputs(self, n_token: int, n_hidden: int, dtype: torch.dtype) -> tuple:
        """The views a call of ``n_token`` tokens returns: the owned rows (None when the
        scratch owns none of this width and type), ``expert_first_token_offset``,
        ``inv_permuted_idx`` and ``permuted_idx``. Made once per shape: slicing them on
        every call would cost an eager call more than the kernels take."""
        key = (n_token, n_hidden, dtype)
        views = self._views.get(key)
        if views is None:
            from ._ops import workspace_slice

            entries, layout, workspace = n_token * self.topk, self._layout, self._workspace
            rows = None
            if self.permuted_hidden_states is not None and self.hidden_size == n_hidden \
                    and self.hidden_dtype == dtype:
                rows = self.permuted_hidden_states[:entries]
            views = (
                rows,
                workspace_slice(workspace, layout["expert_first_token_offset"],
                                self.num_local_experts + 1, torch.int64),
                workspace_slice(workspace, layout["inv_permuted_idx"], entries, torch.int32),
                workspace_slice(workspace, layout["permuted_idx"], entries, torch.int32),
            )
            self._views[key] = views
        return views

    def _retire(self) -> None:
        if self._workspace is not None:
            self._retired.append(self._workspace)
        if self.permuted_hidden_states is not None:
            self._retired.append(self.permuted_hidden_states)

    def validate(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Raises ``MoeInputError`` when a call with these inputs does not fit the scratch
        as it is (vLLM's ``MoEPermuteScratch.validate``); calls grow it instead."""
        problems = []
        if hidden_states.device != self.device or topk_ids.device != self.device:
            problems.append(
                f"tensors on {hidden_states.device}/{topk_ids.device}, scratch on {self.device}"
            )
        if hidden_states.dim() != 2 or topk_ids.dim() != 2:
            problems.append("hidden_states and topk_ids must be 2-D")
        else:
            n_token, n_hidden = hidden_states.shape
            if n_token > self.max_num_tokens:
                problems.append(f"{n_token} tokens, the scratch holds {self.max_num_tokens}")
            if topk_ids.shape[0] != n_token:
                problems.append(f"topk_ids has {topk_ids.shape[0]} rows for {n_token} tokens")
            if topk_ids.shape[1] != self.topk:
                problems.append(f"topk {topk_ids.shape[1]}, the scratch's is {self.topk}")
            if self.hidden_size is not None and (
                n_hidden != self.hidden_size or hidden_states.dtype != self.hidden_dtype
            ):
                problems.append(
                    f"rows of {n_hidden} {hidden_states.dtype}, the scratch owns "
                    f"{self.hidden_size} {self.hidden_dtype}"
                )
        if problems:
            raise MoeInputError("input does not fit the scratch: " + "; ".join(problems))

    def check(self) -> None:
        """Waits for the calls queued with this scratch on the current stream and raises
        the first error their kernels recorded (a malformed ``expert_map`` entry) since
        the last check. A host wait: call it where one is acceptable, not in a graph."""
        if self._native is not None:
            self._native.check(_current_stream(self.device))

    @property
    def nbytes(self) -> int:
        """Device bytes the scratch holds now (workspace and owned rows)."""
        total = 0 if self._workspace is None else self._workspace.numel()
        if self.permuted_hidden_states is not None:
            p = self.permuted_hidden_states
            total += p.numel() * p.element_size()
        return total

    def __repr__(self) -> str:
        return (
            f"MoEPermuteScratch(num_experts={self.num_experts}, "
            f"num_local_experts={self.num_local_experts}, device={self.device}, "
            f"max_num_tokens={self.max_num_tokens}, topk={self.topk}, "
            f"hidden_size={self.hidden_size}, hidden_dtype={self.hidden_dtype}, "
            f"align_block_size={self.align_block_size})"
        )


def _resolve_device(device: Union[torch.device, str, int, None]) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise MoeInputError(f"moe_permute runs on CPU and CUDA devices, not {device}")
    return device


def _current_stream(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
