//! `moe run`: one MoE block from checkpoint weights, on the `hidden_states` of an
//! input file, written with its routing to an output file.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use half::bf16;
use moe_experts::{
    CpuMoeBlock, CudaMoeBlock, ExpertsKind, GroupedRouting, Layout, MoeConfig, MoeWeights, Routing,
    SharedWorkspace,
};
use moe_runtime::Device;
use moe_runtime::cuda::CudaDevice;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::{DeviceChoice, RunArgs};

/// The device to run on: the first GPU when asked or when there is one (`auto`).
pub(crate) fn choose_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => {
            CudaDevice::new(0).context("--device cuda")?;
            Device::Cuda(0)
        }
        DeviceChoice::Auto => {
            let (device, reason) = Device::best_available();
            if let Some(reason) = reason {
                eprintln!("moe: running on the CPU ({reason})");
            }
            device
        }
    })
}

/// The block's routing settings: `--top-k` over the config's `num_experts_per_tok`;
/// renormalise when Mixtral (it always does), when the config says `norm_topk_prob`,
/// or when asked; the routing function and shared expert from the config (a
/// DeepSeek-V3 layer has no defaults: its config is required).
fn routing(
    args: &RunArgs,
    layout: Layout,
    weights: &MoeWeights,
) -> anyhow::Result<(usize, bool, Routing)> {
    let num_experts = weights.num_experts;
    let mut top_k = args.top_k;
    let mut norm = args.norm_topk_prob || layout == Layout::Mixtral;
    let mut routing = Routing::Softmax;
    let config_path = config_path(args);
    if layout == Layout::DeepSeekV3 && config_path.is_none() {
        bail!(
            "a {} layer routes by its config.json: pass --config",
            layout.name()
        );
    }
    if let Some(path) = &config_path {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        routing = routing_of(&config, weights)
            .with_context(|| format!("{} asks for what the block does not do", path.display()))?;
        if top_k.is_none() {
            top_k = config["num_experts_per_tok"].as_u64().map(|k| k as usize);
        }
        norm |= config["norm_topk_prob"].as_bool().unwrap_or(false);
        let declared = ["num_local_experts", "num_experts", "n_routed_experts"]
            .into_iter()
            .find_map(|key| config[key].as_u64());
        if let Some(declared) = declared
            && declared as usize != num_experts
        {
            bail!(
                "{} declares {declared} experts, the weights under --prefix have {num_experts}",
                path.display()
            );
        }
    }
    let top_k = top_k
        .ok_or_else(|| anyhow!("no top-k: pass --config with num_experts_per_tok, or --top-k"))?;
    if top_k == 0 || top_k > num_experts {
        bail!("top-k {top_k} must be in 1..={num_experts}");
    }
    Ok((top_k, norm, routing))
}

/// `--config`, or the `config.json` beside the weights (in a checkpoint directory, or
/// next to its file) when there is one.
fn config_path(args: &RunArgs) -> Option<std::path::PathBuf> {
    if args.config.is_some() {
        return args.config.clone();
    }
    let dir = if args.weights.is_dir() {
        args.weights.as_path()
    } else {
        args.weights.parent()?
    };
    Some(dir.join("config.json")).filter(|path| path.is_file())
}

/// The routing a `config.json` describes, checked against what the block implements
/// and what the weights hold; an error names the key it cannot honour (run anyway,
/// such a layer would give wrong output with no error). The block routes with a
/// softmax over all experts and plain top-k (Mixtral, Qwen3-MoE) or as DeepSeek-V3
/// does (`scoring_func: sigmoid`, `topk_method: noaux_tc`, groups, scaling); its
/// experts are SiLU-gated; a shared expert must be in the weights.
fn routing_of(config: &serde_json::Value, weights: &MoeWeights) -> anyhow::Result<Routing> {
    let number = |key: &str| config.get(key).and_then(serde_json::Value::as_f64);
    let text = |key: &str| config.get(key).and_then(serde_json::Value::as_str);
    let count = |key: &str| number(key).map(|v| v as usize);
    if let Some(value) = text("hidden_act").filter(|v| *v != "silu") {
        bail!("hidden_act = {value:?}: the block's experts are SiLU-gated");
    }
    if let Some(value) = number("shared_expert_intermediate_size").filter(|v| *v > 0.0) {
        bail!(
            "shared_expert_intermediate_size = {value}: Qwen2-MoE's gated shared expert is not implemented"
        );
    }
    // DeepSeek-V3's family routes with sigmoid and noaux_tc whether or not the config
    // says so (transformers' own configs leave the keys out); a layer with a score
    // correction is of that family.
    let deepseek = weights.router_bias.is_some()
        || matches!(
            text("model_type"),
            Some("deepseek_v3" | "kimi_k2" | "glm4_moe")
        );
    let (scoring, method) = match (text("scoring_func"), text("topk_method")) {
        (None, None) if deepseek => ("sigmoid", Some("noaux_tc")),
        (scoring, method) => (scoring.unwrap_or("softmax"), method),
    };
    let routing = match (scoring, method) {
        ("softmax", None | Some("greedy")) => {
            if let Some(value) = number("n_group").filter(|v| *v > 1.0) {
                bail!("n_group = {value}: group-limited softmax routing is not implemented");
            }
            if let Some(value) = number("routed_scaling_factor").filter(|v| *v != 1.0) {
                bail!("routed_scaling_factor = {value}: softmax routing here is not scaled");
            }
            Routing::Softmax
        }
        ("sigmoid", Some("noaux_tc")) => {
            let n_group = count("n_group").unwrap_or(1);
            Routing::Grouped(GroupedRouting {
                n_group,
                topk_group: count("topk_group").unwrap_or(n_group),
                routed_scaling_factor: number("routed_scaling_factor").unwrap_or(1.0) as f32,
            })
        }
        ("softmax" | "sigmoid", Some(method)) => {
            bail!(
                "topk_method = {method:?}: the block does greedy top-k (softmax) or noaux_tc (sigmoid)"
            )
        }
        (scoring, _) => bail!(
            "scoring_func = {scoring:?}: the block scores with softmax, or sigmoid with topk_method noaux_tc"
        ),
    };
    let shared_width = weights.shared.as_ref().map_or(0, |s| s.intermediate_size);
    match count("n_shared_experts").unwrap_or(0) {
        0 if shared_width > 0 => {
            bail!("n_shared_experts is 0 or missing, but the weights have a shared expert")
        }
        0 => {}
        n => {
            let want = count("moe_intermediate_size").map(|i| i * n);
            if want != Some(shared_width) {
                bail!(
                    "n_shared_experts = {n}: the weights' shared expert is {shared_width} wide (0: none), moe_intermediate_size * n_shared_experts is {want:?}"
                );
            }
        }
    }
    Ok(routing)
}

/// The `hidden_states` tensor of the input, as bf16 `[N, H]`, and whether it was f32.
fn read_input(path: &Path, hidden_size: usize) -> anyhow::Result<(Vec<bf16>, bool)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let tensor = file
        .tensor("hidden_states")
        .with_context(|| format!("{} has no hidden_states tensor", path.display()))?;
    let shape = tensor.shape();
    if shape.last() != Some(&hidden_size) {
        bail!(
            "hidden_states has shape {shape:?}; the layer's hidden size is {hidden_size} (expected [N, {hidden_size}])"
        );
    }
    let data = tensor.data();
    match tensor.dtype() {
        Dtype::BF16 => Ok((
            data.chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            false,
        )),
        Dtype::F32 => Ok((
            data.chunks_exact(4)
                .map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            true,
        )),
        other => bail!("hidden_states is {other:?}; expected bf16 or f32"),
    }
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<()> {
    let (weights, layout) = MoeWeights::load(&args.weights, &args.prefix)?;
    let (top_k, norm_topk_prob, routing) = routing(&args, layout, &weights)?;
    let config = MoeConfig {
        hidden_size: weights.hidden_size,
        intermediate_size: weights.intermediate_size,
        num_experts: weights.num_experts,
        top_k,
        norm_topk_prob,
        routing,
        shared_intermediate_size: weights.shared.as_ref().map_or(0, |s| s.intermediate_size),
    };
    let (hidden, was_f32) = read_input(&args.input, config.hidden_size)?;
    let tokens = hidden.len() / config.hidden_size;
    let device = choose_device(args.device)?;
    let kind = ExpertsKind::Grouped;
    let out = match device {
        Device::Cpu => CpuMoeBlock::new(
            config.clone(),
            &weights,
            kind,
            SharedWorkspace::new(),
            tokens,
        )?
        .forward(&hidden)?,
        Device::Cuda(ordinal) => {
            let device = CudaDevice::new(ordinal)?;
            let cu_stream = device.new_stream()?;
            let stream = device.stream(&cu_stream)?;
            let workspace = SharedWorkspace::on_cuda_device(device.clone());
            CudaMoeBlock::new(
                config.clone(),
                &weights,
                kind,
                device.clone(),
                workspace,
                tokens,
            )?
            .forward(&stream, &hidden)?
        }
    };

    let h = config.hidden_size;
    let hidden_bytes: Vec<u8> = if was_f32 {
        out.hidden_states
            .iter()
            .flat_map(|v| v.to_f32().to_le_bytes())
            .collect()
    } else {
        out.hidden_states
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let ids: Vec<u8> = out.topk_ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let probs: Vec<u8> = out
        .topk_weights
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let dtype = if was_f32 { Dtype::F32 } else { Dtype::BF16 };
    let tensors = [
        (
            "hidden_states",
            TensorView::new(dtype, vec![tokens, h], &hidden_bytes)?,
        ),
        (
            "topk_ids",
            TensorView::new(Dtype::I32, vec![tokens, top_k], &ids)?,
        ),
        (
            "topk_weights",
            TensorView::new(Dtype::F32, vec![tokens, top_k], &probs)?,
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "{tokens} tokens through {} ({} layout, {} experts, top-{top_k}{}) on {device}: wrote {}",
        args.prefix,
        layout.name(),
        config.num_experts,
        if norm_topk_prob { ", renormalised" } else { "" },
        args.output.display()
    );
    Ok(())
}
