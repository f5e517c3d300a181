"""Bad input raises the library's typed error, the same on every device; nothing
crashes the interpreter or writes out of bounds."""

import pytest
import torch

import moe_permute as mp
import reference as ref


def inputs(device, tokens=8, hidden=32, topk=2, experts=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = ref.random_rows(tokens, hidden, torch.bfloat16, g).to(device)
    ids = ref.random_ids(tokens, topk, experts, g).to(device)
    return x, ids


def test_errors_are_value_and_runtime_errors():
    assert issubclass(mp.MoeInputError, ValueError)
    assert issubclass(mp.MoeDeviceError, RuntimeError)


@pytest.mark.parametrize(
    "case",
    ["rows_mismatch", "ids_float", "hidden_3d", "topk_zero_experts", "local_above_global",
     "unsupported_dtype", "bad_scales", "out_too_small"],
)
def test_permute_refuses_bad_input(device, case):
    x, ids = inputs(device)
    args = dict(hidden_states=x, a1q_scale=None, topk_ids=ids, n_expert=4)
    if case == "rows_mismatch":
        args["topk_ids"] = ids[:5]
    elif case == "ids_float":
        args["topk_ids"] = ids.float()
    elif case == "hidden_3d":
        args["hidden_states"] = x[None]
    elif case == "topk_zero_experts":
        args["n_expert"] = 0
    elif case == "local_above_global":
        args["n_local_expert"] = 9
    elif case == "unsupported_dtype":
        args["hidden_states"] = x.double()
    elif case == "bad_scales":
        args["a1q_scale"] = torch.ones(3, device=device)
    elif case == "out_too_small":
        args["permuted_hidden_states"] = torch.empty(3, 32, dtype=torch.bfloat16, device=device)
    with pytest.raises(mp.MoeInputError) as error:
        mp.moe_permute(**args)
    assert str(error.value)


def test_tensors_on_two_devices_are_refused(cuda):
    x, ids = inputs(cuda)
    with pytest.raises(mp.MoeInputError, match="device"):
        mp.moe_permute(x, None, ids.cpu(), 4)


def test_unpermute_refuses_bad_input(device):
    x, ids = inputs(device)
    rows, _, offsets, inv, _ = mp.moe_permute(x, None, ids, 4)
    w = torch.rand(8, 2, device=device)
    out = torch.empty(8, 32, dtype=torch.bfloat16, device=device)
    with pytest.raises(mp.MoeInputError):  # weights for 7 tokens, out for 8
        mp.moe_unpermute(out, rows, w[:7], inv, offsets)
    with pytest.raises(mp.MoeInputError):  # out of another type than the rows
        mp.moe_unpermute(out.float(), rows, w, inv, offsets)
    with pytest.raises(mp.MoeInputError, match="contiguous"):
        mp.moe_unpermute(torch.empty(32, 8, dtype=torch.bfloat16, device=device).t(), rows, w, inv, offsets)
    with pytest.raises(mp.MoeInputError, match="overlaps"):
        mp.moe_unpermute(rows[:8], rows, w, inv, offsets)


def test_cpu_reports_bad_values_at_once():
    x, ids = inputs("cpu")
    bad_map = torch.tensor([0, 1, 7, -1], dtype=torch.int32)  # 7 is no local expert
    with pytest.raises(mp.MoeInputError, match="expert_map"):
        mp.moe_permute(x, None, ids, 4, 2, expert_map=bad_map)
    rows, _, offsets, inv, _ = mp.moe_permute(x, None, ids, 4)
    inv = inv.clone()
    inv[3] = -5
    with pytest.raises(mp.MoeInputError, match="inv_permuted_idx"):
        mp.moe_unpermute(torch.empty(8, 32, dtype=torch.bfloat16), rows, torch.rand(8, 2), inv, offsets)


def test_cuda_reports_bad_values_when_checked(cuda):
    """The kernels record what only device memory shows; the caller chooses when to look:
    a scratch's `check`, `check_errors` for unpermute, or checked mode after every call."""
    x, ids = inputs(cuda)
    bad_map = torch.tensor([0, 1, 7, -1], dtype=torch.int32, device=cuda)
    scratch = mp.MoEPermuteScratch(4, 2, cuda)
    mp.moe_permute(x, None, ids, 4, 2, expert_map=bad_map, scratch=scratch)  # queued, no wait
    with pytest.raises(mp.MoeInputError, match="expert_map"):
        scratch.check()
    scratch.check()  # a check clears what it reported

    mp.set_checked(True)
    with pytest.raises(mp.MoeInputError, match="expert_map"):
        mp.moe_permute(x, None, ids, 4, 2, expert_map=bad_map)
    mp.set_checked(False)

    rows, _, offsets, inv, _ = mp.moe_permute(x, None, ids, 4)
    inv = inv.clone()
    inv[3] = -5
    out = torch.empty(8, 32, dtype=torch.bfloat16, device=cuda)
    mp.moe_unpermute(out, rows, torch.rand(8, 2, device=cuda), inv, offsets)
    with pytest.raises(mp.MoeInputError, match="inv_permuted_idx"):
        mp.check_errors(cuda)
    mp.check_errors(cuda)


def test_scratch_cannot_grow_while_capturing(cuda):
    x, ids = inputs(cuda, tokens=64)
    scratch = mp.MoEPermuteScratch(4, 4, cuda, max_num_tokens=8, topk=2)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(mp.MoeDeviceError, match="before capturing"):
        with torch.cuda.graph(graph):
            mp.moe_permute(x, None, ids, 4, scratch=scratch)


def test_scratch_refuses_a_call_for_other_experts(device):
    x, ids = inputs(device)
    scratch = mp.MoEPermuteScratch(8, 8, device)
    with pytest.raises(mp.MoeInputError, match="experts"):
        mp.moe_permute(x, None, ids, 4, scratch=scratch)


def test_huge_sizes_are_refused_not_allocated():
    with pytest.raises(mp.MoeInputError):
        mp.MoEPermuteScratch(4, 4, "cpu", max_num_tokens=2**62, topk=8)
    with pytest.raises(mp.MoeInputError):
        mp._native.align_sorted_len(2**62, 8, 4, 16)
