//! align on a CUDA device: the routing kernels writing `sorted_ids`.

use moe_kernels::kernels::IdWidth;
use moe_kernels::{AlignDims, RouteParams, RoutingDims};

use super::device::Stream;
use super::launch::{route, route_chunks};
use super::memory::{CallViews, DeviceExpertIds, DeviceTopkIds, DeviceView};
use super::status::{DeviceStatus, StatusOp};
use crate::config::max_padded_rows;
use crate::{CallShape, PermuteScratch, Result, ScratchMismatch};

/// The outputs of align: device views sized for this call's `N`, bound to the call's
/// stream (see `cpu::AlignOutput` for their contents).
#[derive(Clone, Copy, Debug)]
pub struct DeviceAlignOutput<'a> {
    /// `[N*K + min(L, N*K) * (block_size - 1)]`: flat entries `t*K + k` grouped by
    /// local expert, each group padded to a multiple of `block_size`; padding and the
    /// tail hold `N*K`.
    pub sorted_ids: DeviceView<'a, i32>,
    /// `[ceil(len(sorted_ids) / block_size)]`: the local expert of each block, -1 for
    /// a block at or after `num_rows_post_padded`.
    pub block_expert_ids: DeviceView<'a, i32>,
    /// One i32, left on the device: reading it would be a host round trip.
    pub num_rows_post_padded: DeviceView<'a, i32>,
    /// The scratch's align block size: rows per block of `sorted_ids`.
    pub block_size: usize,
    /// The scratch's status block, where a malformed `expert_map` entry is reported.
    pub status: DeviceStatus<'a>,
}

/// Queues the index-only sort on `stream`. Allocates nothing and never waits for the
/// device (but in checked mode).
pub fn align<'s>(
    scratch: &'s mut PermuteScratch,
    stream: &Stream<'_>,
    topk_ids: &DeviceTopkIds<'_>,
    expert_map: Option<DeviceView<'_, i32>>,
) -> Result<DeviceAlignOutput<'s>> {
    let mut views = CallViews::new().with(
        "topk_ids",
        topk_ids.ids().device(),
        topk_ids.ids().binding(),
    );
    if let Some(map) = expert_map {
        views = views.with("expert_map", map.device(), map.binding());
    }
    scratch.validate(&CallShape {
        num_tokens: topk_ids.num_tokens(),
        topk: topk_ids.topk(),
        expert_map_len: expert_map.map(|map| map.len()),
        rows: None,
        align: true,
        devices: views.devices(),
    })?;
    let (config, buffers) = scratch.cuda_buffers_mut(stream.device().device())?;
    let Some(block_size) = config.align_block_size else {
        return Err(ScratchMismatch::NoAlignBuffers.into());
    };
    let binding = buffers.enter(stream)?;
    views.check_streams(stream)?;
    // The scratch's validation keeps N*K, E, L and the padded length within i32.
    let dims = RoutingDims {
        num_tokens: topk_ids.num_tokens() as u32,
        topk: config.topk as u32,
        num_experts: config.num_experts as u32,
        num_local_experts: config.num_local_experts as u32,
    };
    let len = max_padded_rows(
        dims.num_entries() as usize,
        config.num_local_experts,
        block_size,
    );
    let (chunk_entries, num_chunks) = route_chunks(dims.num_entries(), true);
    let ordinal = buffers.device.ordinal();
    let sorted_ids =
        DeviceView::from_parts(buffers.address(|c| c.sorted_ids), len, ordinal, binding);
    let block_expert_ids = DeviceView::from_parts(
        buffers.address(|c| c.block_expert_ids),
        len.div_ceil(block_size),
        ordinal,
        binding,
    );
    let num_rows_post_padded = DeviceView::from_parts(
        buffers.address(|c| c.num_rows_post_padded),
        1,
        ordinal,
        binding,
    );
    let params = RouteParams {
        dims,
        align: AlignDims {
            block_size: block_size as u32,
            max_padded_rows: len as u32,
        },
        chunk_entries,
        num_chunks,
        topk_ids: topk_ids.ids().address(),
        expert_map: expert_map.map_or(0, |map| map.address()),
        chunk_counts: buffers.address(|c| c.chunk_counts),
        expert_offsets: buffers.address(|c| c.padded_offsets),
        inv_permuted_idx: 0,
        permuted_idx: 0,
        sorted_ids: sorted_ids.address(),
        block_expert_ids: block_expert_ids.address(),
        num_rows_post_padded: num_rows_post_padded.address(),
        call: StatusOp::Align.next_call(),
        status: buffers.address(|c| c.status),
    };
    let ids = match topk_ids.ids() {
        DeviceExpertIds::I32(_) => IdWidth::I32,
        DeviceExpertIds::I64(_) => IdWidth::I64,
    };
    // SAFETY: validated against the scratch, whose align buffers are sized for its
    // largest call; `N*K` ids and `E` map entries given (checked); every view is
    // usable on `stream`, where the kernels are queued.
    unsafe { route(stream, &params, true, ids)? };
    views.record(stream)?;
    let status = buffers.status(binding);
    status.after_call(stream)?;
    Ok(DeviceAlignOutput {
        sorted_ids,
        block_expert_ids,
        num_rows_post_padded,
        block_size,
        status,
    })
}
