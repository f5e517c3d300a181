//! align on a CUDA device: the routing kernels writing `sorted_ids`.

use moe_kernels::kernels::IdWidth;
use moe_kernels::{AlignDims, RouteParams, RoutingDims};

use super::launch::{route, route_chunks};
use super::memory::{DeviceExpertIds, DeviceTopkIds, DeviceView};
use crate::config::max_padded_rows;
use crate::{CallShape, PermuteScratch, Result, ScratchMismatch};

/// The outputs of align: device views sized for this call's `N` (see
/// `cpu::AlignOutput` for their contents).
#[derive(Clone, Copy, Debug)]
pub struct DeviceAlignOutput<'a> {
    pub sorted_ids: DeviceView<'a, i32>,
    pub block_expert_ids: DeviceView<'a, i32>,
    /// One i32, left on the device: reading it would be a host round trip.
    pub num_rows_post_padded: DeviceView<'a, i32>,
    pub block_size: usize,
}

/// Queues the index-only sort on the scratch's stream. Allocates nothing and never
/// waits for the device.
pub fn align<'s>(
    scratch: &'s mut PermuteScratch,
    topk_ids: &DeviceTopkIds<'_>,
    expert_map: Option<DeviceView<'_, i32>>,
) -> Result<DeviceAlignOutput<'s>> {
    let mut devices = vec![("topk_ids", topk_ids.ids().device())];
    devices.extend(expert_map.map(|map| ("expert_map", map.device())));
    scratch.validate(&CallShape {
        num_tokens: topk_ids.num_tokens(),
        topk: topk_ids.topk(),
        expert_map_len: expert_map.map(|map| map.len()),
        rows: None,
        align: true,
        devices: &devices,
    })?;
    let (config, buffers) = scratch.cuda_buffers()?;
    let Some(block_size) = config.align_block_size else {
        return Err(ScratchMismatch::NoAlignBuffers.into());
    };
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
    let (chunk_entries, num_chunks) = route_chunks(dims.num_entries());
    let sorted_ids = DeviceView::new(&buffers.sorted_ids).prefix(len);
    let block_expert_ids =
        DeviceView::new(&buffers.block_expert_ids).prefix(len.div_ceil(block_size));
    let num_rows_post_padded = DeviceView::new(&buffers.num_rows_post_padded);
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
        chunk_counts: DeviceView::new(&buffers.chunk_counts).address(),
        expert_offsets: DeviceView::new(&buffers.padded_offsets).address(),
        inv_permuted_idx: 0,
        permuted_idx: 0,
        sorted_ids: sorted_ids.address(),
        block_expert_ids: block_expert_ids.address(),
        num_rows_post_padded: num_rows_post_padded.address(),
    };
    let ids = match topk_ids.ids() {
        DeviceExpertIds::I32(_) => IdWidth::I32,
        DeviceExpertIds::I64(_) => IdWidth::I64,
    };
    route(&buffers.device, &params, true, ids)?;
    Ok(DeviceAlignOutput {
        sorted_ids,
        block_expert_ids,
        num_rows_post_padded,
        block_size,
    })
}
