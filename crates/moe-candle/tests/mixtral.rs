//! The block against candle-transformers' own Mixtral, on random weights.
//!
//! candle-transformers keeps its `SparseMoeBlock` private, so the check goes through
//! its whole `Model` with one layer whose attention adds nothing (`o_proj` is zero)
//! and an identity `lm_head`: the model's output is then
//! `norm(e + moe(post_attention_layernorm(e)))` for each token's embedding `e`, which
//! the test recomputes with this crate's block in place of Mixtral's.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral;
use moe_candle::{MoeBlock, SharedScratch};

mod common;
use common::random;

const H: usize = 64;
const I: usize = 96;
const E: usize = 8;
const K: usize = 2;

fn weights(dev: &Device) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let layer = "model.layers.0";
    let mut put = |name: String, t: Tensor| {
        w.insert(name, t);
    };
    put(
        "model.embed_tokens.weight".into(),
        random((H, H), 1.0, 1, dev),
    );
    put(
        format!("{layer}.input_layernorm.weight"),
        Tensor::ones(H, DType::F32, dev).unwrap(),
    );
    let norm = (random((1, H), 0.3, 2, dev) + 1.0)
        .unwrap()
        .squeeze(0)
        .unwrap();
    put(format!("{layer}.post_attention_layernorm.weight"), norm);
    for (p, seed) in [("q_proj", 3), ("k_proj", 4), ("v_proj", 5)] {
        let rows = if p == "q_proj" { H } else { H / 2 };
        put(
            format!("{layer}.self_attn.{p}.weight"),
            random((rows, H), 0.1, seed, dev),
        );
    }
    put(
        format!("{layer}.self_attn.o_proj.weight"),
        Tensor::zeros((H, H), DType::F32, dev).unwrap(),
    );
    let moe = format!("{layer}.block_sparse_moe");
    put(format!("{moe}.gate.weight"), random((E, H), 0.5, 6, dev));
    for e in 0..E {
        let seed = 10 + 3 * e as u64;
        put(
            format!("{moe}.experts.{e}.w1.weight"),
            random((I, H), 0.2, seed, dev),
        );
        put(
            format!("{moe}.experts.{e}.w3.weight"),
            random((I, H), 0.2, seed + 1, dev),
        );
        put(
            format!("{moe}.experts.{e}.w2.weight"),
            random((H, I), 0.2, seed + 2, dev),
        );
    }
    put(
        "model.norm.weight".into(),
        Tensor::ones(H, DType::F32, dev).unwrap(),
    );
    put(
        "lm_head.weight".into(),
        Tensor::eye(H, DType::F32, dev).unwrap(),
    );
    w
}

#[test]
fn the_block_computes_what_candle_transformers_mixtral_computes() {
    for dev in common::devices() {
        // f32 only: candle-transformers 0.11.1's Mixtral block multiplies its bf16
        // expert outputs by f32 routing weights and fails in bf16 ("dtype mismatch in
        // mul"); tests/qwen3_moe.rs compares in bf16.
        block_against_mixtral(&dev, DType::F32);
    }
}

/// Each token's relative L2 distance from candle-transformers' Mixtral, in `dtype`.
fn block_against_mixtral(dev: &Device, dtype: DType) {
    let tensors = weights(dev);
    let get = |name: &str| tensors[name].to_dtype(dtype).unwrap();
    let config: mixtral::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": H, "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "sliding_window": 64, "num_experts_per_tok": K,
        "num_local_experts": E, "use_flash_attn": false
    }))
    .unwrap();
    let vb = VarBuilder::from_tensors(tensors.clone(), dtype, dev);
    let mut model = mixtral::Model::new(&config, vb.clone()).unwrap();

    // 48 one-token sequences: every token of the vocabulary, some twice.
    let tokens: Vec<u32> = (0..48u32).map(|t| (t * 7) % H as u32).collect();
    let input_ids = Tensor::from_vec(tokens.clone(), (48, 1), dev).unwrap();
    let want = model.forward(&input_ids, 0).unwrap().squeeze(1).unwrap();

    let block = MoeBlock::mixtral(H, I, E, K, vb.pp("model.layers.0.block_sparse_moe"))
        .unwrap()
        .with_scratch(SharedScratch::new());
    let e = get("model.embed_tokens.weight")
        .index_select(&Tensor::new(tokens.as_slice(), dev).unwrap(), 0)
        .unwrap();
    let post_norm =
        candle_nn::RmsNorm::new(get("model.layers.0.post_attention_layernorm.weight"), 1e-5);
    let final_norm = candle_nn::RmsNorm::new(get("model.norm.weight"), 1e-5);
    // The model's [B, S, H] shape, as a decoder layer calls the block.
    let x = post_norm.forward(&e).unwrap().unsqueeze(1).unwrap();
    let y = block.forward(&x).unwrap().squeeze(1).unwrap();
    assert_eq!(y.dtype(), dtype);
    let got = final_norm.forward(&(&e + y).unwrap()).unwrap();

    let (got, want) = (
        got.to_dtype(DType::F32).unwrap(),
        want.to_dtype(DType::F32).unwrap(),
    );
    // f32: the same arithmetic but the order of the sum. bf16: Mixtral rounds each
    // weighted expert output and its running sum to bf16, this block sums in f32 and
    // rounds once; a token routed to other experts would differ by far more.
    let tolerance = if dtype == DType::F32 {
        1e-5
    } else {
        1.0 / 64.0
    };
    let without = final_norm
        .forward(&e)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    common::assert_matches_reference(
        &got,
        &want,
        &without,
        tolerance,
        &format!("{dev:?} {dtype:?}"),
    );
}

#[test]
fn the_qwen3_moe_names_load_the_same_layer() {
    for dev in common::devices() {
        qwen3_names(&dev);
    }
}

fn qwen3_names(dev: &Device) {
    let tensors = weights(dev);
    let mixtral_prefix = "model.layers.0.block_sparse_moe";
    let mut qwen = HashMap::new();
    for (name, t) in &tensors {
        if let Some(rest) = name.strip_prefix(mixtral_prefix) {
            let rest = rest
                .replace(".w1.", ".gate_proj.")
                .replace(".w3.", ".up_proj.")
                .replace(".w2.", ".down_proj.");
            qwen.insert(format!("model.layers.0.mlp{rest}"), t.clone());
        }
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);
    let qvb = VarBuilder::from_tensors(qwen, DType::F32, dev);
    let mixtral = MoeBlock::mixtral(H, I, E, K, vb.pp(mixtral_prefix)).unwrap();
    let xs = random((20, H), 1.0, 99, dev);
    let want = mixtral.forward(&xs).unwrap();
    for norm in [true, false] {
        let q = MoeBlock::qwen3_moe(H, I, E, K, norm, qvb.pp("model.layers.0.mlp")).unwrap();
        let diff = (q.forward(&xs).unwrap() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Renormalised, it is Mixtral's block; without, the weights sum below 1.
        assert_eq!(diff == 0.0, norm, "norm_topk_prob {norm}: {diff}");
    }
    // A missing expert tensor is an error naming it.
    let error = MoeBlock::qwen3_moe(H, I, E + 1, K, true, qvb.pp("model.layers.0.mlp"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("experts.8"), "{error}");
}
