//! The `moe` binary as a user runs it: `info`, a short `bench`, `run` on a checkpoint,
//! and one-line errors with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::bf16;
use moe_experts::{
    CpuMoeBlock, ExpertsKind, GroupedRouting, Layout, MoeConfig, MoeWeights, Routing,
    SharedWorkspace,
};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// The `moe` binary: where cargo built it, or, for test binaries copied to another
/// machine with it (`.gpu/tests/` beside `.gpu/bin/`), next to them.
fn moe_binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_moe"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|staged| staged.join("bin").join("moe"))
        .filter(|staged| staged.exists())
        .unwrap_or(built)
}

fn moe(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(moe_binary())
        .args(args)
        .output()
        .expect("the moe binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-cli-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CONFIG: MoeConfig = MoeConfig {
    hidden_size: 32,
    intermediate_size: 48,
    num_experts: 6,
    top_k: 2,
    norm_topk_prob: false,
    routing: Routing::Softmax,
    shared_intermediate_size: 0,
};

/// The tensors of `weights` in `layout` under `prefix`: `(name, shape, dtype, bytes)`.
fn layer_tensors(
    weights: &MoeWeights,
    layout: Layout,
    prefix: &str,
) -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let (h, i, e) = (
        weights.hidden_size,
        weights.intermediate_size,
        weights.num_experts,
    );
    let bytes = |v: &[bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors = vec![(
        layout.router(prefix),
        vec![e, h],
        Dtype::BF16,
        bytes(&weights.router),
    )];
    for ex in 0..e {
        let [g, u, d] = layout.expert(prefix, ex);
        let gate = bytes(&weights.gate_proj[ex * i * h..][..i * h]);
        let up = bytes(&weights.up_proj[ex * i * h..][..i * h]);
        let down = bytes(&weights.down_proj[ex * h * i..][..h * i]);
        tensors.push((g, vec![i, h], Dtype::BF16, gate));
        tensors.push((u, vec![i, h], Dtype::BF16, up));
        tensors.push((d, vec![h, i], Dtype::BF16, down));
    }
    if let (Some(name), Some(bias)) = (layout.score_correction(prefix), &weights.router_bias) {
        let data = bias.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, vec![e], Dtype::F32, data));
    }
    if let (Some([g, u, d]), Some(shared)) = (layout.shared_expert(prefix), &weights.shared) {
        let s = shared.intermediate_size;
        tensors.push((g, vec![s, h], Dtype::BF16, bytes(&shared.gate_proj)));
        tensors.push((u, vec![s, h], Dtype::BF16, bytes(&shared.up_proj)));
        tensors.push((d, vec![h, s], Dtype::BF16, bytes(&shared.down_proj)));
    }
    tensors
}

fn serialize(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views = tensors
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A Qwen-layout checkpoint of random bf16 weights under `model.layers.5`.
fn write_checkpoint(path: &Path, weights: &MoeWeights) {
    serialize(
        path,
        &layer_tensors(weights, Layout::QwenMoe, "model.layers.5"),
    );
}

/// A checkpoint directory as people download them: the layer under `model.layers.3`
/// split over two shards (every other tensor), the index, and `config`.
fn write_sharded_checkpoint(dir: &Path, weights: &MoeWeights, layout: Layout, config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = layer_tensors(weights, layout, "model.layers.3");
    let mut map = serde_json::Map::new();
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    for (shard, name) in names.iter().enumerate() {
        let part: Vec<_> = tensors.iter().skip(shard).step_by(2).cloned().collect();
        for (tensor, ..) in &part {
            map.insert(tensor.clone(), (*name).into());
        }
        serialize(&dir.join(name), &part);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(moe_experts::INDEX_FILE), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
}

#[test]
fn run_writes_the_block_output_and_routing() {
    let dir = temp_dir("run");
    let weights = MoeWeights::random(&CONFIG, 11).unwrap();
    write_checkpoint(&dir.join("w.safetensors"), &weights);
    // f32 input: the output comes back in f32.
    let tokens = 5;
    let hidden: Vec<f32> = (0..tokens * 32)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let input_bytes: Vec<u8> = hidden.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![tokens, 32], &input_bytes).unwrap();
    safetensors::serialize_to_file([("hidden_states", view)], None, &dir.join("x.safetensors"))
        .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"num_experts_per_tok": 2, "norm_topk_prob": false, "num_experts": 6}"#,
    )
    .unwrap();

    let path = |f: &str| dir.join(f).display().to_string();
    let (ok, stdout, stderr) = moe(&[
        "run",
        "--weights",
        &path("w.safetensors"),
        "--prefix",
        "model.layers.5",
        "--input",
        &path("x.safetensors"),
        "--output",
        &path("y.safetensors"),
        "--config",
        &path("config.json"),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("5 tokens"), "{stdout}");

    let bytes = std::fs::read(dir.join("y.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let out = file.tensor("hidden_states").unwrap();
    assert_eq!((out.dtype(), out.shape()), (Dtype::F32, &[tokens, 32][..]));
    let ids = file.tensor("topk_ids").unwrap();
    assert_eq!((ids.dtype(), ids.shape()), (Dtype::I32, &[tokens, 2][..]));

    // The same block run in-process gives the same output.
    let hidden_bf16: Vec<bf16> = hidden.iter().map(|&x| bf16::from_f32(x)).collect();
    let want = CpuMoeBlock::new(
        CONFIG,
        &weights,
        ExpertsKind::Grouped,
        SharedWorkspace::new(),
        8,
    )
    .unwrap()
    .forward(&hidden_bf16)
    .unwrap();
    let got: Vec<f32> = out
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let want_f32: Vec<f32> = want.hidden_states.iter().map(|v| v.to_f32()).collect();
    assert_eq!(got, want_f32);
    let got_ids: Vec<i32> = ids
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got_ids, want.topk_ids);

    // The same layer from a checkpoint directory, its config.json found beside the
    // weights, the prefix copied from the index (the MoE module's): the same output.
    let checkpoint = dir.join("checkpoint");
    std::fs::create_dir_all(&checkpoint).unwrap();
    std::fs::copy(
        dir.join("w.safetensors"),
        checkpoint.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(dir.join("config.json"), checkpoint.join("config.json")).unwrap();
    let (ok, _, stderr) = moe(&[
        "run",
        "--weights",
        &checkpoint.display().to_string(),
        "--prefix",
        "model.layers.5.mlp",
        "--input",
        &path("x.safetensors"),
        "--output",
        &path("z.safetensors"),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(dir.join("z.safetensors")).unwrap(),
        std::fs::read(dir.join("y.safetensors")).unwrap()
    );
}

#[test]
fn run_reads_a_sharded_directory_in_each_layout() {
    let dir = temp_dir("sharded");
    let tokens = 7;
    let hidden: Vec<bf16> = (0..tokens * 32)
        .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 30.0))
        .collect();
    let input_bytes: Vec<u8> = hidden.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::BF16, vec![tokens, 32], &input_bytes).unwrap();
    let input = dir.join("x.safetensors");
    safetensors::serialize_to_file([("hidden_states", view)], None, &input).unwrap();
    let deepseek = MoeConfig {
        norm_topk_prob: true,
        routing: Routing::Grouped(GroupedRouting {
            n_group: 3,
            topk_group: 2,
            routed_scaling_factor: 2.5,
        }),
        shared_intermediate_size: 48,
        ..CONFIG
    };
    let cases = [
        (
            Layout::Mixtral,
            MoeConfig {
                norm_topk_prob: true,
                ..CONFIG
            },
            r#"{"model_type": "mixtral", "num_local_experts": 6, "num_experts_per_tok": 2}"#,
        ),
        (
            Layout::QwenMoe,
            CONFIG,
            r#"{"model_type": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": false}"#,
        ),
        (
            Layout::DeepSeekV3,
            deepseek,
            r#"{"model_type": "deepseek_v3", "n_routed_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": true, "n_group": 3, "topk_group": 2, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "moe_intermediate_size": 48}"#,
        ),
    ];
    for (layout, config, config_json) in cases {
        let weights = MoeWeights::random(&config, 23).unwrap();
        let checkpoint = dir.join(layout.name());
        write_sharded_checkpoint(&checkpoint, &weights, layout, config_json);
        let output = dir.join(format!("{}.safetensors", layout.name()));
        let (ok, stdout, stderr) = moe(&[
            "run",
            "--weights",
            &checkpoint.display().to_string(),
            "--prefix",
            "model.layers.3",
            "--input",
            &input.display().to_string(),
            "--output",
            &output.display().to_string(),
            "--device",
            "cpu",
        ]);
        assert!(ok, "{layout:?}: {stderr}");
        assert!(stdout.contains(layout.name()), "{stdout}");
        let want = CpuMoeBlock::new(
            config,
            &weights,
            ExpertsKind::Grouped,
            SharedWorkspace::new(),
            tokens,
        )
        .unwrap()
        .forward(&hidden)
        .unwrap();
        let bytes = std::fs::read(&output).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let got: Vec<bf16> = file
            .tensor("hidden_states")
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(got, want.hidden_states, "{layout:?}");
        let ids: Vec<i32> = file
            .tensor("topk_ids")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(ids, want.topk_ids, "{layout:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let dir = temp_dir("errors");
    let path = |f: &str| dir.join(f).display().to_string();
    let (ok, _, stderr) = moe(&[
        "run",
        "--weights",
        &path("missing.safetensors"),
        "--prefix",
        "p",
        "--input",
        &path("x.safetensors"),
        "--output",
        &path("y.safetensors"),
    ]);
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing.safetensors"), "{stderr}");

    write_checkpoint(
        &dir.join("w.safetensors"),
        &MoeWeights::random(&CONFIG, 2).unwrap(),
    );
    let (ok, _, stderr) = moe(&[
        "run",
        "--weights",
        &path("w.safetensors"),
        "--prefix",
        "model.layers.5",
        "--input",
        &path("x.safetensors"),
        "--output",
        &path("y.safetensors"),
    ]);
    assert!(!ok);
    assert!(stderr.contains("top-k"), "{stderr}");

    // A config asking for what the block does not implement is refused, naming the key
    // (DeepSeek-V3's routing, Qwen2-MoE's shared expert).
    for (key, value) in [
        ("scoring_func", "\"sigmoid\""),
        ("topk_method", "\"noaux_tc\""),
        ("n_group", "8"),
        ("n_shared_experts", "1"),
        ("shared_expert_intermediate_size", "5632"),
        ("routed_scaling_factor", "2.5"),
        ("hidden_act", "\"gelu\""),
    ] {
        let config = format!("{{\"num_experts_per_tok\": 2, \"{key}\": {value}}}");
        std::fs::write(dir.join("config.json"), config).unwrap();
        let (ok, _, stderr) = moe(&[
            "run",
            "--weights",
            &path("w.safetensors"),
            "--prefix",
            "model.layers.5",
            "--config",
            &path("config.json"),
            "--input",
            &path("x.safetensors"),
            "--output",
            &path("y.safetensors"),
        ]);
        assert!(!ok && stderr.contains(key), "{key}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }

    let (ok, _, stderr) = moe(&["bench", "--shape", "llama"]);
    assert!(!ok && stderr.contains("unknown shape"), "{stderr}");
    let (ok, _, stderr) = moe(&["bench", "--bogus"]);
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
    let (ok, stdout, _) = moe(&["bench", "--help"]);
    assert!(ok && stdout.contains("--tokens"), "{stdout}");
}

#[test]
fn info_and_a_short_bench_run() {
    let (ok, stdout, stderr) = moe(&["info"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "PTX: {} kernels",
            moe_kernels::kernels::Kernel::ALL.len()
        )) && stdout.contains("best device"),
        "{stdout}"
    );

    let dir = temp_dir("bench");
    let json = dir.join("b.json").display().to_string();
    let svg = dir.join("b.svg").display().to_string();
    let (ok, stdout, stderr) = moe(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "qwen3-30b-a3b",
        "--tokens",
        "1,4",
        "--no-block",
        "--json",
        &json,
        "--svg",
        &svg,
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("[1/5]"), "progress: {stderr}");
    assert_eq!(stdout.matches("| qwen3-30b-a3b |").count(), 4, "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
    assert!(report["rows"][0]["scratch_us"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}
