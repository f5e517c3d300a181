//! `moe bench`: permute, unpermute and the whole MoE block over the shapes serving
//! stacks benchmark, with a reused scratch and allocating per call.

mod cpu;
mod gpu;
mod report;

use std::path::PathBuf;

use anyhow::bail;
use moe_experts::{GroupedRouting, MoeConfig, Routing};
use moe_runtime::Device;
use serde::Serialize;

use crate::DeviceChoice;
use crate::run::choose_device;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Every shape and token count on the CPU too (the CPU default is a short sweep).
    #[arg(long)]
    full: bool,
    /// Shapes to run (mixtral, qwen3-30b-a3b, dsv3), comma-separated.
    #[arg(long, value_delimiter = ',')]
    shape: Vec<String>,
    /// Token counts to run, comma-separated.
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Leave out the whole-block measurements.
    #[arg(long)]
    no_block: bool,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "moe-bench.json")]
    json: PathBuf,
    /// Where to write the plot (SVG).
    #[arg(long, default_value = "moe-bench.svg")]
    svg: PathBuf,
}

/// A model's MoE layer shape.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    pub(crate) hidden: usize,
    pub(crate) experts: usize,
    pub(crate) topk: usize,
    /// Each expert's intermediate size, for the block.
    pub(crate) intermediate: usize,
    /// The block's router: DeepSeek-V3's grouped one, or softmax (`None`).
    #[serde(skip)]
    pub(crate) grouped: Option<GroupedRouting>,
    /// The block's shared expert's intermediate size (0: none).
    pub(crate) shared_intermediate: usize,
}

impl Shape {
    /// The layer the block measurements run: the model's own routing and shared
    /// expert, renormalised top-k as all three models configure it.
    pub(crate) fn block_config(&self) -> MoeConfig {
        MoeConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_experts: self.experts,
            top_k: self.topk,
            norm_topk_prob: true,
            routing: self.grouped.map_or(Routing::Softmax, Routing::Grouped),
            shared_intermediate_size: self.shared_intermediate,
        }
    }
}

pub(crate) const SHAPES: [Shape; 3] = [
    Shape {
        name: "mixtral",
        hidden: 4096,
        experts: 8,
        topk: 2,
        intermediate: 14336,
        grouped: None,
        shared_intermediate: 0,
    },
    Shape {
        name: "qwen3-30b-a3b",
        hidden: 2048,
        experts: 128,
        topk: 8,
        intermediate: 768,
        grouped: None,
        shared_intermediate: 0,
    },
    Shape {
        name: "dsv3",
        hidden: 7168,
        experts: 256,
        topk: 8,
        intermediate: 2048,
        // DeepSeek-V3's config.json: n_group 8, topk_group 4, routed_scaling_factor
        // 2.5, one shared expert of moe_intermediate_size.
        grouped: Some(GroupedRouting {
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
        }),
        shared_intermediate: 2048,
    },
];

pub(crate) const TOKENS: [usize; 8] = [1, 8, 32, 128, 512, 2048, 8192, 16384];
/// The CPU's default sweep: about a minute on two cores.
const CPU_TOKENS: [usize; 4] = [1, 8, 32, 128];
const CPU_BLOCK_TOKENS: [usize; 2] = [1, 8];

/// Bytes a bf16 permute or unpermute of `tokens` must move: each row read once and
/// written `K` times, or `K` rows read and one written.
pub(crate) fn bytes_moved(shape: &Shape, tokens: usize) -> u64 {
    (2 * shape.hidden * (1 + shape.topk) * tokens) as u64
}

/// Weight bytes a block call must read at least: the router, the shared expert and
/// every expert some token of `topk_ids` chose (bf16; the score correction is
/// negligible). The block's "GB/s" is these bytes over its time, and its "% copy bw"
/// its distance from the weight-read floor (these bytes at the copy bandwidth).
pub(crate) fn block_weight_bytes(config: &MoeConfig, topk_ids: &[i32]) -> u64 {
    let mut touched = vec![false; config.num_experts];
    for &id in topk_ids {
        if let Some(t) = usize::try_from(id).ok().and_then(|i| touched.get_mut(i)) {
            *t = true;
        }
    }
    let experts = touched.iter().filter(|&&t| t).count();
    let h = config.hidden_size;
    let elements = config.num_experts * h
        + experts * 3 * h * config.intermediate_size
        + 3 * h * config.shared_intermediate_size;
    2 * elements as u64
}

/// One measured operation.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) shape: &'static str,
    pub(crate) tokens: usize,
    /// `permute`, `unpermute` or `block`.
    pub(crate) op: &'static str,
    /// Median microseconds per call with a reused scratch (GPU: CUDA-graph replay,
    /// except the block, which waits on the host and is timed eagerly).
    pub(crate) scratch_us: f64,
    /// The same, allocating per call.
    pub(crate) alloc_us: Option<f64>,
    /// GPU: median microseconds per call launched eagerly (no graph), scratch / alloc.
    pub(crate) eager_scratch_us: Option<f64>,
    pub(crate) eager_alloc_us: Option<f64>,
    /// Bytes the op must move; for the block, the weight bytes it must read
    /// ([`block_weight_bytes`]).
    pub(crate) bytes: u64,
}

impl Row {
    /// A measurement of `op` (`permute` / `unpermute` move bytes; the block does not)
    /// with a reused scratch and allocating per call, on the main timer.
    pub(crate) fn new(
        shape: &Shape,
        tokens: usize,
        op: &'static str,
        scratch_us: f64,
        alloc_us: f64,
    ) -> Self {
        Self {
            shape: shape.name,
            tokens,
            op,
            scratch_us,
            alloc_us: Some(alloc_us),
            eager_scratch_us: None,
            eager_alloc_us: None,
            bytes: if op.starts_with("block") {
                0
            } else {
                bytes_moved(shape, tokens)
            },
        }
    }

    /// A block's measurement: one time per call, nothing allocating to compare with.
    pub(crate) fn block(shape: &Shape, tokens: usize, op: &'static str, us: f64) -> Self {
        Self {
            alloc_us: None,
            ..Self::new(shape, tokens, op, us, 0.0)
        }
    }

    /// A block row's bytes: the weights its call must read.
    pub(crate) fn with_bytes(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }

    /// A block row's eager-launch time beside its graph-replay one.
    pub(crate) fn with_eager_call(mut self, us: f64) -> Self {
        self.eager_scratch_us = Some(us);
        self
    }

    /// The same, with eager-launch timings beside the graph-replay ones.
    pub(crate) fn with_eager(mut self, scratch_us: f64, alloc_us: f64) -> Self {
        self.eager_scratch_us = Some(scratch_us);
        self.eager_alloc_us = Some(alloc_us);
        self
    }
}

/// What a run measured, and where.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) device: String,
    pub(crate) card: String,
    /// Measured device-to-device (or memory-to-memory) copy bandwidth, read + write.
    pub(crate) copy_gb_per_s: f64,
    pub(crate) method: String,
    pub(crate) rows: Vec<Row>,
}

/// The shapes and token counts to run: what was asked, or the device's default.
fn plan(args: &BenchArgs, device: Device) -> anyhow::Result<(Vec<Shape>, Vec<usize>, Vec<usize>)> {
    let shapes: Vec<Shape> = if args.shape.is_empty() {
        SHAPES.to_vec()
    } else {
        let mut chosen = Vec::new();
        for name in &args.shape {
            match SHAPES.iter().find(|s| s.name == name) {
                Some(shape) => chosen.push(*shape),
                None => bail!(
                    "unknown shape {name:?}; known: {}",
                    SHAPES.map(|s| s.name).join(", ")
                ),
            }
        }
        chosen
    };
    if args.tokens.contains(&0) {
        bail!("--tokens: token counts must be at least 1");
    }
    let small = device == Device::Cpu && !args.full;
    let tokens = match (&args.tokens[..], small) {
        ([], true) => CPU_TOKENS.to_vec(),
        ([], false) => TOKENS.to_vec(),
        (given, _) => given.to_vec(),
    };
    let block_tokens = match (&args.tokens[..], small, args.no_block) {
        (_, _, true) => vec![],
        ([], true, _) => CPU_BLOCK_TOKENS.to_vec(),
        _ => tokens.clone(),
    };
    Ok((shapes, tokens, block_tokens))
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = choose_device(args.device)?;
    let (shapes, tokens, block_tokens) = plan(&args, device)?;
    let report = match device {
        Device::Cpu => cpu::run(&shapes, &tokens, &block_tokens)?,
        Device::Cuda(ordinal) => gpu::run(ordinal, &shapes, &tokens, &block_tokens)?,
    };
    report::print_table(&report);
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&args.svg, report::svg(&report))?;
    eprintln!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}

/// Progress on stderr: `[step/total] what`.
pub(crate) struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    pub(crate) fn new(total: usize) -> Self {
        Self { step: 0, total }
    }

    pub(crate) fn next(&mut self, what: std::fmt::Arguments<'_>) {
        self.step += 1;
        eprintln!("[{}/{}] {what}", self.step, self.total);
    }
}

/// The median of `samples`.
pub(crate) fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
