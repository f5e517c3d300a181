"""Memory ceilings for permute's traffic on this GPU, timed with CUDA events.

- copy: a 1 GiB device-to-device copy, one byte read for each byte written;
- fill: 1 GiB written, nothing read;
- broadcast: torch copying each token row to K rows, the bytes permute's scatter moves
  (one read, K writes) without its routing.

A permute of top-K writes K bytes for each byte it reads, so its ceiling lies between
the fill's and the copy's rate (docs/benchmarks.md, "What bounds the large permute").
Run on the GPU machine: ``python3 benches/python/write_ceiling.py > ceiling.json``.
"""

import json

import torch

torch.cuda.init()
dev = torch.device("cuda")
def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) * 1e3)
    ts.sort(); return ts[len(ts) // 2]
out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
us = timed(lambda: b.copy_(a)); out["copy_gb_per_s"] = 2 * n / us / 1e3
us = timed(lambda: b.fill_(7)); out["fill_gb_per_s"] = n / us / 1e3
for name, tokens, hidden, k in [("mixtral", 16384, 4096, 2), ("qwen3-30b-a3b", 16384, 2048, 8), ("dsv3", 16384, 7168, 8)]:
    src = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    dst = torch.empty(tokens, k, hidden, dtype=torch.bfloat16, device=dev)
    us = timed(lambda: dst.copy_(src.unsqueeze(1).expand(tokens, k, hidden)))
    moved = 2 * tokens * hidden * (1 + k)
    out["rows"].append({"shape": name, "tokens": tokens, "k": k, "broadcast_copy_us": us, "gb_per_s": moved / us / 1e3})
    del src, dst
print(json.dumps(out, indent=1))
