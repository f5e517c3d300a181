//! A first timing of the CUDA permute and unpermute under CUDA-graph replay, until
//! `moe bench` exists: median time per call and bytes moved per second, for the
//! shapes serving stacks benchmark. Prints why and exits 0 where there is no GPU.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, sys};
use moe_runtime::cuda::{
    self, CudaDevice, DeviceExpertIds, DevicePermuteInput, DeviceRows, DeviceRowsMut,
    DeviceTopkIds, DeviceUnpermuteInput, DeviceView, DeviceViewMut,
};
use moe_runtime::{DType, PermuteScratch, ScratchConfig, bf16};

const SHAPES: [(&str, usize, usize, usize); 3] = [
    ("mixtral", 4096, 8, 2),
    ("qwen3-30b-a3b", 2048, 128, 8),
    ("dsv3", 7168, 256, 8),
];
const TOKENS: [usize; 8] = [1, 8, 32, 128, 512, 2048, 8192, 16384];
/// Calls captured in one graph; the time per call is the replay's over this.
const CALLS: usize = 20;

fn main() -> anyhow::Result<()> {
    let device = match CudaDevice::new(0) {
        Ok(device) => device,
        Err(error) => {
            println!("no GPU: {error}");
            return Ok(());
        }
    };
    let stream = device.stream().clone();
    println!("card: {}", device.name()?);
    println!(
        "copy bandwidth (1 GiB d2d, read+write): {:.0} GB/s",
        copy_bandwidth(&stream)? / 1e9
    );
    println!("| shape | N | permute us | GB/s | unpermute us | GB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, hidden, experts, topk) in SHAPES {
        for tokens in TOKENS {
            let (permute_us, unpermute_us) = time_shape(&device, hidden, experts, topk, tokens)?;
            let bytes = (2 * hidden * (1 + topk) * tokens) as f64;
            println!(
                "| {name} | {tokens} | {permute_us:.1} | {:.0} | {unpermute_us:.1} | {:.0} |",
                bytes / permute_us / 1e3,
                bytes / unpermute_us / 1e3
            );
        }
    }
    Ok(())
}

fn copy_bandwidth(stream: &Arc<CudaStream>) -> anyhow::Result<f64> {
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let ms = time_ms(stream, 10, || {
        stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / (ms / 1e3))
}

/// Median of 7 timings of `repeats` runs of `work`, in ms per run.
fn time_ms(
    stream: &Arc<CudaStream>,
    repeats: usize,
    mut work: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.context().new_event(flags)?;
    let end = stream.context().new_event(flags)?;
    work()?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        start.record(stream)?;
        for _ in 0..repeats {
            work()?;
        }
        end.record(stream)?;
        end.synchronize()?;
        samples.push(start.elapsed_ms(&end)? as f64 / repeats as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[3])
}

fn time_shape(
    device: &Arc<CudaDevice>,
    hidden: usize,
    experts: usize,
    topk: usize,
    tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let stream = device.stream();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let host_hidden: Vec<bf16> = (0..tokens * hidden)
        .map(|_| bf16::from_f32((next() % 2000) as f32 / 1000.0 - 1.0))
        .collect();
    let mut ids = Vec::with_capacity(tokens * topk);
    for _ in 0..tokens {
        let first = ids.len();
        while ids.len() < first + topk {
            let id = (next() % experts as u64) as i32;
            if !ids[first..].contains(&id) {
                ids.push(id);
            }
        }
    }
    let weights: Vec<f32> = (0..tokens * topk).map(|_| 0.125).collect();
    let d_hidden: CudaSlice<bf16> = stream.clone_htod(&host_hidden)?;
    let d_ids: CudaSlice<i32> = stream.clone_htod(&ids)?;
    let d_weights: CudaSlice<f32> = stream.clone_htod(&weights)?;
    let mut d_out: CudaSlice<bf16> = stream.alloc_zeros(tokens * hidden)?;
    let config = ScratchConfig::new(tokens, topk, experts, experts, device.device())
        .with_rows(hidden, DType::BF16);
    let mut scratch = PermuteScratch::with_cuda_device(config, device.clone())?;
    let input = DevicePermuteInput::new(
        DeviceRows::new(DeviceView::new(&d_hidden), hidden)?,
        DeviceTopkIds::new(DeviceExpertIds::I32(DeviceView::new(&d_ids)), topk)?,
    );

    let permute_graph = capture(stream, || {
        for _ in 0..CALLS {
            cuda::permute(&mut scratch, &input)?;
        }
        Ok(())
    })?;
    let permute_ms = time_ms(stream, 1, || Ok(permute_graph.launch()?))?;

    let out = cuda::permute(&mut scratch, &input)?;
    let combine = DeviceUnpermuteInput {
        permuted_hidden_states: out.permuted_hidden_states,
        inv_permuted_idx: out.inv_permuted_idx,
        expert_first_token_offset: out.expert_first_token_offset,
        topk_weights: DeviceView::new(&d_weights),
        topk,
    };
    let unpermute_graph = capture(stream, || {
        for _ in 0..CALLS {
            let dest = DeviceRowsMut::new(DeviceViewMut::new(&mut d_out), hidden)?;
            cuda::unpermute_into(device, &combine, dest)?;
        }
        Ok(())
    })?;
    let unpermute_ms = time_ms(stream, 1, || Ok(unpermute_graph.launch()?))?;
    Ok((
        permute_ms * 1e3 / CALLS as f64,
        unpermute_ms * 1e3 / CALLS as f64,
    ))
}

fn capture(
    stream: &Arc<CudaStream>,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<cudarc::driver::CudaGraph> {
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    work()?;
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    graph.ok_or_else(|| anyhow::anyhow!("nothing was captured"))
}
