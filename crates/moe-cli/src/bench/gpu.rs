//! The benchmark on a CUDA device: CUDA events, CUDA-graph replay, inputs rotated so
//! that the data touched exceeds the L2 cache.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, sys};
use half::bf16;
use moe_experts::{CudaMoeBlock, ExpertsKind, MoeWeights, SharedWorkspace};
use moe_runtime::cuda::{
    self, CudaDevice, DeviceBuffer, DeviceExpertIds, DevicePermuteInput, DeviceRows, DeviceRowsMut,
    DeviceTopkIds, DeviceUnpermuteInput, StatusBuffer,
};
use moe_runtime::{DType, PermuteScratch, ScratchConfig};

use super::cpu::inputs;
use super::{Progress, Report, Row, Shape, block_weight_bytes, bytes_moved, median};

/// Median over 7 timings of `work` (CUDA events), in microseconds per `calls`.
fn time_events(
    stream: &Arc<CudaStream>,
    calls: usize,
    mut work: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.context().new_event(flags)?;
    let end = stream.context().new_event(flags)?;
    work()?;
    stream.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        start.record(stream)?;
        work()?;
        end.record(stream)?;
        end.synchronize()?;
        samples.push(start.elapsed_ms(&end)? as f64 * 1e3 / calls as f64);
    }
    Ok(median(samples))
}

/// Captures `work` into a CUDA graph; `None` when the work cannot be captured (the
/// capture is ended either way, so the stream stays usable).
fn capture(
    stream: &Arc<CudaStream>,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Option<CudaGraph>> {
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let worked = work();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    match (worked, graph) {
        (Ok(()), Ok(graph)) => Ok(graph),
        _ => {
            // Clear the error the failed capture left on the context.
            let _ = stream.synchronize();
            let _ = stream.context().check_err();
            Ok(None)
        }
    }
}

/// `calls` back to back in one graph, replayed; and launched eagerly. Microseconds per
/// call: (graph, eager); the graph time is `None` when the calls cannot be captured.
fn time_calls(
    stream: &Arc<CudaStream>,
    calls: usize,
    mut call: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<(Option<f64>, f64)> {
    let eager = time_events(stream, calls, || (0..calls).try_for_each(&mut call))?;
    let graph = capture(stream, || (0..calls).try_for_each(&mut call))?;
    let replay = match graph {
        Some(graph) => Some(time_events(stream, calls, || Ok(graph.launch()?))?),
        None => None,
    };
    Ok((replay, eager))
}

fn copy_bandwidth(stream: &Arc<CudaStream>) -> anyhow::Result<f64> {
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let us = time_events(stream, 1, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 / (us * 1e3))
}

/// One input set on the device, in memory from the stream-ordered pool (as a serving
/// stack's caching allocator hands out): allocated and freed per buffer with
/// `cuMemAlloc` instead, the input sets of one measurement landed where later graph
/// replays ran up to 0.8 us per call slower (measured on the H200; see
/// docs/benchmarks.md), which timed the allocator, not the calls.
struct DeviceSet {
    hidden: CudaSlice<bf16>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
}

impl DeviceSet {
    fn input(&self, shape: &Shape) -> anyhow::Result<DevicePermuteInput<'_>> {
        Ok(DevicePermuteInput::new(
            DeviceRows::new(cuda::DeviceView::new(&self.hidden), shape.hidden)?,
            DeviceTopkIds::new(
                DeviceExpertIds::I32(cuda::DeviceView::new(&self.ids)),
                shape.topk,
            )?,
        ))
    }
}

pub(crate) fn run(
    ordinal: usize,
    shapes: &[Shape],
    tokens: &[usize],
    block_tokens: &[usize],
) -> anyhow::Result<Report> {
    let device = CudaDevice::new(ordinal)?;
    // Timing and graph capture use cudarc on this stream; the calls under test get it
    // as their per-call stream.
    let stream = device.new_stream()?;
    // SAFETY: every buffer of the benchmark is used on this one stream only, so
    // cudarc's cross-stream events are not needed; with them, a view of a cudarc
    // slice would make the stream wait on an event recorded outside the capture.
    unsafe { stream.context().disable_event_tracking() };
    let call_stream = device.stream(&stream)?;
    let card = device.name()?;
    let l2 = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64;
    let mut progress = Progress::new(1 + shapes.len() * (2 * tokens.len() + block_tokens.len()));
    progress.next(format_args!("copy bandwidth on {card}"));
    let copy_gb_per_s = copy_bandwidth(&stream)?;
    let mut rows = Vec::new();
    for shape in shapes {
        for &n in tokens {
            let bytes = bytes_moved(shape, n);
            // Enough sets that one round touches 3x the L2 cache, within 4 GiB.
            let sets = (3 * l2)
                .div_ceil(bytes)
                .clamp(1, 256)
                .min((4u64 << 30) / bytes.max(1))
                .max(1) as usize;
            progress.next(format_args!(
                "{} N={n} permute ({sets} input sets)",
                shape.name
            ));
            let device_sets: Vec<DeviceSet> = (0..sets)
                .map(|s| {
                    let x = inputs(shape, n, (n * 1000 + s) as u64);
                    Ok(DeviceSet {
                        hidden: stream.clone_htod(&x.hidden)?,
                        ids: stream.clone_htod(&x.ids)?,
                        weights: stream.clone_htod(&x.weights)?,
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            let config =
                ScratchConfig::new(n, shape.topk, shape.experts, shape.experts, device.device())
                    .with_rows(shape.hidden, DType::BF16);
            let mut scratch = PermuteScratch::with_cuda_device(config, device.clone())?;
            let (scratch_graph, scratch_eager) = time_calls(&stream, sets, |s| {
                cuda::permute(&mut scratch, &call_stream, &device_sets[s].input(shape)?)?;
                Ok(())
            })?;
            let (alloc_graph, alloc_eager) = time_calls(&stream, sets, |s| {
                cuda::allocating::permute(
                    &device,
                    &call_stream,
                    &device_sets[s].input(shape)?,
                    shape.experts,
                    shape.experts,
                )?;
                Ok(())
            })?;
            rows.push(
                Row::new(
                    shape,
                    n,
                    "permute",
                    scratch_graph.unwrap_or(scratch_eager),
                    alloc_graph.unwrap_or(alloc_eager),
                )
                .with_eager(scratch_eager, alloc_eager),
            );

            progress.next(format_args!("{} N={n} unpermute", shape.name));
            let routed: Vec<cuda::allocating::Permuted<'_>> = device_sets
                .iter()
                .map(|set| {
                    Ok(cuda::allocating::permute(
                        &device,
                        &call_stream,
                        &set.input(shape)?,
                        shape.experts,
                        shape.experts,
                    )?)
                })
                .collect::<anyhow::Result<_>>()?;
            let mut outs: Vec<CudaSlice<bf16>> = (0..sets)
                .map(|_| Ok(stream.alloc_zeros::<bf16>(n * shape.hidden)?))
                .collect::<anyhow::Result<_>>()?;
            let status = StatusBuffer::new(&device)?;
            let combines: Vec<DeviceUnpermuteInput<'_>> = routed
                .iter()
                .zip(&device_sets)
                .map(|(owned, set)| {
                    let out = owned.output()?;
                    Ok(DeviceUnpermuteInput {
                        permuted_hidden_states: out.permuted_hidden_states,
                        inv_permuted_idx: out.inv_permuted_idx,
                        expert_first_token_offset: out.expert_first_token_offset,
                        topk_weights: cuda::DeviceView::new(&set.weights),
                        topk: shape.topk,
                        status: status.view(),
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            let (scratch_graph, scratch_eager) = time_calls(&stream, sets, |s| {
                let out = DeviceRowsMut::new(cuda::DeviceViewMut::new(&mut outs[s]), shape.hidden)?;
                Ok(cuda::unpermute_into(&call_stream, &combines[s], out)?)
            })?;
            let (alloc_graph, alloc_eager) = time_calls(&stream, sets, |s| {
                cuda::allocating::unpermute::<bf16>(&call_stream, &combines[s])?;
                Ok(())
            })?;
            rows.push(
                Row::new(
                    shape,
                    n,
                    "unpermute",
                    scratch_graph.unwrap_or(scratch_eager),
                    alloc_graph.unwrap_or(alloc_eager),
                )
                .with_eager(scratch_eager, alloc_eager),
            );
        }
        if block_tokens.is_empty() {
            continue;
        }
        let config = shape.block_config();
        let max_tokens = block_tokens.iter().copied().max().unwrap_or(1);
        let weights = MoeWeights::repeating(&config, 7)?;
        let workspace = SharedWorkspace::on_cuda_device(device.clone());
        let mut block = CudaMoeBlock::new(
            config,
            &weights,
            ExpertsKind::Grouped,
            device.clone(),
            workspace.clone(),
            max_tokens,
        )?;
        drop(weights);
        for &n in block_tokens {
            progress.next(format_args!("{} N={n} block", shape.name));
            let x = inputs(shape, n, 77 + n as u64);
            let hidden = DeviceBuffer::from_host(&device, &x.hidden)?;
            let mut time_block = |fresh: bool| -> anyhow::Result<f64> {
                let mut samples = Vec::new();
                for round in 0..8 {
                    if fresh {
                        block.use_workspace(SharedWorkspace::on_cuda_device(device.clone()))?;
                    } else {
                        block.use_workspace(workspace.clone())?;
                    }
                    stream.synchronize()?;
                    let start = Instant::now();
                    block.forward_device(&call_stream, hidden.view())?;
                    stream.synchronize()?;
                    if round > 0 {
                        samples.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
                Ok(median(samples))
            };
            let scratch_us = time_block(false)?;
            let alloc_us = time_block(true)?;
            let routed = block.forward(&call_stream, &x.hidden)?;
            let bytes = block_weight_bytes(block.config(), &routed.topk_ids);
            rows.push(Row::new(shape, n, "block", scratch_us, alloc_us).with_bytes(bytes));
        }
    }
    Ok(Report {
        device: format!("cuda:{ordinal}"),
        card,
        copy_gb_per_s,
        method: format!(
            "bf16; permute/unpermute: median of 7 replays of a CUDA graph of back-to-back calls rotating over input sets that touch >= 3x L2 ({} MiB), eager launches also shown; block: wall clock around one call incl. its host wait, median of 7, GB/s = weight bytes it must read (router, shared expert, experts chosen) / time; copy: 1 GiB device-to-device",
            l2 >> 20
        ),
        rows,
    })
}
