//! The block against candle-transformers' own Qwen3-MoE layer in bf16, on random
//! weights: its `Qwen3SparseMoeBlock` on the CPU and, in a CUDA build, its `FusedMoe`
//! (the block its Qwen3-MoE model runs on CUDA).
//!
//! Both are private to its `Model`, so, as tests/mixtral.rs does, the check runs a
//! one-layer model whose attention adds nothing (`o_proj` is zero): its output is
//! `norm(e + moe(post_attention_layernorm(e)))` for each token's embedding `e`, which the
//! test recomputes with this crate's block.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen3_moe;
use moe_candle::{MoeBlock, SharedScratch};

mod common;
use common::random;

const H: usize = 64;
const I: usize = 96;
const E: usize = 16;
const K: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const EPS: f64 = 1e-6;

fn weights(dev: &Device) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let layer = "model.layers.0";
    let ones = |n: usize| Tensor::ones(n, DType::F32, dev).unwrap();
    w.insert(
        "model.embed_tokens.weight".into(),
        random((H, H), 1.0, 1, dev),
    );
    w.insert(format!("{layer}.input_layernorm.weight"), ones(H));
    let norm = (random((1, H), 0.3, 2, dev) + 1.0)
        .unwrap()
        .squeeze(0)
        .unwrap();
    w.insert(format!("{layer}.post_attention_layernorm.weight"), norm);
    let attn = format!("{layer}.self_attn");
    for (p, rows, seed) in [
        ("q_proj", HEADS * HEAD_DIM, 3),
        ("k_proj", KV_HEADS * HEAD_DIM, 4),
        ("v_proj", KV_HEADS * HEAD_DIM, 5),
    ] {
        w.insert(
            format!("{attn}.{p}.weight"),
            random((rows, H), 0.1, seed, dev),
        );
    }
    w.insert(
        format!("{attn}.o_proj.weight"),
        Tensor::zeros((H, HEADS * HEAD_DIM), DType::F32, dev).unwrap(),
    );
    w.insert(format!("{attn}.q_norm.weight"), ones(HEAD_DIM));
    w.insert(format!("{attn}.k_norm.weight"), ones(HEAD_DIM));
    let mlp = format!("{layer}.mlp");
    w.insert(format!("{mlp}.gate.weight"), random((E, H), 0.5, 6, dev));
    for e in 0..E {
        let seed = 10 + 3 * e as u64;
        for (p, shape, s) in [
            ("gate_proj", (I, H), seed),
            ("up_proj", (I, H), seed + 1),
            ("down_proj", (H, I), seed + 2),
        ] {
            w.insert(
                format!("{mlp}.experts.{e}.{p}.weight"),
                random(shape, 0.2, s, dev),
            );
        }
    }
    w.insert("model.norm.weight".into(), ones(H));
    w
}

#[test]
fn the_block_computes_what_candle_transformers_qwen3_moe_computes_in_bf16() {
    for dev in common::devices() {
        // Built with CUDA, candle-transformers' Qwen3-MoE layer is always its FusedMoe,
        // which runs on CUDA only: its CPU block is checked by the CPU build.
        if cfg!(feature = "cuda") && dev.is_cpu() {
            continue;
        }
        block_against_qwen3_moe(&dev, DType::BF16);
    }
}

fn block_against_qwen3_moe(dev: &Device, dtype: DType) {
    let tensors = weights(dev);
    let get = |name: &str| tensors[name].to_dtype(dtype).unwrap();
    let config: qwen3_moe::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": H, "hidden_size": H, "intermediate_size": 2 * I,
        "num_hidden_layers": 1, "num_attention_heads": HEADS, "head_dim": HEAD_DIM,
        "attention_bias": false, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 64, "sliding_window": null, "max_window_layers": 1,
        "tie_word_embeddings": false, "rope_theta": 1e6, "rms_norm_eps": EPS,
        "use_sliding_window": false, "hidden_act": "silu", "decoder_sparse_step": 1,
        "moe_intermediate_size": I, "num_experts_per_tok": K, "num_experts": E,
        "norm_topk_prob": true
    }))
    .unwrap();
    let vb = VarBuilder::from_tensors(tensors.clone(), dtype, dev);
    let mut model = qwen3_moe::Model::new(&config, vb.clone()).unwrap();

    // 48 one-token sequences (decoding): every token of the vocabulary, some twice.
    let tokens: Vec<u32> = (0..48u32).map(|t| (t * 7) % H as u32).collect();
    let input_ids = Tensor::from_vec(tokens.clone(), (48, 1), dev).unwrap();
    let want = model.forward(&input_ids, 0).unwrap().squeeze(1).unwrap();

    let block = MoeBlock::qwen3_moe(H, I, E, K, true, vb.pp("model.layers.0.mlp"))
        .unwrap()
        .with_scratch(SharedScratch::new());
    let e = get("model.embed_tokens.weight")
        .index_select(&Tensor::new(tokens.as_slice(), dev).unwrap(), 0)
        .unwrap();
    let post_norm =
        candle_nn::RmsNorm::new(get("model.layers.0.post_attention_layernorm.weight"), EPS);
    let final_norm = candle_nn::RmsNorm::new(get("model.norm.weight"), EPS);
    let x = post_norm.forward(&e).unwrap().unsqueeze(1).unwrap();
    let y = block.forward(&x).unwrap().squeeze(1).unwrap();
    assert_eq!(y.dtype(), dtype);
    let got = final_norm.forward(&(&e + y).unwrap()).unwrap();

    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (got, want) = (f32(&got), f32(&want));
    // candle-transformers rounds each weighted expert output and the sum to bf16, this
    // block sums in f32 and rounds once: a few bf16 roundings apart. A token routed to
    // other experts would differ by far more.
    let without = f32(&final_norm.forward(&e).unwrap());
    common::assert_matches_reference(&got, &want, &without, 1.0 / 64.0, &format!("{dev:?}"));
}
