"""The ops inside torch.compile(fullgraph=True): no graph break, same results."""

import pytest
import torch

import moe_permute as mp
import reference as ref


def moe_layer(x, ids, w, scratch, experts):
    rows, _, offsets, inv, _ = mp.moe_permute(x, None, ids, experts, scratch=scratch)
    expert_out = rows * 2 + 1  # stands for the experts' GEMMs
    out = torch.empty_like(x)
    mp.moe_unpermute(out, expert_out, w, inv, offsets)
    return out, offsets


@pytest.mark.parametrize("backend", ["default", "aot_eager"])
@pytest.mark.parametrize("with_scratch", [False, True], ids=["fresh", "scratch"])
def test_compiled_layer_matches_eager(device, with_scratch, backend):
    torch._dynamo.reset()
    tokens, hidden, topk, experts = 24, 64, 2, 8
    scratch = mp.MoEPermuteScratch(experts, experts, device, max_num_tokens=tokens, topk=topk) \
        if with_scratch else None
    # "default": inductor on the GPU; on the CPU aot_eager (inductor's CPU backend
    # compiles C++, minutes on a 2-core CI machine). aot_eager does not re-inplace, so
    # the ops are handed copies of the scratch's workspace (functionalization).
    if backend == "default":
        backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(moe_layer, fullgraph=True, backend=backend)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = ref.random_rows(tokens, hidden, torch.bfloat16, g).to(device)
        ids = ref.random_ids(tokens, topk, experts, g).to(device)
        w = torch.rand(tokens, topk, generator=g).to(device)
        got, got_offsets = compiled(x, ids, w, scratch, experts)
        want, want_offsets = moe_layer(x, ids, w, scratch, experts)
        assert torch.equal(got_offsets, want_offsets)
        assert torch.equal(got, want)


def test_fake_tensors_trace_the_ops():
    """The ops' fake implementations let torch.export/fake-mode tracing through."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 32, dtype=torch.bfloat16)
        ids = torch.empty(8, 2, dtype=torch.int32)
        rows, _, offsets, inv, idx = mp.moe_permute(x, None, ids, 4)
        assert rows.shape == (16, 32) and offsets.shape == (5,) and inv.shape == (16,)
