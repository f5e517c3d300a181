//! permute on a CUDA device: the routing kernels, then the row scatter; a small call
//! (at most `FUSED_MAX_ENTRIES` entries of 16-byte rows) in one fused launch.

use moe_kernels::kernels::{IdWidth, Kernel, RowVector};
use moe_kernels::{
    AlignDims, FUSED_MAX_ENTRIES, PERMUTE_VECTORS_PER_THREAD, PermuteFusedParams,
    PermuteRowsParams, ROUTE_THREADS, ROW_THREADS, RouteParams, RoutingDims, RowLayout,
    blocks_per_row,
};

use super::buffers::{Carving, CudaBuffers, Region};
use super::device::Stream;
use super::launch::{Grid, launch, route, route_chunks};
use super::memory::{
    Binding, CallViews, DeviceExpertIds, DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds,
    DeviceView, DeviceViewMut,
};
use super::status::{DeviceStatus, StatusOp};
use crate::{CallShape, MoeError, PermuteScratch, Result, RowSpec, ScratchConfig};

/// The inputs of permute, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DevicePermuteInput<'a> {
    /// `[N, H]`.
    pub hidden_states: DeviceRows<'a>,
    /// `[N, K]` global expert ids.
    pub topk_ids: DeviceTopkIds<'a>,
    /// `[E]`: global to local id, or -1. A malformed entry (outside `-1..L`) is
    /// reported in the scratch's status block (see [`super::DeviceStatus`]).
    pub expert_map: Option<DeviceView<'a, i32>>,
    /// `[N, S]` per-token scales that travel with their rows.
    pub scales: Option<DeviceScales<'a>>,
}

impl<'a> DevicePermuteInput<'a> {
    /// The inputs of a call without `expert_map` (global ids are local ids) and
    /// without scales.
    pub fn new(hidden_states: DeviceRows<'a>, topk_ids: DeviceTopkIds<'a>) -> Self {
        Self {
            hidden_states,
            topk_ids,
            expert_map: None,
            scales: None,
        }
    }

    /// Routes through `expert_map` `[E]` (expert parallelism).
    pub fn with_expert_map(mut self, expert_map: DeviceView<'a, i32>) -> Self {
        self.expert_map = Some(expert_map);
        self
    }

    /// Moves `scales` `[N, S]` with their rows.
    pub fn with_scales(mut self, scales: DeviceScales<'a>) -> Self {
        self.scales = Some(scales);
        self
    }

    /// The layout of the rows this call moves.
    pub fn row_spec(&self) -> RowSpec {
        RowSpec {
            hidden_size: self.hidden_states.hidden_size(),
            dtype: self.hidden_states.dtype(),
            scale_columns: self.scales.map_or(0, |scales| scales.columns()),
        }
    }

    /// The input's views, by name.
    fn views(&self) -> CallViews {
        let mut views = CallViews::new()
            .with(
                "hidden_states",
                self.hidden_states.bytes().device(),
                self.hidden_states.bytes().binding(),
            )
            .with(
                "topk_ids",
                self.topk_ids.ids().device(),
                self.topk_ids.ids().binding(),
            );
        if let Some(map) = self.expert_map {
            views = views.with("expert_map", map.device(), map.binding());
        }
        if let Some(scales) = self.scales {
            views = views.with("scales", scales.data().device(), scales.data().binding());
        }
        views
    }

    /// Checks the call against the scratch, in the contract's order (the same checks
    /// as the CPU's), then the input's row counts.
    fn check(
        &self,
        scratch: &PermuteScratch,
        views: &CallViews,
        rows: Option<RowSpec>,
    ) -> Result<()> {
        let num_tokens = self.topk_ids.num_tokens();
        scratch.validate(&CallShape {
            num_tokens,
            topk: self.topk_ids.topk(),
            expert_map_len: self.expert_map.map(|map| map.len()),
            rows,
            align: false,
            devices: views.devices(),
        })?;
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

/// The outputs of permute: device views sized for this call's `N`, bound to the
/// call's stream (the work that writes them is queued there).
#[derive(Clone, Copy, Debug)]
pub struct DevicePermuteOutput<'a> {
    /// `[N*K, H]`: rows at and after the valid count are not written.
    pub permuted_hidden_states: DeviceRows<'a>,
    /// `[N*K, S]`, when the input has scales.
    pub permuted_scales: Option<DeviceScales<'a>>,
    /// `[L + 1]`: the last element is the valid count.
    pub expert_first_token_offset: DeviceView<'a, i64>,
    /// `[N*K]`.
    pub inv_permuted_idx: DeviceView<'a, i32>,
    /// `[N*K]`.
    pub permuted_idx: DeviceView<'a, i32>,
    /// The scratch's status block: where this call reported bad input, and where the
    /// unpermute of the same layer can report its own.
    pub status: DeviceStatus<'a>,
}

/// Permutes into the scratch's own `permuted_hidden_states`, on `stream`. Queues 2 to
/// 4 kernels; allocates nothing and never waits for the device (in checked mode it
/// reads the status back), so it can be captured in a CUDA graph.
pub fn permute<'s>(
    scratch: &'s mut PermuteScratch,
    stream: &Stream<'_>,
    input: &DevicePermuteInput<'_>,
) -> Result<DevicePermuteOutput<'s>> {
    let spec = input.row_spec();
    let views = input.views();
    input.check(scratch, &views, Some(spec))?;
    let (config, buffers) = scratch.cuda_buffers_mut(stream.device().device())?;
    let binding = buffers.enter(stream)?;
    views.check_streams(stream)?;
    let entries = input.topk_ids.ids().len();
    let rows = DeviceView::from_parts(
        buffers.address(|c| c.permuted_rows),
        spec.rows_bytes(entries)?,
        buffers.device.ordinal(),
        binding,
    );
    let scales = (spec.scale_columns > 0).then(|| {
        DeviceView::from_parts(
            buffers.address(|c| c.permuted_scales),
            entries * spec.scale_columns,
            buffers.device.ordinal(),
            binding,
        )
    });
    enqueue(stream, config, buffers, input, rows, scales)?;
    views.record(stream)?;
    finish(stream, config, buffers, binding, spec, rows, scales)
}

/// Permutes into caller-owned device buffers on `stream`; the scratch holds only the
/// index buffers. Allocates nothing and never waits for the device (but in checked
/// mode).
pub fn permute_into<'o>(
    scratch: &'o mut PermuteScratch,
    stream: &Stream<'_>,
    input: &DevicePermuteInput<'_>,
    dest: DevicePermuteDest<'o>,
) -> Result<DevicePermuteOutput<'o>> {
    let views = input.views();
    input.check(scratch, &views, None)?;
    let spec = input.row_spec();
    let entries = input.topk_ids.ids().len();
    let (rows, dtype, hidden_size) = dest.hidden_states.into_parts();
    let scales_len = dest.scales.as_ref().map(|scales| scales.len());
    spec.check_destination(entries, dtype, hidden_size, rows.len(), scales_len)?;
    let mut dest_views =
        CallViews::new().with("permuted_hidden_states", rows.device(), rows.binding());
    if let Some(scales) = &dest.scales {
        dest_views = dest_views.with("permuted_scales", scales.device(), scales.binding());
    }
    dest_views.check_devices(scratch.device())?;
    let (config, buffers) = scratch.cuda_buffers_mut(stream.device().device())?;
    let binding = buffers.enter(stream)?;
    views.check_streams(stream)?;
    dest_views.check_streams(stream)?;
    let rows = rows.into_view().prefix(spec.rows_bytes(entries)?);
    let scales = dest
        .scales
        .map(|scales| scales.into_view().prefix(entries * spec.scale_columns));
    enqueue(stream, config, buffers, input, rows, scales)?;
    views.record(stream)?;
    dest_views.record(stream)?;
    finish(stream, config, buffers, binding, spec, rows, scales)
}

/// Queues the routing kernels and the row scatter of a validated call.
fn enqueue(
    stream: &Stream<'_>,
    config: &ScratchConfig,
    buffers: &CudaBuffers,
    input: &DevicePermuteInput<'_>,
    rows: DeviceView<'_, u8>,
    scales: Option<DeviceView<'_, f32>>,
) -> Result<()> {
    let row_bytes = input.hidden_states.row_bytes();
    let Ok(row_bytes_u32) = u32::try_from(row_bytes) else {
        return Err(MoeError::DeviceLimit {
            quantity: "the bytes of a row of hidden_states",
            value: row_bytes as u128,
            max: u32::MAX.into(),
        });
    };
    let (rows, scales) = (rows.address(), scales.map_or(0, |s| s.address()));
    // The scratch's validation keeps N*K, E and L within i32.
    let dims = RoutingDims {
        num_tokens: input.topk_ids.num_tokens() as u32,
        topk: config.topk as u32,
        num_experts: config.num_experts as u32,
        num_local_experts: config.num_local_experts as u32,
    };
    let (chunk_entries, num_chunks) = route_chunks(dims.num_entries(), false);
    let offsets = buffers.address(|c| c.expert_first_token_offset);
    let inv = buffers.address(|c| c.inv_permuted_idx);
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
        chunk_counts: buffers.address(|c| c.chunk_counts),
        expert_offsets: offsets,
        inv_permuted_idx: inv,
        permuted_idx: buffers.address(|c| c.permuted_idx),
        sorted_ids: 0,
        block_expert_ids: 0,
        num_rows_post_padded: 0,
        call: StatusOp::Permute.next_call(),
        status: buffers.address(|c| c.status),
    };
    let ids = match input.topk_ids.ids() {
        DeviceExpertIds::I32(_) => IdWidth::I32,
        DeviceExpertIds::I64(_) => IdWidth::I64,
    };
    let source = input.hidden_states.bytes().address();
    let rows_params = PermuteRowsParams {
        dims,
        layout: RowLayout {
            row_bytes: row_bytes_u32,
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
    if dims.num_entries() <= FUSED_MAX_ENTRIES && vector == RowVector::Bytes16 {
        // A small call in one launch: every block routes the few entries itself.
        let fused = match ids {
            IdWidth::I32 => Kernel::PermuteFusedI32,
            IdWidth::I64 => Kernel::PermuteFusedI64,
        };
        let grid = Grid {
            blocks: dims.num_entries().max(1),
            threads: ROUTE_THREADS,
        };
        let params = PermuteFusedParams {
            route: route_params,
            rows: rows_params,
        };
        // SAFETY: as below; one chunk of at most FUSED_MAX_ENTRIES entries, a block
        // per entry (one at least, which writes the offsets of an empty call); rows
        // of whole 16-byte vectors at 16-byte aligned addresses (`Bytes16`).
        return unsafe { launch(stream, fused, grid, &params) };
    }
    let vectors = (row_bytes / vector.bytes()) as u32;
    let parts = blocks_per_row(vectors, PERMUTE_VECTORS_PER_THREAD, dims.num_tokens);
    let grid = Grid {
        blocks: dims.num_tokens * parts,
        threads: ROW_THREADS,
    };
    // SAFETY: the call was validated against the scratch, whose buffers are sized
    // for its largest call; the inputs hold `N` rows, `N*K` ids, `E` map entries and
    // `N` scale rows (checked); the destination `N*K` rows (sized above or checked);
    // every view is usable on `stream` (checked), where the kernels are queued.
    unsafe {
        route(stream, &route_params, false, ids)?;
        launch(stream, Kernel::permute_rows(vector), grid, &rows_params)
    }
}

/// The outputs of a queued call; in checked mode, after reading the status back.
fn finish<'a>(
    stream: &Stream<'_>,
    config: &ScratchConfig,
    buffers: &'a CudaBuffers,
    binding: Binding,
    spec: RowSpec,
    rows: DeviceView<'a, u8>,
    scales: Option<DeviceView<'a, f32>>,
) -> Result<DevicePermuteOutput<'a>> {
    buffers.status(binding).after_call(stream)?;
    Ok(outputs(config, buffers, binding, spec, rows, scales))
}

/// The views of a call's outputs: `rows` and `scales` as given, the index buffers of
/// the scratch sized for the call's `N*K` (the rows' count).
pub(super) fn outputs<'a>(
    config: &ScratchConfig,
    buffers: &'a CudaBuffers,
    binding: Binding,
    spec: RowSpec,
    rows: DeviceView<'a, u8>,
    scales: Option<DeviceView<'a, f32>>,
) -> DevicePermuteOutput<'a> {
    let entries = spec
        .row_bytes()
        .map_or(0, |row_bytes| rows.len() / row_bytes.max(1));
    let ordinal = buffers.device.ordinal();
    let view = |region: fn(&Carving) -> Region, len| {
        DeviceView::from_parts(buffers.address(region), len, ordinal, binding)
    };
    let index = |region: fn(&Carving) -> Region, len| {
        DeviceView::from_parts(buffers.address(region), len, ordinal, binding)
    };
    DevicePermuteOutput {
        permuted_hidden_states: DeviceRows::from_parts(rows, spec.dtype, spec.hidden_size),
        permuted_scales: scales.map(|s| DeviceScales::from_parts(s, spec.scale_columns)),
        expert_first_token_offset: view(
            |c| c.expert_first_token_offset,
            config.num_local_experts + 1,
        ),
        inv_permuted_idx: index(|c| c.inv_permuted_idx, entries),
        permuted_idx: index(|c| c.permuted_idx, entries),
        status: buffers.status(binding),
    }
}
