//! Loading one MoE layer from a Hugging Face safetensors checkpoint, in both layouts
//! and both dtypes, and the errors a bad checkpoint gives.

use half::bf16;
use moe_experts::{ExpertsError, Layout, MoeConfig, MoeWeights, Routing};
use safetensors::{Dtype, tensor::TensorView};

const CONFIG: MoeConfig = MoeConfig {
    hidden_size: 16,
    intermediate_size: 24,
    num_experts: 4,
    top_k: 2,
    norm_topk_prob: true,
    routing: Routing::Softmax,
    shared_intermediate_size: 0,
};

/// A checkpoint holding `weights` under `prefix` in `layout`, as bf16 or f32, with
/// an unrelated tensor beside it. `skip` leaves one tensor out; `reshape` gives one a
/// wrong shape.
fn checkpoint(
    weights: &MoeWeights,
    layout: Layout,
    prefix: &str,
    f32_values: bool,
    skip: Option<&str>,
    reshape: Option<&str>,
) -> Vec<u8> {
    let (h, i) = (weights.hidden_size, weights.intermediate_size);
    let mut tensors: Vec<(String, Vec<usize>, &[bf16])> = vec![(
        layout.router(prefix),
        vec![weights.num_experts, h],
        &weights.router,
    )];
    for e in 0..weights.num_experts {
        let [gate, up, down] = layout.expert(prefix, e);
        tensors.push((gate, vec![i, h], &weights.gate_proj[e * i * h..][..i * h]));
        tensors.push((up, vec![i, h], &weights.up_proj[e * i * h..][..i * h]));
        tensors.push((down, vec![h, i], &weights.down_proj[e * h * i..][..h * i]));
    }
    let other = [bf16::ONE; 4];
    tensors.push(("model.embed_tokens.weight".into(), vec![2, 2], &other));
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .filter(|(name, ..)| Some(name.as_str()) != skip)
        .map(|(name, mut shape, values)| {
            if Some(name.as_str()) == reshape {
                shape.reverse();
            }
            let (dtype, bytes) = if f32_values {
                let bytes = values
                    .iter()
                    .flat_map(|v| v.to_f32().to_le_bytes())
                    .collect();
                (Dtype::F32, bytes)
            } else {
                (
                    Dtype::BF16,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            };
            (name, shape, dtype, bytes)
        })
        .collect();
    let views = encoded.iter().map(|(name, shape, dtype, bytes)| {
        (
            name.clone(),
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn both_layouts_and_dtypes_load_the_same_weights() {
    let weights = MoeWeights::random(&CONFIG, 3).unwrap();
    for layout in [Layout::Mixtral, Layout::QwenMoe] {
        for f32_values in [false, true] {
            let bytes = checkpoint(&weights, layout, "model.layers.7", f32_values, None, None);
            let (loaded, found) = MoeWeights::from_safetensors(&bytes, "model.layers.7").unwrap();
            assert_eq!(found, layout);
            loaded.check(&CONFIG).unwrap();
            assert_eq!(loaded.router, weights.router);
            assert_eq!(loaded.gate_proj, weights.gate_proj);
            assert_eq!(loaded.up_proj, weights.up_proj);
            assert_eq!(loaded.down_proj, weights.down_proj);
        }
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let weights = MoeWeights::random(&CONFIG, 4).unwrap();
    let missing = "model.layers.0.mlp.experts.2.up_proj.weight";
    let bytes = checkpoint(
        &weights,
        Layout::QwenMoe,
        "model.layers.0",
        false,
        Some(missing),
        None,
    );
    match MoeWeights::from_safetensors(&bytes, "model.layers.0").unwrap_err() {
        ExpertsError::MissingTensor { name, layout } => {
            assert_eq!((name.as_str(), layout), (missing, "Qwen-MoE"));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_misshapen_tensor_is_named_with_its_expected_shape() {
    let weights = MoeWeights::random(&CONFIG, 5).unwrap();
    let bad = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let bytes = checkpoint(
        &weights,
        Layout::Mixtral,
        "model.layers.1",
        false,
        None,
        Some(bad),
    );
    let error = MoeWeights::from_safetensors(&bytes, "model.layers.1").unwrap_err();
    match &error {
        ExpertsError::TensorShape {
            name,
            expected,
            got,
        } => {
            assert_eq!(name, bad);
            assert_eq!(expected, &vec![16, 24]);
            assert_eq!(got, &vec![24, 16]);
        }
        other => panic!("{other}"),
    }
    assert!(error.to_string().contains(bad) && error.to_string().contains("[16, 24]"));
}

#[test]
fn a_prefix_without_a_moe_layer_is_an_error() {
    let weights = MoeWeights::random(&CONFIG, 6).unwrap();
    let bytes = checkpoint(
        &weights,
        Layout::Mixtral,
        "model.layers.1",
        false,
        None,
        None,
    );
    assert!(matches!(
        MoeWeights::from_safetensors(&bytes, "model.layers.2").unwrap_err(),
        ExpertsError::NoMoeLayer { .. }
    ));
    assert!(matches!(
        MoeWeights::from_safetensors(b"not a checkpoint", "model.layers.1").unwrap_err(),
        ExpertsError::Format(_)
    ));
}

#[test]
fn sizes_in_a_header_reserve_nothing_before_every_tensor_is_found() {
    // 2^20 experts of hidden size 1 and an expert 0 of intermediate size 2^20: an 8 MiB
    // file whose header implies 2^40 values per projection (2 TiB each). Reserving
    // them would abort the process; expert 1 is missing, and that is the error.
    const BIG: usize = 1 << 20;
    let values = vec![0u8; 2 * BIG];
    let layout = Layout::QwenMoe;
    let prefix = "model.layers.0";
    let [gate, up, down] = layout.expert(prefix, 0);
    let tensors = [
        (layout.router(prefix), vec![BIG, 1]),
        (gate, vec![BIG, 1]),
        (up, vec![BIG, 1]),
        (down, vec![1, BIG]),
    ];
    let views = tensors.iter().map(|(name, shape)| {
        let view = TensorView::new(Dtype::BF16, shape.clone(), &values).unwrap();
        (name.clone(), view)
    });
    let bytes = safetensors::serialize(views, None).unwrap();
    match MoeWeights::from_safetensors(&bytes, prefix).unwrap_err() {
        ExpertsError::MissingTensor { name, .. } => {
            assert_eq!(name, layout.expert(prefix, 1)[0]);
        }
        other => panic!("{other}"),
    }
}

/// `bytes` with tensors `extra` (4 bf16 values each) added.
fn with_extra(bytes: &[u8], extra: &[&str]) -> Vec<u8> {
    let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let values = [0u8; 8];
    let mut views: Vec<(String, TensorView<'_>)> = file.tensors();
    for name in extra {
        let view = TensorView::new(Dtype::BF16, vec![4], &values).unwrap();
        views.push((name.to_string(), view));
    }
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn tensors_the_block_would_ignore_are_refused_by_name() {
    // A Qwen2-MoE layer has a gated shared expert, a quantised one scales; Mixtral has
    // no extra tensors, so anything else is refused. (DeepSeek-V3's correction and
    // shared experts are read: `a_deepseek_v3_layer_loads_...`.)
    let weights = MoeWeights::random(&CONFIG, 8).unwrap();
    let cases = [
        (
            Layout::QwenMoe,
            "model.layers.3.mlp.shared_expert.gate_proj.weight",
        ),
        (Layout::QwenMoe, "model.layers.3.mlp.gate.bias"),
        (
            Layout::QwenMoe,
            "model.layers.3.mlp.shared_expert_gate.weight",
        ),
        (
            Layout::QwenMoe,
            "model.layers.3.mlp.experts.4.up_proj.weight",
        ),
        (
            Layout::QwenMoe,
            "model.layers.3.mlp.experts.1.up_proj.weight_scale_inv",
        ),
        (Layout::Mixtral, "model.layers.3.block_sparse_moe.gate.bias"),
    ];
    for (layout, extra) in cases {
        let bytes = checkpoint(&weights, layout, "model.layers.3", false, None, None);
        let bytes = with_extra(&bytes, &[extra]);
        match MoeWeights::from_safetensors(&bytes, "model.layers.3").unwrap_err() {
            ExpertsError::UnsupportedTensor { name, .. } => assert_eq!(name, extra),
            other => panic!("{extra}: {other}"),
        }
    }
    // Tensors of other layers or modules are not this layer's business.
    let bytes = checkpoint(
        &weights,
        Layout::QwenMoe,
        "model.layers.3",
        false,
        None,
        None,
    );
    let bytes = with_extra(
        &bytes,
        &[
            "model.layers.4.mlp.shared_experts.up_proj.weight",
            "model.layers.3.self_attn.q_proj.weight",
        ],
    );
    MoeWeights::from_safetensors(&bytes, "model.layers.3").unwrap();
}

/// A fresh directory under the target directory's temp space.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-checkpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `bytes`' tensors into a sharded checkpoint in `dir`: tensors whose name sorts
/// before `split` to shard 1, the rest to shard 2, a third shard for another layer, and
/// the index naming them all.
fn write_sharded(dir: &std::path::Path, bytes: &[u8], split: &str) {
    let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (first, second): (Vec<_>, Vec<_>) = file
        .tensors()
        .into_iter()
        .partition(|(name, _)| name.as_str() < split);
    let mut map = serde_json::Map::new();
    for (shard, tensors) in [
        ("model-00001-of-00003.safetensors", first),
        ("model-00002-of-00003.safetensors", second),
    ] {
        for (name, _) in &tensors {
            map.insert(name.clone(), shard.into());
        }
        safetensors::serialize_to_file(tensors, None, &dir.join(shard)).unwrap();
    }
    map.insert(
        "model.layers.9.mlp.gate.weight".into(),
        "model-00003-of-00003.safetensors".into(),
    );
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(moe_experts::INDEX_FILE), index.to_string()).unwrap();
}

#[test]
fn a_layer_split_across_shards_loads_from_the_directory_or_its_index() {
    let weights = MoeWeights::random(&CONFIG, 9).unwrap();
    for layout in [Layout::Mixtral, Layout::QwenMoe] {
        let dir = temp_dir(layout.name());
        let bytes = checkpoint(&weights, layout, "model.layers.3", false, None, None);
        // Experts 0-1 in one shard, 2-3 and the router in the other.
        let split = layout.expert("model.layers.3", 2)[0].clone();
        write_sharded(&dir, &bytes, &split);
        let module = layout.module("model.layers.3");
        for (path, prefix) in [
            (dir.clone(), "model.layers.3"),
            (
                dir.join(moe_experts::INDEX_FILE),
                module.trim_end_matches('.'),
            ),
        ] {
            // Shard 3 does not exist: it is never opened, since it holds another layer.
            let (loaded, found) = MoeWeights::load(&path, prefix).unwrap();
            assert_eq!(found, layout);
            assert_eq!(loaded.router, weights.router);
            assert_eq!(loaded.gate_proj, weights.gate_proj);
            assert_eq!(loaded.down_proj, weights.down_proj);
        }
        // A shard the layer needs that is missing is named.
        std::fs::remove_file(dir.join("model-00001-of-00003.safetensors")).unwrap();
        let error = MoeWeights::load(&dir, "model.layers.3").unwrap_err();
        assert!(
            error.to_string().contains("model-00001-of-00003"),
            "{error}"
        );
        // A layer the index does not hold.
        assert!(matches!(
            MoeWeights::load(&dir, "model.layers.5").unwrap_err(),
            ExpertsError::NoMoeLayer { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_deepseek_v3_layer_loads_its_correction_and_shared_expert() {
    let config = MoeConfig {
        routing: Routing::Grouped(moe_experts::GroupedRouting {
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 2.0,
        }),
        shared_intermediate_size: 8,
        ..CONFIG
    };
    let weights = MoeWeights::random(&config, 12).unwrap();
    let prefix = "model.layers.3";
    let bytes = checkpoint(&weights, Layout::QwenMoe, prefix, false, None, None);
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views = file.tensors();
    // The correction in f32, as DeepSeek-V3 stores it: read without rounding.
    let bias: Vec<u8> = weights
        .router_bias
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|v| (v + 1e-4).to_le_bytes())
        .collect();
    let shared = weights.shared.as_ref().unwrap();
    let encode = |v: &[half::bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (gate, up, down) = (
        encode(&shared.gate_proj),
        encode(&shared.up_proj),
        encode(&shared.down_proj),
    );
    let deepseek = Layout::DeepSeekV3;
    let [gate_name, up_name, down_name] = deepseek.shared_expert(prefix).unwrap();
    views.push((
        deepseek.score_correction(prefix).unwrap(),
        TensorView::new(Dtype::F32, vec![4], &bias).unwrap(),
    ));
    views.push((
        gate_name,
        TensorView::new(Dtype::BF16, vec![8, 16], &gate).unwrap(),
    ));
    views.push((
        up_name,
        TensorView::new(Dtype::BF16, vec![8, 16], &up).unwrap(),
    ));
    views.push((
        down_name,
        TensorView::new(Dtype::BF16, vec![16, 8], &down).unwrap(),
    ));
    let bytes = safetensors::serialize(views, None).unwrap();

    let (loaded, layout) = MoeWeights::from_safetensors(&bytes, "model.layers.3.mlp").unwrap();
    assert_eq!(layout, Layout::DeepSeekV3);
    let want: Vec<f32> = weights
        .router_bias
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v + 1e-4)
        .collect();
    assert_eq!(loaded.router_bias.as_deref(), Some(&want[..]));
    let got = loaded.shared.as_ref().unwrap();
    assert_eq!(
        (got.intermediate_size, &got.down_proj),
        (8, &shared.down_proj)
    );
    loaded.check(&config).unwrap();
    // Read as a softmax layer it is refused: the correction would be ignored.
    assert!(loaded.check(&CONFIG).is_err());
}

#[test]
fn a_rank_loads_its_experts_and_leaves_the_others_zero() {
    let weights = MoeWeights::random(&CONFIG, 12).unwrap();
    let bytes = checkpoint(
        &weights,
        Layout::QwenMoe,
        "model.layers.2",
        false,
        None,
        None,
    );
    let (loaded, _) =
        MoeWeights::experts_from_safetensors(&bytes, "model.layers.2", &[3, 1]).unwrap();
    loaded.check(&CONFIG).unwrap();
    assert_eq!(loaded.router, weights.router);
    let per_expert = CONFIG.hidden_size * CONFIG.intermediate_size;
    for expert in 0..CONFIG.num_experts {
        let range = expert * per_expert..(expert + 1) * per_expert;
        for (got, want) in [
            (&loaded.gate_proj, &weights.gate_proj),
            (&loaded.up_proj, &weights.up_proj),
            (&loaded.down_proj, &weights.down_proj),
        ] {
            if expert == 1 || expert == 3 {
                assert_eq!(got[range.clone()], want[range.clone()], "expert {expert}");
            } else {
                assert!(
                    got[range.clone()].iter().all(|v| *v == bf16::ZERO),
                    "expert {expert}"
                );
                assert!(want[range.clone()].iter().any(|v| *v != bf16::ZERO));
            }
        }
    }
    let error = MoeWeights::experts_from_safetensors(&bytes, "model.layers.2", &[4]).unwrap_err();
    assert!(error.to_string().contains("expert 4"), "{error}");
    // A rank still needs every expert's tensors in the file.
    let [gate, ..] = Layout::QwenMoe.expert("model.layers.2", 0);
    let holed = checkpoint(
        &weights,
        Layout::QwenMoe,
        "model.layers.2",
        false,
        Some(&gate),
        None,
    );
    assert!(MoeWeights::experts_from_safetensors(&holed, "model.layers.2", &[1]).is_err());
}
