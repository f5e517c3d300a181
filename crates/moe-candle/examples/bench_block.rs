//! Times moe-candle's `MoeBlock` against candle-transformers' MoE blocks on one CUDA
//! device, bf16, on random weights of real models' shapes.
//!
//! The contenders, on the same weights and inputs:
//! - `moe-candle`: this crate's `MoeBlock` (host top-k, permute, a candle matmul per
//!   expert over its contiguous rows, unpermute);
//! - `ct-fused`: candle-transformers' `FusedMoe`, the block its Qwen3-MoE model runs
//!   on CUDA (device top-k, sort, two fused grouped GEMM kernels), the faster of its
//!   decode and prefill kernels at each size;
//! - `ct-loop`: the algorithm of candle-transformers' Mixtral and Qwen3 sparse blocks,
//!   whose type is private: routing read on the host, then per expert an
//!   `index_select` of its tokens, the MLP, the weights multiplied in, an `index_add`.
//!
//! Usage: `bench_block [--tokens 1,8,32,128,512,2048] [--json PATH]`. Each point is the
//! mean of repeated calls after warm-up, inputs rotated among four tensors, with the
//! device synchronised around the timed loop.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::fused_moe::{FusedMoe, MoeCfg};
use moe_candle::{MoeBlock, SharedScratch};

/// A model's MoE layer shape.
struct Shape {
    name: &'static str,
    hidden: usize,
    intermediate: usize,
    experts: usize,
    topk: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "Mixtral-8x7B",
        hidden: 4096,
        intermediate: 14336,
        experts: 8,
        topk: 2,
    },
    Shape {
        name: "Qwen3-30B-A3B",
        hidden: 2048,
        intermediate: 768,
        experts: 128,
        topk: 8,
    },
];

/// The layer's weights under Qwen3-MoE's names, which all three contenders load.
fn weights(shape: &Shape, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let (h, i) = (shape.hidden, shape.intermediate);
    let mut w = HashMap::new();
    // Router weights large enough that routing is not uniform noise.
    let gate = Tensor::randn(0f32, 0.5, (shape.experts, h), dev)?;
    w.insert("gate.weight".to_string(), gate.to_dtype(DType::BF16)?);
    for e in 0..shape.experts {
        for (name, dims) in [
            ("gate_proj", (i, h)),
            ("up_proj", (i, h)),
            ("down_proj", (h, i)),
        ] {
            let t = Tensor::randn(0f32, 0.02, dims, dev)?.to_dtype(DType::BF16)?;
            w.insert(format!("experts.{e}.{name}.weight"), t);
        }
    }
    Ok(w)
}

/// candle-transformers' sparse-block algorithm (see the module's docs).
struct LoopBlock {
    gate: Tensor,
    experts: Vec<[Tensor; 3]>,
    topk: usize,
}

impl LoopBlock {
    fn new(shape: &Shape, w: &HashMap<String, Tensor>) -> Self {
        let expert = |e: usize, name: &str| w[&format!("experts.{e}.{name}.weight")].clone();
        Self {
            gate: w["gate.weight"].clone(),
            experts: (0..shape.experts)
                .map(|e| {
                    [
                        expert(e, "gate_proj"),
                        expert(e, "up_proj"),
                        expert(e, "down_proj"),
                    ]
                })
                .collect(),
            topk: shape.topk,
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let xs = xs.reshape((b * s, h))?;
        let logits = xs.matmul(&self.gate.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut tokens = vec![Vec::<u32>::new(); self.experts.len()];
        let mut token_weights = vec![Vec::<f32>::new(); self.experts.len()];
        for (t, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let total: f32 = order[..self.topk].iter().map(|&e| p[e]).sum();
            for &e in &order[..self.topk] {
                tokens[e].push(t as u32);
                token_weights[e].push(p[e] / total);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (e, [w1, w3, w2]) in self.experts.iter().enumerate() {
            if tokens[e].is_empty() {
                continue;
            }
            let n = tokens[e].len();
            let index = Tensor::new(tokens[e].as_slice(), xs.device())?;
            let x = xs.index_select(&index, 0)?;
            let act = (candle_nn::ops::silu(&x.matmul(&w1.t()?)?)? * x.matmul(&w3.t()?)?)?;
            let weight = Tensor::from_vec(token_weights[e].clone(), (n, 1), xs.device())?
                .to_dtype(xs.dtype())?;
            let out = act.matmul(&w2.t()?)?.broadcast_mul(&weight)?;
            ys = ys.index_add(&index, &out, 0)?;
        }
        ys.reshape((b, s, h))
    }
}

/// Mean microseconds per call of `f` over rotated inputs.
fn time(
    dev: &Device,
    inputs: &[Tensor],
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<f64> {
    for x in inputs {
        f(x)?;
    }
    dev.synchronize()?;
    // About 0.3 s per point, at least 8 calls.
    let start = Instant::now();
    f(&inputs[0])?;
    dev.synchronize()?;
    let once = start.elapsed().as_secs_f64();
    let calls = ((0.3 / once) as usize).clamp(8, 2000);
    let start = Instant::now();
    for c in 0..calls {
        f(&inputs[c % inputs.len()])?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / calls as f64 * 1e6)
}

/// The largest relative L2 difference of a token's output between two contenders.
fn worst_token_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let h = a.dim(D::Minus1)?;
    let (a, b) = (a.reshape(((), h))?, b.reshape(((), h))?);
    let norm = |t: &Tensor| t.sqr()?.sum(D::Minus1)?.sqrt();
    let rel = (norm(&(&a - &b)?)? / (norm(&b)? + 1e-6)?)?;
    rel.max(0)?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let mut tokens = vec![1usize, 8, 32, 128, 512, 2048];
    let mut json_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tokens" => {
                let list = args.next().unwrap_or_default();
                tokens = list
                    .split(',')
                    .map(|t| t.trim().parse().map_err(candle_core::Error::wrap))
                    .collect::<Result<_>>()?;
            }
            "--json" => json_path = args.next(),
            other => candle_core::bail!("unknown argument {other}; see the example's docs"),
        }
    }
    let dev = Device::new_cuda(0)?;
    let mut rows = Vec::new();
    println!(
        "| shape | N | moe-candle us | ct-fused us | ct-loop us | vs fused | vs loop | max token diff (fused, loop) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for shape in &SHAPES {
        eprintln!("{}: making weights", shape.name);
        let w = weights(shape, &dev)?;
        let vb = VarBuilder::from_tensors(w.clone(), DType::BF16, &dev);
        let ours = MoeBlock::qwen3_moe(
            shape.hidden,
            shape.intermediate,
            shape.experts,
            shape.topk,
            true,
            vb.clone(),
        )?
        .with_scratch(SharedScratch::new());
        let cfg = MoeCfg {
            hidden_size: shape.hidden,
            num_experts: shape.experts,
            num_experts_per_tok: shape.topk,
            moe_intermediate_size: shape.intermediate,
            norm_topk_prob: true,
            act: Activation::Silu,
            decoder_sparse_step: None,
        };
        let fused = FusedMoe::new(&cfg, vb, DType::BF16)?;
        let looped = LoopBlock::new(shape, &w);
        for &n in &tokens {
            eprintln!("{}: {n} tokens", shape.name);
            let inputs = (0..4)
                .map(|_| {
                    Tensor::randn(0f32, 1.0, (1, n, shape.hidden), &dev)?.to_dtype(DType::BF16)
                })
                .collect::<Result<Vec<_>>>()?;
            // A contender that fails at a size is reported, not fatal.
            let y_ours = ours.forward(&inputs[0])?;
            let y_fused = fused.forward(&inputs[0], n > 1);
            let y_loop = looped.forward(&inputs[0])?;
            let diff_fused = match &y_fused {
                Ok(y) => Some(worst_token_difference(&y_ours, y)?),
                Err(e) => {
                    eprintln!("{}: ct-fused fails at {n} tokens: {e}", shape.name);
                    None
                }
            };
            let diff_loop = worst_token_difference(&y_ours, &y_loop)?;
            let t_ours = time(&dev, &inputs, |x| ours.forward(x))?;
            let (t_fused_decode, t_fused_prefill) = match diff_fused {
                Some(_) => (
                    time(&dev, &inputs, |x| fused.forward(x, false)).ok(),
                    time(&dev, &inputs, |x| fused.forward(x, true)).ok(),
                ),
                None => (None, None),
            };
            let t_fused = match (t_fused_decode, t_fused_prefill) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let t_loop = time(&dev, &inputs, |x| looped.forward(x))?;
            let show = |t: Option<f64>| t.map_or("fails".to_string(), |t| format!("{t:.0}"));
            let ratio =
                |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{:.2}x", t / t_ours));
            println!(
                "| {} | {n} | {t_ours:.0} | {} | {t_loop:.0} | {} | {:.2}x | {}, {diff_loop:.4} |",
                shape.name,
                show(t_fused),
                ratio(t_fused),
                t_loop / t_ours,
                diff_fused.map_or("-".to_string(), |d| format!("{d:.4}")),
            );
            rows.push(serde_json::json!({
                "shape": shape.name, "tokens": n,
                "moe_candle_us": t_ours, "ct_fused_us": t_fused,
                "ct_fused_decode_us": t_fused_decode, "ct_fused_prefill_us": t_fused_prefill,
                "ct_loop_us": t_loop,
                "max_token_rel_diff_fused": diff_fused, "max_token_rel_diff_loop": diff_loop,
            }));
        }
    }
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&rows).map_err(candle_core::Error::wrap)?;
        std::fs::write(&path, text + "\n").map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}
