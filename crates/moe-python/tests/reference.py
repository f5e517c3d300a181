"""The contract (docs/contract.md) written in plain PyTorch, to test the ops against."""

from typing import NamedTuple, Optional

import torch


class Routed(NamedTuple):
    rows: torch.Tensor  # [valid, H]
    scales: Optional[torch.Tensor]  # [valid, S]
    offsets: torch.Tensor  # [L + 1] int64
    permuted_idx: torch.Tensor  # [valid] flat entries
    valid_mask: torch.Tensor  # [N*K] bool
    inv: torch.Tensor  # [N*K]: the row of each kept entry (dropped: -1)


def local_ids(topk_ids, num_experts, expert_map):
    flat = topk_ids.reshape(-1).long().cpu()
    valid = (flat >= 0) & (flat < num_experts)
    local = torch.full_like(flat, -1)
    if expert_map is None:
        local[valid] = flat[valid]
    else:
        local[valid] = expert_map.long().cpu()[flat[valid]]
        valid &= local >= 0
    return local, valid


def permute(hidden, scales, topk_ids, num_experts, num_local, expert_map=None) -> Routed:
    n, k = topk_ids.shape
    local, valid = local_ids(topk_ids, num_experts, expert_map)
    keys = torch.where(valid, local, torch.full_like(local, num_local))
    order = torch.sort(keys, stable=True).indices
    count = int(valid.sum())
    permuted_idx = order[:count]
    counts = torch.bincount(local[valid], minlength=num_local)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    inv = torch.full((n * k,), -1, dtype=torch.int64)
    inv[permuted_idx] = torch.arange(count)
    source = (permuted_idx // k).to(hidden.device)
    rows = hidden.index_select(0, source) if count else hidden[:0]
    routed_scales = None
    if scales is not None:
        routed_scales = scales.reshape(n, -1).index_select(0, source)
    return Routed(rows, routed_scales, offsets, permuted_idx, valid, inv)


def unpermute(permuted, weights, inv, valid_count):
    """float32 sum in ascending k of the kept rows, rounded once."""
    n, k = weights.shape
    inv = inv.reshape(n, k).long()
    acc = torch.zeros(n, permuted.shape[1], dtype=torch.float32, device=permuted.device)
    for j in range(k):
        rows = inv[:, j]
        kept = (rows >= 0) & (rows < valid_count)
        gathered = permuted.index_select(0, rows.clamp(0, max(permuted.shape[0] - 1, 0)))
        term = weights[:, j : j + 1].float() * gathered.float()
        acc = acc + torch.where(kept[:, None], term, torch.zeros_like(term))
    return acc.to(permuted.dtype)


def align(topk_ids, num_experts, num_local, block_size, expert_map=None):
    """(sorted_ids rows in use, expert of each block in use, rows in use)."""
    n, k = topk_ids.shape
    local, valid = local_ids(topk_ids, num_experts, expert_map)
    sorted_ids, blocks = [], []
    for e in range(num_local):
        entries = torch.nonzero(valid & (local == e)).flatten().tolist()
        if not entries:
            continue
        padded = -(-len(entries) // block_size) * block_size
        sorted_ids += entries + [n * k] * (padded - len(entries))
        blocks += [e] * (padded // block_size)
    return (
        torch.tensor(sorted_ids, dtype=torch.int32),
        torch.tensor(blocks, dtype=torch.int32),
        len(sorted_ids),
    )


def random_ids(n, k, num_experts, generator, dtype=torch.int32, invalid=0.0):
    """Each token picks k distinct experts; a fraction `invalid` of entries is out of range."""
    ids = torch.rand(n, num_experts, generator=generator).argsort(dim=1)[:, :k]
    if invalid:
        bad = torch.rand(n, k, generator=generator) < invalid
        ids = torch.where(bad, ids + num_experts + 3, ids)
    return ids.to(dtype)


def random_rows(n, h, dtype, generator):
    x = torch.randn(n, h, generator=generator) * 3
    return x.to(dtype)
