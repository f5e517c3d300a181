//! permute on the CPU: group every token's rows by local expert.

use rayon::prelude::*;

use super::buffers::{CpuBuffers, IndexBuffers};
use super::disjoint::DisjointSlice;
use super::routing::{self, Chunks};
use crate::{
    CallShape, Device, MoeError, PermuteScratch, Result, RowSpec, Rows, RowsMut, Scales,
    ScratchConfig, TopkIds,
};

/// Source bytes (one row plus its `K` copies) one parallel task moves at least: large
/// enough to amortise scheduling, small enough to balance two to a few dozen threads.
const TASK_BYTES: usize = 64 * 1024;

/// The inputs of permute.
#[derive(Clone, Copy, Debug)]
pub struct PermuteInput<'a> {
    /// `[N, H]`.
    pub hidden_states: Rows<'a>,
    /// `[N, K]` global expert ids.
    pub topk_ids: TopkIds<'a>,
    /// `[E]`: global id to local id, or -1 for an expert on another rank.
    pub expert_map: Option<&'a [i32]>,
    /// `[N, S]` per-token scales that travel with their rows.
    pub scales: Option<Scales<'a>>,
}

impl<'a> PermuteInput<'a> {
    /// The inputs of a call without `expert_map` (global ids are local ids) and
    /// without scales.
    pub fn new(hidden_states: Rows<'a>, topk_ids: TopkIds<'a>) -> Self {
        Self {
            hidden_states,
            topk_ids,
            expert_map: None,
            scales: None,
        }
    }

    /// Routes through `expert_map` `[E]` (expert parallelism).
    pub fn with_expert_map(mut self, expert_map: &'a [i32]) -> Self {
        self.expert_map = Some(expert_map);
        self
    }

    /// Moves `scales` `[N, S]` with their rows.
    pub fn with_scales(mut self, scales: Scales<'a>) -> Self {
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

    /// Checks that every tensor agrees on `N`.
    fn check_shapes(&self) -> Result<()> {
        RowSpec::check_input_rows(
            self.topk_ids.num_tokens(),
            self.hidden_states.num_rows(),
            self.scales.map(|scales| scales.num_rows()),
        )
    }

    fn call_shape(&self, rows: Option<RowSpec>) -> CallShape<'static> {
        CallShape {
            num_tokens: self.topk_ids.num_tokens(),
            topk: self.topk_ids.topk(),
            expert_map_len: self.expert_map.map(<[i32]>::len),
            rows,
            align: false,
            devices: &[("hidden_states", Device::Cpu), ("topk_ids", Device::Cpu)],
        }
    }
}

/// Caller-owned destinations for the permuted rows, for a scratch that does not own
/// them (the CUTLASS-style backends' case).
#[derive(Debug)]
pub struct PermuteDest<'a> {
    /// At least `[N*K, H]`, same dtype and `H` as the input.
    pub hidden_states: RowsMut<'a>,
    /// At least `[N*K, S]`; given exactly when the input has scales.
    pub scales: Option<&'a mut [f32]>,
}

/// The outputs of permute: views sized for this call's `N`.
#[derive(Clone, Copy, Debug)]
pub struct PermuteOutput<'a> {
    /// `[N*K, H]`: rows at and after [`Self::num_valid_rows`] are not written.
    pub permuted_hidden_states: Rows<'a>,
    /// `[N*K, S]`, when the input has scales.
    pub permuted_scales: Option<Scales<'a>>,
    /// `[L + 1]`: first row of each local expert; the last element is the valid count.
    pub expert_first_token_offset: &'a [i64],
    /// `[N*K]`: the row of entry `t*K + k`, or `N*K` for a dropped entry.
    pub inv_permuted_idx: &'a [i32],
    /// `[N*K]`: the entry `t*K + k` each valid row holds, `N*K` after the valid rows.
    pub permuted_idx: &'a [i32],
}

impl PermuteOutput<'_> {
    /// Rows that hold a kept entry: `expert_first_token_offset[L]`.
    pub fn num_valid_rows(&self) -> usize {
        self.expert_first_token_offset
            .last()
            .map_or(0, |&v| v as usize)
    }
}

/// Permutes into the scratch's own `permuted_hidden_states`.
///
/// Allocates nothing. The scratch must have been built with
/// [`ScratchConfig::with_rows`] for this dtype and hidden size.
pub fn permute<'s>(
    scratch: &'s mut PermuteScratch,
    input: &PermuteInput<'_>,
) -> Result<PermuteOutput<'s>> {
    let spec = input.row_spec();
    // The scratch first: its first check, that N*K fits in i32, comes before anything
    // else (docs/contract.md).
    scratch.validate(&input.call_shape(Some(spec)))?;
    input.check_shapes()?;
    let (config, buffers) = scratch.cpu_buffers()?;
    check_expert_map(input.expert_map, config.num_local_experts)?;
    let entries = input.topk_ids.ids().len();
    let (rows_bytes, scales_len) = (spec.rows_bytes(entries)?, spec.scales_len(entries)?);
    let CpuBuffers {
        index,
        permuted_rows,
        permuted_scales,
        ..
    } = buffers;
    // Validated: the call's rows are the scratch's, and N*K <= max_num_tokens*K.
    let rows = &mut bytemuck::cast_slice_mut(permuted_rows)[..rows_bytes];
    let scales = &mut permuted_scales[..scales_len];
    compute(config, index, input, rows, scales);
    Ok(views(config, index, spec, entries, rows, scales))
}

/// Permutes into caller-owned buffers; the scratch holds only the index buffers.
///
/// Allocates nothing.
pub fn permute_into<'o>(
    scratch: &'o mut PermuteScratch,
    input: &PermuteInput<'_>,
    dest: PermuteDest<'o>,
) -> Result<PermuteOutput<'o>> {
    // The scratch first, as in `permute`.
    scratch.validate(&input.call_shape(None))?;
    input.check_shapes()?;
    let entries = input.topk_ids.ids().len();
    let spec = input.row_spec();
    let (rows, dtype, hidden_size) = dest.hidden_states.into_parts();
    let scales_len = dest.scales.as_ref().map(|scales| scales.len());
    spec.check_destination(entries, dtype, hidden_size, rows.len(), scales_len)?;
    // Checked by `check_destination`: both fit in the destination.
    let scales = match dest.scales {
        Some(scales) => &mut scales[..spec.scales_len(entries)?],
        None => &mut [][..],
    };
    let rows = &mut rows[..spec.rows_bytes(entries)?];
    let (config, buffers) = scratch.cpu_buffers()?;
    check_expert_map(input.expert_map, config.num_local_experts)?;
    compute(config, &mut buffers.index, input, rows, scales);
    Ok(views(config, &buffers.index, spec, entries, rows, scales))
}

/// Every local id of `expert_map` must be -1 or a local expert: a wrong map is an
/// error, never an out-of-range group.
pub(super) fn check_expert_map(expert_map: Option<&[i32]>, num_local: usize) -> Result<()> {
    let Some(map) = expert_map else {
        return Ok(());
    };
    match map
        .iter()
        .position(|&local| local < -1 || local >= num_local as i32)
    {
        Some(index) => Err(MoeError::ExpertMapEntry {
            index,
            value: map[index],
            num_local_experts: num_local,
        }),
        None => Ok(()),
    }
}

/// The whole of permute, for a validated call: index work, then the row scatter.
fn compute(
    config: &ScratchConfig,
    buffers: &mut IndexBuffers,
    input: &PermuteInput<'_>,
    rows_out: &mut [u8],
    scales_out: &mut [f32],
) {
    let topk = config.topk;
    let num_local = config.num_local_experts;
    let entries = input.topk_ids.ids().len();
    let chunks = Chunks::new(entries, buffers.max_chunks);
    let local_ids = &mut buffers.local_ids[..entries];
    routing::map_and_count(
        input.topk_ids.ids(),
        input.expert_map,
        config.num_experts,
        num_local,
        local_ids,
        &mut buffers.cursors,
        chunks,
    );
    let valid = routing::scan(
        &mut buffers.cursors,
        chunks,
        num_local,
        1,
        &mut buffers.expert_first_token_offset,
    );

    let sentinel = entries as i32;
    let (kept, after_valid) = buffers.permuted_idx[..entries].split_at_mut(valid);
    after_valid.fill(sentinel);
    let permuted_idx = DisjointSlice::new(kept);
    let inv_permuted_idx = DisjointSlice::new(&mut buffers.inv_permuted_idx[..entries]);
    routing::place(
        local_ids,
        &mut buffers.cursors,
        num_local,
        chunks,
        |f, row| {
            // SAFETY: `place` calls the sink once per entry `f` and gives distinct entries
            // distinct rows, so each element of both slices has exactly one writer.
            unsafe {
                match row {
                    Some(row) => {
                        inv_permuted_idx.write(f, row as i32);
                        permuted_idx.write(row, f as i32);
                    }
                    None => inv_permuted_idx.write(f, sentinel),
                }
            }
        },
    );

    let inv = &buffers.inv_permuted_idx[..entries];
    scatter_rows(input.hidden_states.as_bytes(), inv, valid, topk, rows_out);
    if let Some(scales) = input.scales {
        scatter_rows(scales.as_slice(), inv, valid, topk, scales_out);
    }
}

/// Copies source row `t` to row `inv[t*K + k]` of `dst` for every kept entry: each
/// source row is read once, while it is hot in cache, and written `K` times.
fn scatter_rows<T: Copy + Send + Sync>(
    src: &[T],
    inv: &[i32],
    valid: usize,
    topk: usize,
    dst: &mut [T],
) {
    let num_tokens = inv.len() / topk;
    if num_tokens == 0 {
        return;
    }
    let row_len = src.len() / num_tokens;
    // Only a task size: saturating is exact enough.
    let bytes_per_token = (row_len * size_of::<T>()).saturating_mul(topk + 1);
    let tokens_per_task = (TASK_BYTES / bytes_per_token.max(1)).max(1);
    let dst = DisjointSlice::new(dst);
    src.par_chunks(tokens_per_task * row_len)
        .zip(inv.par_chunks(tokens_per_task * topk))
        .for_each(|(src, inv)| {
            for (row, rows_of_token) in src.chunks_exact(row_len).zip(inv.chunks_exact(topk)) {
                for &dst_row in rows_of_token {
                    let dst_row = dst_row as usize;
                    if dst_row < valid {
                        // SAFETY: kept entries have distinct rows (the placement is a
                        // bijection onto 0..valid), so each destination row is written
                        // by this entry alone.
                        unsafe { dst.copy_from(dst_row * row_len, row) };
                    }
                }
            }
        });
}

/// The outputs of a computed call, as views of `entries = N*K` rows (`rows` and
/// `scales` hold exactly that many).
pub(super) fn views<'a>(
    config: &ScratchConfig,
    buffers: &'a IndexBuffers,
    spec: RowSpec,
    entries: usize,
    rows: &'a [u8],
    scales: &'a [f32],
) -> PermuteOutput<'a> {
    PermuteOutput {
        permuted_hidden_states: Rows::from_parts(rows, spec.dtype, spec.hidden_size),
        permuted_scales: (spec.scale_columns > 0)
            .then(|| Scales::from_parts(scales, spec.scale_columns)),
        expert_first_token_offset: &buffers.expert_first_token_offset
            [..config.num_local_experts + 1],
        inv_permuted_idx: &buffers.inv_permuted_idx[..entries],
        permuted_idx: &buffers.permuted_idx[..entries],
    }
}
