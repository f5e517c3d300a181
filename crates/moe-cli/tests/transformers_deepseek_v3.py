"""`moe run` (CPU) against transformers' own DeepseekV3MoE on one random layer.

Not part of `cargo test` (it needs torch and transformers): run it where they are,
with the path of a built `moe` (its files go to a temporary directory):

    python crates/moe-cli/tests/transformers_deepseek_v3.py target/release/moe

It writes the layer as a DeepSeek-V3 checkpoint stores it (per-expert tensors, the
score correction in f32, the shared expert), transformers' config.json and 50 random
tokens, runs `moe run`, and prints how many tokens' routing agrees, the relative error
of the output and the largest routing-weight difference.
"""
import json, os, subprocess, sys, tempfile, torch
from safetensors.torch import save_file, load_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

moe_binary = os.path.abspath(sys.argv[1])
os.chdir(tempfile.mkdtemp(prefix="moe-dsv3-"))
torch.manual_seed(0)
cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_group=4,
                       topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
                       routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu")
moe = DeepseekV3MoE(cfg)
with torch.no_grad():
    for p in moe.parameters():
        p.normal_(0, 0.2)
    moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
moe = moe.to(torch.bfloat16)
moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
P = "model.layers.3.mlp"
t = {f"{P}.gate.weight": moe.gate.weight.data.contiguous(),
     f"{P}.gate.e_score_correction_bias": moe.gate.e_score_correction_bias.data.float().contiguous()}
I = cfg.moe_intermediate_size
for e in range(cfg.n_routed_experts):
    gu = moe.experts.gate_up_proj.data[e]
    t[f"{P}.experts.{e}.gate_proj.weight"] = gu[:I].contiguous()
    t[f"{P}.experts.{e}.up_proj.weight"] = gu[I:].contiguous()
    t[f"{P}.experts.{e}.down_proj.weight"] = moe.experts.down_proj.data[e].contiguous()
for n in ("gate_proj", "up_proj", "down_proj"):
    t[f"{P}.shared_experts.{n}.weight"] = getattr(moe.shared_experts, n).weight.data.contiguous()
save_file(t, "w.safetensors")
json.dump(cfg.to_dict(), open("config.json", "w"))
x = torch.randn(50, 64).to(torch.bfloat16)
save_file({"hidden_states": x}, "x.safetensors")
with torch.no_grad():
    want = moe(x[None])[0].float()
    _, tw, ti = moe.gate(x)
r = subprocess.run([moe_binary, "run", "--weights", "w.safetensors", "--prefix", "model.layers.3",
                    "--input", "x.safetensors", "--output", "y.safetensors", "--device", "cpu"],
                   capture_output=True, text=True)
print(r.stdout.strip(), r.stderr.strip())
y = load_file("y.safetensors")
got = y["hidden_states"].float()
same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(y["topk_ids"], ti))
print(f"routing agrees on {same}/{len(x)} tokens")
print("relative error", ((got - want).norm() / want.norm()).item())
# weights by id
gw = {(t_, int(i)): float(w) for t_ in range(len(x)) for i, w in zip(y["topk_ids"][t_], y["topk_weights"][t_])}
tw_ = {(t_, int(i)): float(w) for t_ in range(len(x)) for i, w in zip(ti[t_], tw[t_])}
print("max weight difference", max(abs(gw[k] - tw_.get(k, 0)) for k in gw))
