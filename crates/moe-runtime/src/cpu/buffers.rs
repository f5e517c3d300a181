//! The host memory a CPU permute scratch owns.

use crate::config::max_padded_rows;
use crate::size::{product, zeroed};
use crate::{Result, ScratchConfig};

/// Chunks the index work is cut into, per thread of the pool: enough to balance
/// uneven chunks, few enough that the serial scan over `experts x chunks` stays small.
const CHUNKS_PER_THREAD: usize = 4;
const MAX_CHUNKS: usize = 256;

/// Every intermediate and output of permute and align, sized for the largest call.
#[derive(Debug)]
pub(crate) struct CpuBuffers {
    pub(super) index: IndexBuffers,
    /// `[max N*K, H]` as bytes, 16-byte aligned so any element type can be viewed.
    pub(super) permuted_rows: Vec<u128>,
    /// `[max N*K, S]`.
    pub(super) permuted_scales: Vec<f32>,
    pub(super) align: AlignBuffers,
}

/// The counting sort's state and the index outputs of permute.
#[derive(Debug)]
pub(super) struct IndexBuffers {
    /// Chunks the index work of one call may use.
    pub(super) max_chunks: usize,
    /// `[max N*K]`: each entry's local expert, `L` when dropped.
    pub(super) local_ids: Vec<i32>,
    /// `[max_chunks, L]`: per-chunk counts, then per-chunk write cursors.
    pub(super) cursors: Vec<u32>,
    /// `[L + 1]`.
    pub(super) expert_first_token_offset: Vec<i64>,
    /// `[max N*K]`.
    pub(super) permuted_idx: Vec<i32>,
    /// `[max N*K]`.
    pub(super) inv_permuted_idx: Vec<i32>,
}

/// The outputs of align (empty when the scratch was built without a block size).
#[derive(Debug)]
pub(super) struct AlignBuffers {
    /// `[max padded rows]`.
    pub(super) sorted_ids: Vec<i32>,
    /// `[max padded rows / block_size]`.
    pub(super) block_expert_ids: Vec<i32>,
    /// `[L + 1]`: first padded row of each expert in `sorted_ids`.
    pub(super) padded_first_row: Vec<i64>,
}

impl CpuBuffers {
    /// Allocates for `config`, which must have passed [`ScratchConfig::check`].
    ///
    /// Every buffer comes from [`zeroed`] (calloc: large buffers cost page mappings,
    /// not a pass of writes, so building a scratch costs what allocating the same
    /// buffers per call would), sized by checked arithmetic.
    pub(crate) fn new(config: &ScratchConfig) -> Result<Self> {
        let entries = config.max_entries()?;
        let local = config.num_local_experts;
        let max_chunks = (rayon::current_num_threads() * CHUNKS_PER_THREAD).clamp(1, MAX_CHUNKS);
        let (row_bytes, scale_len) = config.row_buffer_sizes()?;
        let (padded, blocks, padded_first) = match config.align_block_size {
            Some(block) => {
                // Fits in i32: `check` bounded it.
                let padded = max_padded_rows(entries, local, block);
                (padded, padded.div_ceil(block), local + 1)
            }
            None => (0, 0, 0),
        };
        // The largest buffer first: a scratch that cannot be had fails before the rest
        // is allocated.
        let permuted_rows = zeroed("permuted_hidden_states", row_bytes.div_ceil(16))?;
        let permuted_scales = zeroed("permuted_scales", scale_len)?;
        Ok(Self {
            index: IndexBuffers {
                max_chunks,
                local_ids: zeroed("local expert ids", entries)?,
                cursors: zeroed(
                    "expert counts",
                    product("expert counts (chunks * L)", &[max_chunks, local])?,
                )?,
                expert_first_token_offset: zeroed("expert_first_token_offset", local + 1)?,
                permuted_idx: zeroed("permuted_idx", entries)?,
                inv_permuted_idx: zeroed("inv_permuted_idx", entries)?,
            },
            permuted_rows,
            permuted_scales,
            align: AlignBuffers {
                sorted_ids: zeroed("sorted_ids", padded)?,
                block_expert_ids: zeroed("block_expert_ids", blocks)?,
                padded_first_row: zeroed("padded expert offsets", padded_first)?,
            },
        })
    }

    /// Bytes of host memory held.
    pub(crate) fn allocated_bytes(&self) -> usize {
        let index = &self.index;
        let align = &self.align;
        size_of_val(&index.local_ids[..])
            + size_of_val(&index.cursors[..])
            + size_of_val(&index.expert_first_token_offset[..])
            + size_of_val(&index.permuted_idx[..])
            + size_of_val(&index.inv_permuted_idx[..])
            + size_of_val(&self.permuted_rows[..])
            + size_of_val(&self.permuted_scales[..])
            + size_of_val(&align.sorted_ids[..])
            + size_of_val(&align.block_expert_ids[..])
            + size_of_val(&align.padded_first_row[..])
    }
}
