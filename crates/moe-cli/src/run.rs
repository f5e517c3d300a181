//! `moe run`: one MoE block from checkpoint weights, on the `hidden_states` of an
//! input file, written with its routing to an output file.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use half::bf16;
use moe_experts::{
    CpuMoeBlock, CudaMoeBlock, ExpertsKind, Layout, MoeConfig, MoeWeights, SharedWorkspace,
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

/// Routing settings: `--top-k` over the config's `num_experts_per_tok`; renormalise
/// when Mixtral (it always does), when the config says `norm_topk_prob`, or when asked.
fn routing(args: &RunArgs, layout: Layout, num_experts: usize) -> anyhow::Result<(usize, bool)> {
    let mut top_k = args.top_k;
    let mut norm = args.norm_topk_prob || layout == Layout::Mixtral;
    if let Some(path) = &config_path(args) {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        refuse_unimplemented(&config)
            .with_context(|| format!("{} asks for what the block does not do", path.display()))?;
        if top_k.is_none() {
            top_k = config["num_experts_per_tok"].as_u64().map(|k| k as usize);
        }
        norm |= config["norm_topk_prob"].as_bool().unwrap_or(false);
        let declared = config["num_local_experts"]
            .as_u64()
            .or(config["num_experts"].as_u64());
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
    Ok((top_k, norm))
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

/// Refuses a `config.json` whose MoE settings the block does not implement, naming
/// the key: run anyway, such a layer would give wrong output with no error. The block
/// routes with a softmax over all experts, plain top-k, no shared expert, no scaling,
/// SiLU experts.
fn refuse_unimplemented(config: &serde_json::Value) -> anyhow::Result<()> {
    let number = |key: &str| config.get(key).and_then(serde_json::Value::as_f64);
    let text = |key: &str| config.get(key).and_then(serde_json::Value::as_str);
    if let Some(value) = text("scoring_func").filter(|v| *v != "softmax") {
        bail!("scoring_func = {value:?}: the block scores experts with softmax only");
    }
    if let Some(value) = text("topk_method").filter(|v| *v != "greedy") {
        bail!("topk_method = {value:?}: the block takes a plain (greedy) top-k only");
    }
    if let Some(value) = number("n_group").filter(|v| *v > 1.0) {
        bail!("n_group = {value}: the block does not do group-limited routing");
    }
    for key in ["n_shared_experts", "shared_expert_intermediate_size"] {
        if let Some(value) = number(key).filter(|v| *v > 0.0) {
            bail!("{key} = {value}: the block has no shared expert");
        }
    }
    if let Some(value) = number("routed_scaling_factor").filter(|v| *v != 1.0) {
        bail!("routed_scaling_factor = {value}: the block does not scale routed outputs");
    }
    if let Some(value) = text("hidden_act").filter(|v| *v != "silu") {
        bail!("hidden_act = {value:?}: the block's experts are SiLU-gated");
    }
    Ok(())
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
    let (top_k, norm_topk_prob) = routing(&args, layout, weights.num_experts)?;
    let config = MoeConfig {
        hidden_size: weights.hidden_size,
        intermediate_size: weights.intermediate_size,
        num_experts: weights.num_experts,
        top_k,
        norm_topk_prob,
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
