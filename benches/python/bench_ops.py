"""Benchmark of moe_permute's ops called from Python, beside the Rust ``moe bench``.

For each shape (mixtral, qwen3-30b-a3b, dsv3: the shapes of ``moe bench``) and token
count it measures microseconds per call of

- ``moe_permute.moe_permute`` with one ``MoEPermuteScratch`` reused by every call,
- ``moe_permute.moe_unpermute`` on the outputs of a permute,
- the same two operations written in plain PyTorch (argsort, index_select, ...), as the
  reference a serving stack would otherwise run,

each two ways: EAGER, a loop of calls from Python timed with CUDA events (so the Python
and dispatch overhead of every call is in the figure: that is what a stack pays outside
CUDA graphs) and GRAPH, the same calls captured into one CUDA graph (as
``torch.cuda.graph`` captures, on its side stream) and replayed. As in ``moe bench``
(crates/moe-cli/src/bench/gpu.rs), the calls rotate over enough input sets that one
round touches at least 3x the L2 cache, so small batches are not timed from L2; all
sets share one scratch, as the layers of a served model do. Figures are the median of 7
timings of one round, per call. Inputs: bf16 rows, int32 ``topk_ids`` (each token picks
K distinct experts uniformly at random), float32 ``topk_weights``.

Before timing, ``check_reference`` checks the plain-PyTorch reference against
moe_permute on a small random case, so a broken reference cannot show a fake speedup.

Run (a GPU when there is one; on the CPU eager only, over a short default sweep)::

    python benches/python/bench_ops.py --json out.json
    python benches/python/bench_ops.py --device cpu --shapes mixtral --tokens 1,32

Prints a markdown table to stdout, progress to stderr, and with ``--json`` writes every
measurement as a row ``{shape, tokens, op, impl, mode, us_per_call}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import moe_permute


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    experts: int
    topk: int


# The shapes and token counts of `moe bench` (crates/moe-cli/src/bench/mod.rs).
SHAPES = (
    Shape("mixtral", 4096, 8, 2),
    Shape("qwen3-30b-a3b", 2048, 128, 8),
    Shape("dsv3", 7168, 256, 8),
)
GPU_TOKENS = (1, 8, 32, 128, 512, 2048, 8192, 16384)
# Short enough to finish in under a minute on 2 cores.
CPU_TOKENS = (1, 32, 512)

SAMPLES = 7
# Calls, and microseconds of work, in one eager timing at most (see `time_impl`).
EAGER_CALLS = 2000
EAGER_US = 20_000
MAX_SETS = 64
MAX_SETS_BYTES = 4 << 30
# When the device does not say (the CPU), an L2 as large as a big GPU's.
DEFAULT_L2_BYTES = 50 << 20
OVERHEAD_TARGET_US = 10.0

IMPLS = ("moe_permute", "torch")
MODES = ("eager", "graph")

# Microseconds per call by (impl, mode); None where not measured or not capturable.
Timings = Dict[Tuple[str, str], Optional[float]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the plain-PyTorch reference -------------------------------------------------------


def torch_permute(
    hidden: torch.Tensor, topk_ids: torch.Tensor, n_expert: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_permute``'s results in plain PyTorch, for ids all in range:
    ``(permuted_hidden_states, expert_first_token_offset int64, inv_permuted_idx int32)``."""
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    # Stable, so one expert's entries keep ascending t*K + k order, as moe_permute's do.
    permuted_idx = torch.argsort(flat, stable=True)
    permuted = hidden.index_select(0, permuted_idx // k)
    # torch.bincount(flat, minlength=n_expert), written as a scatter: bincount's CUDA
    # kernel reads the largest id back to the host to size its output, and that wait
    # cannot be captured in a graph.
    counts = torch.zeros(n_expert, dtype=torch.int64, device=hidden.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    offsets = torch.zeros(n_expert + 1, dtype=torch.int64, device=hidden.device)
    offsets[1:] = torch.cumsum(counts, 0)
    inv = torch.empty(n * k, dtype=torch.int32, device=hidden.device)
    inv.scatter_(0, permuted_idx, torch.arange(n * k, dtype=torch.int32, device=hidden.device))
    return permuted, offsets, inv


def torch_unpermute(
    out: torch.Tensor, permuted: torch.Tensor, topk_weights: torch.Tensor, inv: torch.Tensor
) -> None:
    """``moe_unpermute`` in plain PyTorch, for entries all kept: the weighted sum over k
    in float32, rounded once into ``out``."""
    n, k = topk_weights.shape
    rows = permuted.index_select(0, inv).view(n, k, -1)
    out.copy_((rows.float() * topk_weights.unsqueeze(-1)).sum(dim=1))


# --- inputs ------------------------------------------------------------------------------


@dataclass
class PermuteSet:
    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


@dataclass
class UnpermuteSet:
    out: torch.Tensor
    permuted: torch.Tensor
    topk_weights: torch.Tensor
    inv: torch.Tensor
    offsets: torch.Tensor


def random_set(shape: Shape, n: int, seed: int, device: torch.device) -> PermuteSet:
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.rand(n, shape.hidden, generator=gen, device=device) * 4 - 2
    ids = torch.rand(n, shape.experts, generator=gen, device=device).argsort(dim=1)
    return PermuteSet(
        hidden=hidden.to(torch.bfloat16),
        # Contiguous here, so the timed calls do not copy it.
        topk_ids=ids[:, : shape.topk].to(torch.int32).contiguous(),
        topk_weights=torch.rand(n, shape.topk, generator=gen, device=device),
    )


def unpermute_set(shape: Shape, s: PermuteSet) -> UnpermuteSet:
    # Without a scratch: each set needs outputs of its own, a scratch's are overwritten
    # by its next call.
    permuted, _, offsets, inv, _ = moe_permute.moe_permute(
        s.hidden, None, s.topk_ids, shape.experts
    )
    return UnpermuteSet(torch.empty_like(s.hidden), permuted, s.topk_weights, inv, offsets)


def set_count(shape: Shape, n: int, l2_bytes: int) -> int:
    """Enough input sets that one round touches 3x the L2 cache, at most MAX_SETS and
    about MAX_SETS_BYTES of memory."""
    row = 2 * shape.hidden
    # What one call must move (docs/benchmarks.md): read each row once, write it K
    # times (permute), or the reverse (unpermute).
    touched = row * (1 + shape.topk) * n
    # What one set holds: its rows, their K permuted copies, the unpermute output.
    held = row * (2 + shape.topk) * n + 12 * shape.topk * n
    sets = min(math.ceil(3 * l2_bytes / touched), MAX_SETS, MAX_SETS_BYTES // held)
    return max(sets, 1)


# --- timing --------------------------------------------------------------------------------


def elapsed_us(device: torch.device, work: Callable[[], None]) -> float:
    """Time of ``work``: CUDA events on the current stream, or the host clock on the CPU
    (where the ops finish before they return)."""
    if device.type != "cuda":
        start = time.perf_counter()
        work()
        return (time.perf_counter() - start) * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def us_per_call(device: torch.device, calls: int, work: Callable[[], None]) -> float:
    """Median of SAMPLES timings of ``work`` (after one warm-up), per call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(elapsed_us(device, work) / calls for _ in range(SAMPLES))


def capture(work: Callable[[], None], what: str) -> Optional[torch.cuda.CUDAGraph]:
    """``work`` captured as ``torch.cuda.graph`` captures (on its side stream); None,
    reported, when it cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            work()
    except Exception as error:  # a sync inside the capture, or an argument check
        # torch.cuda.graph leaves its side stream current when ending the capture fails.
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        log(f"  {what}: not capturable ({str(error).splitlines()[0]})")
        return None
    return graph


def time_impl(device: torch.device, calls: int, call: Callable[[int], None], what: str) -> Timings:
    """``call(0..calls)`` from a Python loop, timed eagerly and as a replayed graph."""

    def round_of_calls() -> None:
        for s in range(calls):
            call(s)

    # Eager time at small batch is host time, which the machine's other work disturbs:
    # where a round is short, each eager timing repeats it up to EAGER_CALLS calls or
    # EAGER_US of work, whichever comes first.
    one_round = elapsed_us(device, round_of_calls)
    rounds = max(1, min(math.ceil(EAGER_CALLS / calls), math.ceil(EAGER_US / max(one_round, 1.0))))

    def rounds_of_calls() -> None:
        for _ in range(rounds):
            round_of_calls()

    eager = us_per_call(device, calls * rounds, rounds_of_calls)
    graph_us = None
    if device.type == "cuda":
        graph = capture(round_of_calls, what)
        if graph is not None:
            graph_us = us_per_call(device, calls, graph.replay)
    return {"eager": eager, "graph": graph_us}


def measure(
    device: torch.device,
    calls: int,
    moe_call: Callable[[int], None],
    torch_call: Callable[[int], None],
    what: str,
) -> Timings:
    timings: Timings = {}
    for impl, call in (("moe_permute", moe_call), ("torch", torch_call)):
        for mode, us in time_impl(device, calls, call, f"{what} {impl}").items():
            timings[(impl, mode)] = us
    return timings


def measure_shape_tokens(
    shape: Shape, n: int, device: torch.device, l2_bytes: int, progress: Callable[[str], None]
) -> Dict[str, Timings]:
    """Timings of permute and unpermute at ``n`` tokens of ``shape``, by op."""
    sets = set_count(shape, n, l2_bytes)
    inputs = [random_set(shape, n, n * 1000 + s, device) for s in range(sets)]
    # The scratch owns the permuted rows too (vLLM's Humming-style backends), so a call
    # allocates nothing: what the eager figure then shows is the call's own overhead.
    scratch = moe_permute.MoEPermuteScratch(
        shape.experts, shape.experts, device, max_num_tokens=n, topk=shape.topk,
        hidden_size=shape.hidden, hidden_dtype=torch.bfloat16,
    )
    what = f"{shape.name} N={n}"

    progress(f"{what} permute ({sets} input sets)")
    permute = measure(
        device,
        sets,
        lambda s: moe_permute.moe_permute(
            inputs[s].hidden, None, inputs[s].topk_ids, shape.experts, scratch=scratch
        ),
        lambda s: torch_permute(inputs[s].hidden, inputs[s].topk_ids, shape.experts),
        f"{what} permute",
    )

    progress(f"{what} unpermute ({sets} input sets)")
    routed = [unpermute_set(shape, s) for s in inputs]
    unpermute = measure(
        device,
        sets,
        lambda s: moe_permute.moe_unpermute(
            routed[s].out, routed[s].permuted, routed[s].topk_weights, routed[s].inv,
            routed[s].offsets,
        ),
        lambda s: torch_unpermute(
            routed[s].out, routed[s].permuted, routed[s].topk_weights, routed[s].inv
        ),
        f"{what} unpermute",
    )
    return {"permute": permute, "unpermute": unpermute}


# --- the reference check ------------------------------------------------------------------


def check_reference(device: torch.device) -> None:
    """The plain-PyTorch reference agrees with moe_permute (called as the benchmark
    calls it) on small random cases: permuted rows, offsets and inverse exactly, the
    unpermute output within bf16 tolerance; and both unpermutes give back each token's
    row times the sum of its weights (the experts here being the identity)."""
    exact = {"rtol": 0, "atol": 0}
    for case, shape in enumerate((Shape("small", 64, 8, 2), Shape("small-wide", 96, 32, 8))):
        n = 37
        s = random_set(shape, n, 7 + case, device)
        scratch = moe_permute.MoEPermuteScratch(
            shape.experts, shape.experts, device, max_num_tokens=n, topk=shape.topk
        )
        permuted, _, offsets, inv, _ = moe_permute.moe_permute(
            s.hidden, None, s.topk_ids, shape.experts, scratch=scratch
        )
        ref_permuted, ref_offsets, ref_inv = torch_permute(s.hidden, s.topk_ids, shape.experts)
        valid = int(offsets[-1])
        torch.testing.assert_close(offsets, ref_offsets, **exact)
        torch.testing.assert_close(permuted[:valid], ref_permuted[:valid], **exact)
        torch.testing.assert_close(inv, ref_inv, **exact)

        out = torch.empty_like(s.hidden)
        moe_permute.moe_unpermute(out, permuted, s.topk_weights, inv, offsets)
        ref_out = torch.empty_like(s.hidden)
        torch_unpermute(ref_out, ref_permuted, s.topk_weights, ref_inv)
        torch.testing.assert_close(out, ref_out)
        round_trip = (s.hidden.float() * s.topk_weights.sum(1, keepdim=True)).to(torch.bfloat16)
        torch.testing.assert_close(out, round_trip)
        torch.testing.assert_close(ref_out, round_trip)


# --- report -----------------------------------------------------------------------------------


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def l2_size(device: torch.device) -> int:
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if l2:
            return l2
    return DEFAULT_L2_BYTES


def fmt(us: Optional[float]) -> str:
    return "-" if us is None else f"{us:.1f}"


def ratio(timings: Timings) -> str:
    """torch over moe_permute under graph replay; on the CPU, where there are no graphs,
    the eager ratio, marked."""
    for mode, mark in (("graph", ""), ("eager", " (eager)")):
        ours, theirs = timings[("moe_permute", mode)], timings[("torch", mode)]
        if ours is not None and theirs is not None:
            return f"{theirs / ours:.2f}{mark}"
    return "-"


def print_table(results: Dict[Tuple[str, int, str], Timings]) -> None:
    print("| shape | N | op | moe_permute eager us | moe_permute graph us | torch eager us "
          "| torch graph us | torch/moe_permute (graph) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (shape, n, op), t in results.items():
        cells = [fmt(t[(impl, mode)]) for impl in IMPLS for mode in MODES]
        print(f"| {shape} | {n} | {op} | " + " | ".join(cells) + f" | {ratio(t)} |")
    print(flush=True)


def print_overhead(results: Dict[Tuple[str, int, str], Timings]) -> None:
    """moe_permute's eager per-call time less its graph per-call time at 1 token: what a
    call costs the host beyond its kernels (Python, dispatch, launch)."""
    ones = [(key, t) for key, t in results.items() if key[1] == 1]
    print(f"Eager per-call overhead of moe_permute at 1 token (eager - graph; target "
          f"< {OVERHEAD_TARGET_US:.0f} us):")
    print()
    if not ones:
        print("(not measured: the sweep has no 1-token case)", flush=True)
        return
    print("| shape | op | eager us | graph us | overhead us | under target |")
    print("|---|---|---:|---:|---:|---|")
    for (shape, _, op), t in ones:
        eager, graph = t[("moe_permute", "eager")], t[("moe_permute", "graph")]
        overhead = None if eager is None or graph is None else eager - graph
        verdict = "-" if overhead is None else ("yes" if overhead < OVERHEAD_TARGET_US else "NO")
        print(f"| {shape} | {op} | {fmt(eager)} | {fmt(graph)} | {fmt(overhead)} | {verdict} |")
    if all(t[("moe_permute", "graph")] is None for _, t in ones):
        print()
        print("No graphs here: the eager time per call bounds the overhead from above.")
    print(flush=True)


def json_rows(results: Dict[Tuple[str, int, str], Timings]) -> List[dict]:
    return [
        {"shape": shape, "tokens": n, "op": op, "impl": impl, "mode": mode, "us_per_call": us}
        for (shape, n, op), t in results.items()
        for (impl, mode), us in t.items()
    ]


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                        help="comma list of shapes (default: all)")
    parser.add_argument("--tokens", default=None,
                        help="comma list of token counts (default: %s on a GPU, %s on the CPU)"
                        % (",".join(map(str, GPU_TOKENS)), ",".join(map(str, CPU_TOKENS))))
    parser.add_argument("--json", metavar="PATH", help="write every measurement here as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when there is one)")
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in SHAPES}
    names = [name for name in args.shapes.split(",") if name]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(by_name)}")
    args.shapes = [by_name[name] for name in names]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    if args.tokens is None:
        args.tokens = list(GPU_TOKENS if args.device.type == "cuda" else CPU_TOKENS)
    else:
        args.tokens = [int(n) for n in args.tokens.split(",") if n]
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    l2 = l2_size(device)
    print("# moe_permute ops from Python")
    print()
    print(f"card: {card_name(device)} ({device}); torch {torch.__version__}; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"method: bf16 rows, random routing; median of {SAMPLES} timings of a round of calls "
          f"rotating over input sets that touch >= 3x L2 ({l2 >> 20} MiB); eager: a Python loop "
          f"of calls (CUDA events on a GPU), graph: the loop captured in one CUDA graph, "
          f"replayed; us per call")
    print(flush=True)

    log(f"checking the PyTorch reference against moe_permute on {device}")
    check_reference(device)

    steps = 2 * len(args.shapes) * len(args.tokens)
    step = 0

    def progress(message: str) -> None:
        nonlocal step
        step += 1
        log(f"[{step}/{steps}] {message}")

    results: Dict[Tuple[str, int, str], Timings] = {}
    for shape in args.shapes:
        for n in args.tokens:
            for op, timings in measure_shape_tokens(shape, n, device, l2, progress).items():
                results[(shape.name, n, op)] = timings

    print_table(results)
    print_overhead(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(json_rows(results), out, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
