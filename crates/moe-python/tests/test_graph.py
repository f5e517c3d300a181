"""CUDA-graph capture as PyTorch does it (a side stream, the caching allocator's graph
pool) and replay on new inputs."""

import torch

import moe_permute as mp
import reference as ref


def test_capture_and_replay_on_new_inputs(cuda):
    tokens, hidden, topk, experts = 48, 128, 4, 32
    g = torch.Generator().manual_seed(31)
    scratch = mp.MoEPermuteScratch(experts, experts, cuda, max_num_tokens=tokens, topk=topk)
    x = ref.random_rows(tokens, hidden, torch.bfloat16, g).to(cuda)
    ids = ref.random_ids(tokens, topk, experts, g).to(cuda)
    w = torch.rand(tokens, topk, generator=g).to(cuda)
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=cuda)

    def layer():
        rows, _, offsets, inv, _ = mp.moe_permute(x, None, ids, experts, scratch=scratch)
        mp.moe_unpermute(out, rows * 2, w, inv, offsets)
        return rows, offsets

    layer()  # warm-up, as serving stacks do before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows, offsets = layer()

    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x.copy_(ref.random_rows(tokens, hidden, torch.bfloat16, g))
        ids.copy_(ref.random_ids(tokens, topk, experts, g))
        w.copy_(torch.rand(tokens, topk, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.permute(x, None, ids, experts, experts)
        valid = int(expected.offsets[-1])
        assert torch.equal(offsets.cpu(), expected.offsets)
        assert torch.equal(rows[:valid], expected.rows)
        routed = ref.permute(x, None, ids, experts, experts)
        perm_rows = torch.zeros(tokens * topk, hidden, dtype=torch.bfloat16, device=cuda)
        perm_rows[:valid] = routed.rows * 2
        inv = routed.inv.clamp(min=0).to(cuda)
        want = ref.unpermute(perm_rows, w, inv, valid)
        torch.testing.assert_close(out, want, rtol=1.6e-2, atol=1.6e-2)
    scratch.check()
    mp.check_errors(cuda)


def test_capture_without_a_scratch(cuda):
    """The allocating path captures too: its buffers come from the graph's pool."""
    tokens, hidden, topk, experts = 16, 64, 2, 8
    g = torch.Generator().manual_seed(41)
    x = ref.random_rows(tokens, hidden, torch.float16, g).to(cuda)
    ids = ref.random_ids(tokens, topk, experts, g, torch.int64).to(cuda)
    mp.moe_permute(x, None, ids, experts)
    sorted_ids, _, rows = mp.moe_align_block_size(ids, 16, experts)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        permuted, _, offsets, _, _ = mp.moe_permute(x, None, ids, experts)
        sorted_ids, _, rows = mp.moe_align_block_size(ids, 16, experts)
    g = torch.Generator().manual_seed(42)
    x.copy_(ref.random_rows(tokens, hidden, torch.float16, g))
    ids.copy_(ref.random_ids(tokens, topk, experts, g, torch.int64))
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.permute(x, None, ids, experts, experts)
    assert torch.equal(offsets.cpu(), expected.offsets)
    assert torch.equal(permuted[: int(expected.offsets[-1])], expected.rows)
    want_ids, _, want_rows = ref.align(ids, experts, experts, 16)
    assert int(rows) == want_rows
    assert torch.equal(sorted_ids[:want_rows].cpu(), want_ids)
