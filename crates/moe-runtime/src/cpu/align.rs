//! align on the CPU: the index-only permute, padded per expert to a block size.

use super::disjoint::DisjointSlice;
use super::permute::check_expert_map;
use super::routing::{self, Chunks};
use crate::config::max_padded_rows;
use crate::{CallShape, Device, PermuteScratch, Result, ScratchMismatch, TopkIds};

/// The outputs of align: views sized for this call's `N`.
#[derive(Clone, Copy, Debug)]
pub struct AlignOutput<'a> {
    /// `[N*K + min(L, N*K) * (block_size - 1)]`: flat entries `t*K + k` grouped by local
    /// expert, each group padded to a multiple of `block_size`; padding and the tail
    /// after `num_rows_post_padded` hold `N*K`.
    pub sorted_ids: &'a [i32],
    /// `[ceil(len(sorted_ids) / block_size)]`: the local expert of each block, -1 for
    /// a block at or after `num_rows_post_padded`.
    pub block_expert_ids: &'a [i32],
    /// Rows of `sorted_ids` in use: a multiple of `block_size`.
    pub num_rows_post_padded: usize,
    /// The scratch's align block size: rows per block of `sorted_ids`.
    pub block_size: usize,
}

/// Sorts the valid entries by local expert without moving any row. Allocates nothing;
/// the scratch must have been built with
/// [`ScratchConfig::with_align_block_size`](crate::ScratchConfig::with_align_block_size).
pub fn align<'s>(
    scratch: &'s mut PermuteScratch,
    topk_ids: &TopkIds<'_>,
    expert_map: Option<&[i32]>,
) -> Result<AlignOutput<'s>> {
    scratch.validate(&CallShape {
        num_tokens: topk_ids.num_tokens(),
        topk: topk_ids.topk(),
        expert_map_len: expert_map.map(<[i32]>::len),
        rows: None,
        align: true,
        devices: &[("topk_ids", Device::Cpu)],
    })?;
    let (config, buffers) = scratch.cpu_buffers()?;
    let num_local = config.num_local_experts;
    check_expert_map(expert_map, num_local)?;
    let Some(block_size) = config.align_block_size else {
        return Err(ScratchMismatch::NoAlignBuffers.into());
    };
    let entries = topk_ids.ids().len();
    let index = &mut buffers.index;
    let align = &mut buffers.align;
    let chunks = Chunks::new(entries, index.max_chunks);
    let local_ids = &mut index.local_ids[..entries];
    routing::map_and_count(
        topk_ids.ids(),
        expert_map,
        config.num_experts,
        num_local,
        local_ids,
        &mut index.cursors,
        chunks,
    );
    let padded_rows = routing::scan(
        &mut index.cursors,
        chunks,
        num_local,
        block_size,
        &mut align.padded_first_row,
    );

    let len = max_padded_rows(entries, num_local, block_size);
    let sorted_ids = &mut align.sorted_ids[..len];
    sorted_ids.fill(entries as i32);
    let sorted = DisjointSlice::new(sorted_ids);
    routing::place(
        local_ids,
        &mut index.cursors,
        num_local,
        chunks,
        |f, row| {
            if let Some(row) = row {
                // SAFETY: `place` gives distinct kept entries distinct rows.
                unsafe { sorted.write(row, f as i32) };
            }
        },
    );

    let block_expert_ids = &mut align.block_expert_ids[..len.div_ceil(block_size)];
    block_expert_ids.fill(-1);
    for (expert, bounds) in align.padded_first_row[..num_local + 1]
        .windows(2)
        .enumerate()
    {
        let blocks = bounds[0] as usize / block_size..bounds[1] as usize / block_size;
        block_expert_ids[blocks].fill(expert as i32);
    }
    Ok(AlignOutput {
        sorted_ids: &align.sorted_ids[..len],
        block_expert_ids,
        num_rows_post_padded: padded_rows,
        block_size,
    })
}
