//! permute on a CUDA device: the routing kernels, then the row scatter.

use moe_kernels::kernels::{self, IdWidth, RowVector};
use moe_kernels::{
    AlignDims, PERMUTE_VECTORS_PER_THREAD, PermuteRowsParams, ROW_THREADS, RouteParams,
    RoutingDims, RowLayout, blocks_per_row,
};

use super::buffers::CudaBuffers;
use super::launch::{launch, route, route_chunks};
use super::memory::{
    DeviceExpertIds, DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceView,
    DeviceViewMut,
};
use crate::{CallShape, PermuteScratch, Result, RowSpec, ScratchConfig};

/// The inputs of permute, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DevicePermuteInput<'a> {
    /// `[N, H]`.
    pub hidden_states: DeviceRows<'a>,
    /// `[N, K]` global expert ids.
    pub topk_ids: DeviceTopkIds<'a>,
    /// `[E]`: global to local id, or -1. A malformed entry (outside `-1..L`) drops its
    /// entries: the device cannot report it without a host round trip.
    pub expert_map: Option<DeviceView<'a, i32>>,
    /// `[N, S]` per-token scales that travel with their rows.
    pub scales: Option<DeviceScales<'a>>,
}

impl<'a> DevicePermuteInput<'a> {
    pub fn new(hidden_states: DeviceRows<'a>, topk_ids: DeviceTopkIds<'a>) -> Self {
        Self {
            hidden_states,
            topk_ids,
            expert_map: None,
            scales: None,
        }
    }

    pub fn with_expert_map(mut self, expert_map: DeviceView<'a, i32>) -> Self {
        self.expert_map = Some(expert_map);
        self
    }

    pub fn with_scales(mut self, scales: DeviceScales<'a>) -> Self {
        self.scales = Some(scales);
        self
    }

    pub fn row_spec(&self) -> RowSpec {
        RowSpec {
            hidden_size: self.hidden_states.hidden_size(),
            dtype: self.hidden_states.dtype(),
            scale_columns: self.scales.map_or(0, |scales| scales.columns()),
        }
    }

    fn check(&self, scratch: &PermuteScratch, rows: Option<RowSpec>) -> Result<()> {
        let num_tokens = self.topk_ids.num_tokens();
        let mut devices = vec![
            ("hidden_states", self.hidden_states.bytes().device()),
            ("topk_ids", self.topk_ids.ids().device()),
        ];
        devices.extend(self.expert_map.map(|map| ("expert_map", map.device())));
        devices.extend(self.scales.map(|s| ("scales", s.data().device())));
        scratch.validate(&CallShape {
            num_tokens,
            topk: self.topk_ids.topk(),
            expert_map_len: self.expert_map.map(|map| map.len()),
            rows,
            align: false,
            devices: &devices,
        })?;
        // After the scratch, whose first check (N*K fits in i32) comes first.
        RowSpec::check_input_rows(
            num_tokens,
            self.hidden_states.num_rows(),
            self.scales.map(|scales| scales.num_rows()),
        )
    }
}

/// Caller-owned device destinations for the permuted rows.
#[derive(Debug)]
pub struct DevicePermuteDest<'a> {
    /// At least `[N*K, H]`, same dtype and `H` as the input.
    pub hidden_states: DeviceRowsMut<'a>,
    /// At least `[N*K, S]`; given exactly when the input has scales.
    pub scales: Option<DeviceViewMut<'a, f32>>,
}

/// The outputs of permute: device views sized for this call's `N`. They are written
/// by work queued on the device's stream; read them after it (on that stream).
#[derive(Clone, Copy, Debug)]
pub struct DevicePermuteOutput<'a> {
    /// `[N*K, H]`: rows at and after the valid count are not written.
    pub permuted_hidden_states: DeviceRows<'a>,
    pub permuted_scales: Option<DeviceScales<'a>>,
    /// `[L + 1]`: the last element is the valid count.
    pub expert_first_token_offset: DeviceView<'a, i64>,
    /// `[N*K]`.
    pub inv_permuted_idx: DeviceView<'a, i32>,
    /// `[N*K]`.
    pub permuted_idx: DeviceView<'a, i32>,
}

/// Permutes into the scratch's own `permuted_hidden_states`. Queues 2 to 4 kernels on
/// the scratch's stream; allocates nothing and never waits for the device, so it can
/// be captured in a CUDA graph.
pub fn permute<'s>(
    scratch: &'s mut PermuteScratch,
    input: &DevicePermuteInput<'_>,
) -> Result<DevicePermuteOutput<'s>> {
    let spec = input.row_spec();
    input.check(scratch, Some(spec))?;
    let (config, buffers) = scratch.cuda_buffers()?;
    let entries = input.topk_ids.ids().len();
    let rows = DeviceView::new(&buffers.permuted_rows).prefix(spec.rows_bytes(entries)?);
    let scales = (spec.scale_columns > 0)
        .then(|| DeviceView::new(&buffers.permuted_scales).prefix(entries * spec.scale_columns));
    enqueue(config, buffers, input, rows, scales)?;
    Ok(views(buffers, config, spec, rows, scales))
}

/// Permutes into caller-owned device buffers; the scratch holds only the index
/// buffers. Allocates nothing and never waits for the device.
pub fn permute_into<'o>(
    scratch: &'o mut PermuteScratch,
    input: &DevicePermuteInput<'_>,
    dest: DevicePermuteDest<'o>,
) -> Result<DevicePermuteOutput<'o>> {
    input.check(scratch, None)?;
    let spec = input.row_spec();
    let entries = input.topk_ids.ids().len();
    let (rows, dtype, hidden_size) = dest.hidden_states.into_parts();
    let scales_len = dest.scales.as_ref().map(|scales| scales.len());
    spec.check_destination(entries, dtype, hidden_size, rows.len(), scales_len)?;
    let device = scratch.device();
    let wrong_device = [rows.device()]
        .into_iter()
        .chain(dest.scales.as_ref().map(|s| s.device()))
        .find(|&d| d != device);
    if let Some(got) = wrong_device {
        return Err(crate::ScratchMismatch::Device {
            tensor: "permuted_hidden_states",
            expected: device,
            got,
        }
        .into());
    }
    let scales = dest.scales;
    let (config, buffers) = scratch.cuda_buffers()?;
    let rows = rows.into_view().prefix(spec.rows_bytes(entries)?);
    let scales = scales.map(|scales| scales.into_view().prefix(entries * spec.scale_columns));
    enqueue(config, buffers, input, rows, scales)?;
    Ok(views(buffers, config, spec, rows, scales))
}

/// Queues the routing kernels and the row scatter of a validated call.
fn enqueue(
    config: &ScratchConfig,
    buffers: &CudaBuffers,
    input: &DevicePermuteInput<'_>,
    rows: DeviceView<'_, u8>,
    scales: Option<DeviceView<'_, f32>>,
) -> Result<()> {
    let (rows, scales) = (rows.address(), scales.map_or(0, |s| s.address()));
    let dims = RoutingDims {
        num_tokens: input.topk_ids.num_tokens() as u32,
        topk: config.topk as u32,
        num_experts: config.num_experts as u32,
        num_local_experts: config.num_local_experts as u32,
    };
    let (chunk_entries, num_chunks) = route_chunks(dims.num_entries());
    let offsets = DeviceView::new(&buffers.expert_first_token_offset).address();
    let inv = DeviceView::new(&buffers.inv_permuted_idx).address();
    let route_params = RouteParams {
        dims,
        align: AlignDims {
            block_size: 1,
            max_padded_rows: 0,
        },
        chunk_entries,
        num_chunks,
        topk_ids: input.topk_ids.ids().address(),
        expert_map: input.expert_map.map_or(0, |map| map.address()),
        chunk_counts: DeviceView::new(&buffers.chunk_counts).address(),
        expert_offsets: offsets,
        inv_permuted_idx: inv,
        permuted_idx: DeviceView::new(&buffers.permuted_idx).address(),
        sorted_ids: 0,
        block_expert_ids: 0,
        num_rows_post_padded: 0,
    };
    let ids = match input.topk_ids.ids() {
        DeviceExpertIds::I32(_) => IdWidth::I32,
        DeviceExpertIds::I64(_) => IdWidth::I64,
    };
    route(&buffers.device, &route_params, false, ids)?;

    let source = input.hidden_states.bytes().address();
    let row_bytes = input.hidden_states.row_bytes();
    let rows_params = PermuteRowsParams {
        dims,
        layout: RowLayout {
            row_bytes: row_bytes as u32,
            scale_columns: input.scales.map_or(0, |s| s.columns() as u32),
        },
        hidden_states: source,
        scales: input.scales.map_or(0, |s| s.data().address()),
        inv_permuted_idx: inv,
        expert_offsets: offsets,
        permuted_hidden_states: rows,
        permuted_scales: scales,
    };
    let vector = RowVector::for_layout(row_bytes, source | rows);
    let vectors = row_bytes / vector.bytes();
    let parts = blocks_per_row(vectors as u32, PERMUTE_VECTORS_PER_THREAD, dims.num_tokens);
    launch(
        &buffers.device,
        kernels::permute_rows(vector),
        dims.num_tokens * parts,
        ROW_THREADS,
        &rows_params,
    )
}

pub(super) fn views<'a>(
    buffers: &'a CudaBuffers,
    config: &ScratchConfig,
    spec: RowSpec,
    rows: DeviceView<'a, u8>,
    scales: Option<DeviceView<'a, f32>>,
) -> DevicePermuteOutput<'a> {
    let entries = spec
        .row_bytes()
        .map_or(0, |row_bytes| rows.len() / row_bytes.max(1));
    DevicePermuteOutput {
        permuted_hidden_states: DeviceRows::from_parts(rows, spec.dtype, spec.hidden_size),
        permuted_scales: scales.map(|s| DeviceScales::from_parts(s, spec.scale_columns)),
        expert_first_token_offset: DeviceView::new(&buffers.expert_first_token_offset)
            .prefix(config.num_local_experts + 1),
        inv_permuted_idx: DeviceView::new(&buffers.inv_permuted_idx).prefix(entries),
        permuted_idx: DeviceView::new(&buffers.permuted_idx).prefix(entries),
    }
}
