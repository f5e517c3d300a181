//! The benchmark on a CUDA device: CUDA events, CUDA-graph replay, inputs rotated so
//! that the data touched exceeds the L2 cache.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, sys};
use half::bf16;
use moe_experts::cuda::ExpertGemm;
use moe_experts::{CudaMoeBlock, ExpertsKind, MoeWeights, SharedWorkspace};
use moe_kernels::GEMM_BM;
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
            // A scratch per input set: between two MoE layers the attention and expert
            // GEMMs evict the L2, so a layer's permute writes outputs that are not in
            // it; rotating the scratches with the inputs measures that (one reused
            // scratch kept its outputs in the L2).
            let mut scratches: Vec<PermuteScratch> = (0..sets)
                .map(|_| {
                    Ok(PermuteScratch::with_cuda_device(
                        config.clone(),
                        device.clone(),
                    )?)
                })
                .collect::<anyhow::Result<_>>()?;
            let (scratch_graph, scratch_eager) = time_calls(&stream, sets, |s| {
                cuda::permute(
                    &mut scratches[s],
                    &call_stream,
                    &device_sets[s].input(shape)?,
                )?;
                Ok(())
            })?;
            drop(scratches);
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
            config.clone(),
            &weights,
            ExpertsKind::Grouped,
            device.clone(),
            workspace.clone(),
            max_tokens,
        )?;
        // Humming's indexed backend (align, gather GEMM), where the GPU runs it.
        let mut indexed = CudaMoeBlock::new(
            config,
            &weights,
            ExpertsKind::HummingIndexed {
                block_size: GEMM_BM as usize,
            },
            device.clone(),
            SharedWorkspace::on_cuda_device(device.clone()),
            max_tokens,
        )
        .ok();
        drop(weights);
        for &n in block_tokens {
            progress.next(format_args!("{} N={n} block", shape.name));
            // Fresh inputs every call: four input sets, rotated.
            let sets: Vec<DeviceBuffer<bf16>> = (0..4)
                .map(|s| {
                    Ok(DeviceBuffer::from_host(
                        &device,
                        &inputs(shape, n, 77 + (n * 10 + s) as u64).hidden,
                    )?)
                })
                .collect::<anyhow::Result<_>>()?;
            // The grouped kernels (no host wait): a CUDA graph of one call per set,
            // replayed, after a warm-up call that builds the scratch and activations.
            let grouped = block.set_expert_gemm(ExpertGemm::Grouped).is_ok();
            block.forward_device(&call_stream, sets[0].view())?;
            stream.synchronize()?;
            let (graph_us, eager_us) = time_calls(&stream, sets.len(), |s| {
                block.forward_device(&call_stream, sets[s].view())?;
                Ok(())
            })?;
            let indexed_us = match indexed.as_mut() {
                Some(indexed) => {
                    indexed.forward_device(&call_stream, sets[0].view())?;
                    stream.synchronize()?;
                    let (graph, eager) = time_calls(&stream, sets.len(), |s| {
                        indexed.forward_device(&call_stream, sets[s].view())?;
                        Ok(())
                    })?;
                    Some((graph.unwrap_or(eager), eager))
                }
                None => None,
            };
            // The cuBLAS path waits on the host: wall clock around each call.
            block.set_expert_gemm(ExpertGemm::Cublas)?;
            let mut samples = Vec::new();
            for round in 0..9 {
                stream.synchronize()?;
                let start = Instant::now();
                block.forward_device(&call_stream, sets[round % sets.len()].view())?;
                stream.synchronize()?;
                if round > 0 {
                    samples.push(start.elapsed().as_secs_f64() * 1e6);
                }
            }
            let cublas_us = median(samples);
            // The dense bf16 GEMMs of the same total size on cuBLAS (N*K rows through
            // one [2I, H] and one [H, I] weight): the practical compute line.
            let dense_us = dense_gemm_us(&device, &stream, &call_stream, block.config(), n)?;
            block.set_expert_gemm(ExpertGemm::Auto)?;
            let x = inputs(shape, n, 77 + n as u64 * 10);
            let routed = block.forward(&call_stream, &x.hidden)?;
            let bytes = block_weight_bytes(block.config(), &routed.topk_ids);
            if grouped {
                rows.push(
                    Row::block(shape, n, "block", graph_us.unwrap_or(eager_us))
                        .with_eager_call(eager_us)
                        .with_bytes(bytes),
                );
            }
            if let Some((graph, eager)) = indexed_us {
                rows.push(
                    Row::block(shape, n, "block-indexed", graph)
                        .with_eager_call(eager)
                        .with_bytes(bytes),
                );
            }
            rows.push(Row::block(shape, n, "block-cublas", cublas_us).with_bytes(bytes));
            rows.push(Row::block(shape, n, "dense-gemm", dense_us));
        }
    }
    Ok(Report {
        device: format!("cuda:{ordinal}"),
        card,
        copy_gb_per_s,
        method: format!(
            "bf16; permute/unpermute: median of 7 replays of a CUDA graph of back-to-back calls rotating over input sets that touch >= 3x L2 ({} MiB), permute's outputs rotating too (a scratch per set), eager launches also shown; block: the grouped-GEMM block by CUDA-graph replay of one call per input set (4 sets, eager beside it), block-cublas (expert GEMMs on cuBLAS after a host wait) by wall clock around a call, median of 8, GB/s = weight bytes it must read (router, shared expert, experts chosen) / time; copy: 1 GiB device-to-device",
            l2 >> 20
        ),
        rows,
    })
}

/// Microseconds of the two dense bf16 GEMMs with the expert GEMMs' total size for `n`
/// tokens, on cuBLAS, by CUDA-graph replay (eager where capture fails).
fn dense_gemm_us(
    device: &Arc<CudaDevice>,
    stream: &Arc<CudaStream>,
    call_stream: &cuda::Stream<'_>,
    config: &moe_experts::MoeConfig,
    n: usize,
) -> anyhow::Result<f64> {
    let (h, i, rows) = (
        config.hidden_size,
        config.intermediate_size,
        n * config.top_k,
    );
    let mut blas = moe_experts::cuda::Blas::new(device.clone())?;
    let x = DeviceBuffer::<bf16>::zeros(device, rows * h)?;
    let w13 = DeviceBuffer::<bf16>::zeros(device, 2 * i * h)?;
    let w2 = DeviceBuffer::<bf16>::zeros(device, h * i)?;
    let mut y13 = DeviceBuffer::<bf16>::zeros(device, rows * 2 * i)?;
    let mut y2 = DeviceBuffer::<bf16>::zeros(device, rows * h)?;
    let (graph, eager) = time_calls(stream, 1, |_| {
        blas.matmul_nt(
            call_stream,
            (rows, 2 * i, h),
            x.view(),
            w13.view(),
            y13.view_mut(),
        )?;
        blas.matmul_nt(
            call_stream,
            (rows, h, i),
            y13.view().prefix(rows * i),
            w2.view(),
            y2.view_mut(),
        )?;
        Ok(())
    })?;
    Ok(graph.unwrap_or(eager))
}
