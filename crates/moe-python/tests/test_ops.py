"""Every op against the plain-PyTorch reference, on random inputs, on every device."""

import pytest
import torch

import moe_permute as mp
import reference as ref

ROW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
SUM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cases(seed, count=6):
    """Random (N, H, K, E, L) with a mix of tiny, odd and larger sizes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        experts = int(torch.randint(1, 40, (1,), generator=g))
        topk = int(torch.randint(1, min(experts, 8) + 1, (1,), generator=g))
        tokens = int(torch.randint(0, 300, (1,), generator=g))
        hidden = 8 * int(torch.randint(1, 40, (1,), generator=g))
        out.append((tokens, hidden, topk, experts))
    return out


def expert_map_for(experts, g):
    """A rank's share: a random subset of experts is local, numbered in order."""
    local = torch.rand(experts, generator=g) < 0.6
    local[int(torch.randint(0, experts, (1,), generator=g))] = True
    m = torch.full((experts,), -1, dtype=torch.int32)
    m[local] = torch.arange(int(local.sum()), dtype=torch.int32)
    return m, int(local.sum())


def check_permute(out, expected, tokens, topk):
    rows, scales, offsets, inv, permuted_idx = out
    valid = int(expected.offsets[-1])
    entries = tokens * topk
    assert offsets.dtype == torch.int64 and inv.dtype == torch.int32
    assert torch.equal(offsets.cpu(), expected.offsets)
    assert rows.shape[0] >= entries
    # Bitwise: permute moves bytes (fp8 included).
    assert torch.equal(rows[:valid].cpu().view(torch.uint8), expected.rows.cpu().view(torch.uint8))
    assert torch.equal(permuted_idx[:valid].cpu().long(), expected.permuted_idx)
    assert bool((permuted_idx[valid:entries].cpu() == entries).all())
    inv = inv.cpu().long()
    kept = expected.valid_mask
    assert torch.equal(inv[kept], expected.inv[kept])
    assert bool((inv[~kept] >= valid).all())
    if expected.scales is not None:
        assert torch.equal(scales.reshape(entries, -1)[:valid].cpu(), expected.scales.cpu())


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("with_scratch", [False, True], ids=["fresh", "scratch"])
def test_permute_matches_reference(device, dtype, id_dtype, with_scratch):
    g = torch.Generator().manual_seed(hash((str(dtype), str(id_dtype), with_scratch)) % 2**31)
    scratch = None
    for tokens, hidden, topk, experts in cases(seed=int(torch.randint(0, 2**31, (1,), generator=g))):
        if with_scratch and (scratch is None or scratch.num_experts != experts):
            scratch = mp.MoEPermuteScratch(experts, experts, device)
        x = ref.random_rows(tokens, hidden, dtype, g).to(device)
        ids = ref.random_ids(tokens, topk, experts, g, id_dtype, invalid=0.1).to(device)
        out = mp.moe_permute(x, None, ids, experts, scratch=scratch if with_scratch else None)
        check_permute(out, ref.permute(x, None, ids, experts, experts), tokens, topk)


@pytest.mark.parametrize("scale_shape", ["per_token", "columns"])
def test_permute_moves_scales_and_maps_experts(device, scale_shape):
    g = torch.Generator().manual_seed(7 if scale_shape == "per_token" else 8)
    for tokens, hidden, topk, experts in cases(seed=11):
        expert_map, local = expert_map_for(experts, g)
        x = ref.random_rows(tokens, hidden, torch.float8_e4m3fn, g).to(device)
        ids = ref.random_ids(tokens, topk, experts, g, invalid=0.05).to(device)
        shape = (tokens,) if scale_shape == "per_token" else (tokens, 3)
        scales = torch.rand(shape, generator=g).to(device)
        m = expert_map.to(device)
        out = mp.moe_permute(x, scales, ids, experts, local, expert_map=m)
        assert out[1].dim() == len(shape)
        check_permute(out, ref.permute(x, scales, ids, experts, local, expert_map), tokens, topk)


@pytest.mark.parametrize("dtype", SUM_DTYPES, ids=str)
def test_unpermute_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(int(TOLERANCE[dtype] * 1e6))
    for tokens, hidden, topk, experts in cases(seed=3):
        expert_map, local = expert_map_for(experts, g)
        x = ref.random_rows(tokens, hidden, dtype, g).to(device)
        ids = ref.random_ids(tokens, topk, experts, g, invalid=0.1).to(device)
        rows, _, offsets, inv, _ = mp.moe_permute(
            x, None, ids, experts, local, expert_map=expert_map.to(device)
        )
        # The experts' outputs: anything but the permuted input itself.
        expert_out = (rows.float() * 0.5 - 1).to(dtype)
        weights = torch.rand(tokens, topk, generator=g).to(device)
        out = torch.full((tokens, hidden), 7.0, dtype=dtype, device=device)
        mp.moe_unpermute(out, expert_out, weights, inv, offsets)
        expected = ref.unpermute(expert_out, weights, inv, int(offsets[-1]))
        torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_unpermute_without_offsets_keeps_every_row(device):
    g = torch.Generator().manual_seed(5)
    tokens, hidden, topk = 33, 64, 4
    permuted = ref.random_rows(tokens * topk, hidden, torch.bfloat16, g).to(device)
    inv = torch.randperm(tokens * topk, generator=g).to(torch.int32).to(device)
    weights = torch.rand(tokens, topk, generator=g).to(device)
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    mp.moe_unpermute(out, permuted, weights, inv)
    expected = ref.unpermute(permuted, weights, inv, tokens * topk)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("with_scratch", [False, True], ids=["fresh", "scratch"])
def test_align_matches_reference(device, with_scratch):
    g = torch.Generator().manual_seed(21 + with_scratch)
    for tokens, _, topk, experts in cases(seed=17):
        block = int(torch.randint(1, 65, (1,), generator=g))
        expert_map, local = expert_map_for(experts, g)
        ids = ref.random_ids(tokens, topk, experts, g, invalid=0.1).to(device)
        scratch = mp.MoEPermuteScratch(experts, local, device) if with_scratch else None
        sorted_ids, blocks, rows = mp.moe_align_block_size(
            ids, block, experts, expert_map.to(device), num_local_experts=local, scratch=scratch
        )
        want_ids, want_blocks, want_rows = ref.align(ids, experts, local, block, expert_map)
        assert int(rows) == want_rows
        entries = tokens * topk
        assert sorted_ids.numel() == mp._native.align_sorted_len(tokens, topk, local, block)
        assert torch.equal(sorted_ids[:want_rows].cpu(), want_ids)
        assert bool((sorted_ids[want_rows:].cpu() == entries).all())
        used = want_rows // block
        assert torch.equal(blocks[:used].cpu(), want_blocks)
        assert bool((blocks[used:].cpu() == -1).all())


def test_scratch_reuses_its_memory_across_calls_and_layers(device):
    g = torch.Generator().manual_seed(9)
    scratch = mp.MoEPermuteScratch(16, 16, device, max_num_tokens=64, topk=4)
    pointers = set()
    for layer in range(3):
        x = ref.random_rows(40 + layer, 32, torch.bfloat16, g).to(device)
        ids = ref.random_ids(40 + layer, 4, 16, g).to(device)
        out = mp.moe_permute(x, None, ids, 16, scratch=scratch)
        check_permute(out, ref.permute(x, None, ids, 16, 16), 40 + layer, 4)
        pointers.add((out[2].data_ptr(), out[3].data_ptr(), out[4].data_ptr()))
    assert len(pointers) == 1


def test_scratch_grows_and_owns_rows(device):
    g = torch.Generator().manual_seed(13)
    scratch = mp.MoEPermuteScratch(8, device=device, topk=2, max_num_tokens=4,
                                   hidden_size=64, hidden_dtype=torch.bfloat16)
    assert scratch.reserve(4, 2) is False
    x = ref.random_rows(100, 64, torch.bfloat16, g).to(device)
    ids = ref.random_ids(100, 2, 8, g).to(device)
    out = mp.moe_permute(x, None, ids, 8, scratch=scratch)
    assert scratch.max_num_tokens == 100
    assert out[0].data_ptr() == scratch.permuted_hidden_states.data_ptr()
    check_permute(out, ref.permute(x, None, ids, 8, 8), 100, 2)


def test_scratch_memory_comes_from_pytorch(cuda):
    before = torch.cuda.memory_allocated(cuda)
    scratch = mp.MoEPermuteScratch(256, 256, cuda, max_num_tokens=4096, topk=8)
    assert torch.cuda.memory_allocated(cuda) - before >= scratch.nbytes > 4096 * 8 * 8


def test_ops_are_registered_with_torch():
    for name in ("permute", "permute_with_scratch", "unpermute", "align", "align_with_scratch"):
        assert hasattr(torch.ops.moe_permute, name)


def test_the_registered_ops_run_eagerly(device):
    """The wrappers skip the dispatcher eagerly; the ops themselves work there too."""
    g = torch.Generator().manual_seed(23)
    tokens, hidden, topk, experts = 19, 40, 3, 7
    x = ref.random_rows(tokens, hidden, torch.bfloat16, g).to(device)
    ids = ref.random_ids(tokens, topk, experts, g, invalid=0.1).to(device)
    entries = tokens * topk
    rows = torch.empty(entries, hidden, dtype=torch.bfloat16, device=device)
    offsets = torch.empty(experts + 1, dtype=torch.int64, device=device)
    inv = torch.empty(entries, dtype=torch.int32, device=device)
    idx = torch.empty(entries, dtype=torch.int32, device=device)
    torch.ops.moe_permute.permute(x, ids, None, None, rows, None, offsets, inv, idx, experts, experts)
    check_permute((rows, None, offsets, inv, idx), ref.permute(x, None, ids, experts, experts),
                  tokens, topk)
    w = torch.rand(tokens, topk, generator=g).to(device)
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    torch.ops.moe_permute.unpermute(out, rows, w, inv, offsets)
    expected = ref.unpermute(rows, w, inv, int(offsets[-1]))
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2)


def test_align_sorted_len_matches_the_runtime():
    # The Python wrapper sizes sorted_ids itself (traceable by torch.compile); it must
    # agree with the runtime's formula.
    for tokens, topk, local, block in [(0, 1, 1, 1), (1, 8, 256, 16), (37, 2, 8, 64), (5, 8, 3, 7)]:
        entries = tokens * topk
        assert mp._native.align_sorted_len(tokens, topk, local, block) == \
            entries + min(local, entries) * (block - 1)


@pytest.mark.parametrize("hidden", [1, 3, 13, 50])
def test_rows_of_any_width(device, hidden):
    """Rows that are not a multiple of 16 bytes take a narrower path, not an error."""
    g = torch.Generator().manual_seed(hidden)
    tokens, topk, experts = 37, 3, 6
    x = ref.random_rows(tokens, hidden, torch.bfloat16, g).to(device)
    ids = ref.random_ids(tokens, topk, experts, g).to(device)
    out = mp.moe_permute(x, None, ids, experts)
    check_permute(out, ref.permute(x, None, ids, experts, experts), tokens, topk)
    weights = torch.rand(tokens, topk, generator=g).to(device)
    combined = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    mp.moe_unpermute(combined, out[0], weights, out[3], out[2])
    expected = ref.unpermute(out[0], weights, out[3], int(out[2][-1]))
    torch.testing.assert_close(combined, expected, rtol=1.6e-2, atol=1.6e-2)
