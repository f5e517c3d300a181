//! The benchmark on the CPU: wall-clock medians.

use std::time::Instant;

use half::bf16;
use moe_experts::{CpuMoeBlock, ExpertsKind, MoeWeights, SharedWorkspace};
use moe_runtime::cpu::{self, PermuteInput, UnpermuteInput};
use moe_runtime::{DType, Device, PermuteScratch, Rows, ScratchConfig, TopkIds};
use rayon::prelude::*;

use super::{Progress, Report, Row, Shape, block_weight_bytes, median};

/// Random routing and data: each token picks `K` distinct experts uniformly.
pub(crate) struct Inputs {
    pub(crate) hidden: Vec<bf16>,
    pub(crate) ids: Vec<i32>,
    pub(crate) weights: Vec<f32>,
}

pub(crate) fn inputs(shape: &Shape, tokens: usize, seed: u64) -> Inputs {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ids = Vec::with_capacity(tokens * shape.topk);
    for _ in 0..tokens {
        let first = ids.len();
        while ids.len() < first + shape.topk {
            let id = (next() % shape.experts as u64) as i32;
            if !ids[first..].contains(&id) {
                ids.push(id);
            }
        }
    }
    let unit = |x: u64| (x >> 40) as f32 / (1u64 << 24) as f32;
    Inputs {
        hidden: (0..tokens * shape.hidden)
            .map(|_| bf16::from_f32(unit(next()) * 4.0 - 2.0))
            .collect(),
        ids,
        weights: (0..tokens * shape.topk).map(|_| unit(next())).collect(),
    }
}

/// Median microseconds of `work`, over 7 samples of enough calls for about 20 ms each.
fn time_us(mut work: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    work()?;
    let start = Instant::now();
    work()?;
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let calls = ((0.02 / once) as usize).clamp(1, 10_000);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..calls {
            work()?;
        }
        samples.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    Ok(median(samples))
}

/// Memory copy bandwidth (read + write), copied the way permute copies: by the
/// rayon pool, in 1 MiB pieces.
fn copy_bandwidth() -> anyhow::Result<f64> {
    let bytes = 256usize << 20;
    let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; bytes];
    let us = time_us(|| {
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / (us * 1e3))
}

/// Bytes of host memory available (MemAvailable), when the kernel says.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn run(
    shapes: &[Shape],
    tokens: &[usize],
    block_tokens: &[usize],
) -> anyhow::Result<Report> {
    let mut progress = Progress::new(1 + shapes.len() * (2 * tokens.len() + block_tokens.len()));
    progress.next(format_args!("copy bandwidth"));
    let copy_gb_per_s = copy_bandwidth()?;
    let mut rows = Vec::new();
    for shape in shapes {
        for &n in tokens {
            let x = inputs(shape, n, n as u64);
            let input = PermuteInput::new(
                Rows::new(&x.hidden, shape.hidden)?,
                TopkIds::new(&x.ids, shape.topk)?,
            );
            progress.next(format_args!("{} N={n} permute", shape.name));
            let config =
                ScratchConfig::new(n, shape.topk, shape.experts, shape.experts, Device::Cpu)
                    .with_rows(shape.hidden, DType::BF16);
            let mut scratch = PermuteScratch::new(config)?;
            let scratch_us = time_us(|| {
                cpu::permute(&mut scratch, &input)
                    .map(|_| ())
                    .map_err(Into::into)
            })?;
            let alloc_us = time_us(|| {
                cpu::allocating::permute(&input, shape.experts, shape.experts)?;
                Ok(())
            })?;
            rows.push(Row::new(shape, n, "permute", scratch_us, alloc_us));

            progress.next(format_args!("{} N={n} unpermute", shape.name));
            let routed = cpu::permute(&mut scratch, &input)?;
            let combine = UnpermuteInput {
                permuted_hidden_states: routed.permuted_hidden_states.as_slice::<bf16>()?,
                hidden_size: shape.hidden,
                inv_permuted_idx: routed.inv_permuted_idx,
                expert_first_token_offset: routed.expert_first_token_offset,
                topk_weights: &x.weights,
                topk: shape.topk,
            };
            let mut out = vec![bf16::ZERO; n * shape.hidden];
            let scratch_us = time_us(|| Ok(cpu::unpermute_into(&combine, &mut out)?))?;
            let alloc_us = time_us(|| {
                cpu::allocating::unpermute(&combine)?;
                Ok(())
            })?;
            rows.push(Row::new(shape, n, "unpermute", scratch_us, alloc_us));
        }
        if block_tokens.is_empty() {
            continue;
        }
        // bf16 weights, plus their f32 copy for the CPU GEMMs.
        let weight_bytes = 6 * (shape.experts * 3 * shape.intermediate * shape.hidden) as u64;
        if available_memory().is_some_and(|m| weight_bytes > m * 3 / 4) {
            for &n in block_tokens {
                progress.next(format_args!(
                    "{} N={n} block: skipped, its weights need {} GiB of memory",
                    shape.name,
                    weight_bytes >> 30
                ));
            }
            continue;
        }
        let config = shape.block_config();
        let weights = MoeWeights::repeating(&config, 7)?;
        let max_tokens = block_tokens.iter().copied().max().unwrap_or(1);
        let mut block = CpuMoeBlock::new(
            config,
            &weights,
            ExpertsKind::Grouped,
            SharedWorkspace::new(),
            max_tokens,
        )?;
        drop(weights);
        for &n in block_tokens {
            progress.next(format_args!("{} N={n} block", shape.name));
            let x = inputs(shape, n, 99 + n as u64);
            let scratch_us = time_us(|| {
                block.forward(&x.hidden)?;
                Ok(())
            })?;
            let alloc_us = time_us(|| {
                block.use_workspace(SharedWorkspace::new());
                {
                    block.forward(&x.hidden)?;
                    Ok(())
                }
            })?;
            let routed = block.forward(&x.hidden)?;
            let bytes = block_weight_bytes(block.config(), &routed.topk_ids);
            rows.push(Row::new(shape, n, "block", scratch_us, alloc_us).with_bytes(bytes));
        }
    }
    Ok(Report {
        device: "cpu".into(),
        card: cpu_name(),
        copy_gb_per_s,
        method: format!(
            "wall clock, median of 7 samples of >= 20 ms; bf16; {} rayon threads; block GB/s = weight bytes it must read (router, shared expert, experts chosen) / time; copy: rayon memcpy of 256 MiB",
            rayon::current_num_threads()
        ),
        rows,
    })
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{model}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}
