//! The allocating "before" of the scratch: permute and unpermute with buffers made
//! for one call, as serving stacks called them before a scratch existed.
//!
//! Kept for comparison (the benchmarks measure what the scratch saves) and for
//! one-off calls; every serving path uses [`super::permute`],
//! [`super::permute_into`] and [`super::unpermute_into`], which allocate nothing.

use super::buffers::CpuBuffers;
use super::permute::{PermuteInput, PermuteOutput, views};
use super::unpermute::{UnpermuteInput, unpermute_into};
use crate::size::zeroed;
use crate::{Accumulate, Device, PermuteScratch, Result, RowSpec, ScratchConfig};

/// The result of [`permute`]: a scratch sized for one call, holding its outputs.
#[derive(Debug)]
pub struct Permuted {
    scratch: PermuteScratch,
    spec: RowSpec,
}

impl Permuted {
    /// The permute's outputs, as [`super::permute`] returns them.
    pub fn output(&self) -> Result<PermuteOutput<'_>> {
        let config = self.scratch.config();
        let buffers: &CpuBuffers = self.scratch.cpu_buffers_ref()?;
        let entries = config.max_entries()?;
        // The scratch was built for exactly this spec and entry count.
        let rows =
            &bytemuck::cast_slice(&buffers.permuted_rows)[..self.spec.rows_bytes(entries)?];
        let scales = &buffers.permuted_scales[..self.spec.scales_len(entries)?];
        Ok(views(
            config,
            &buffers.index,
            self.spec,
            entries,
            rows,
            scales,
        ))
    }
}

/// Permutes with buffers allocated for this call alone.
pub fn permute(
    input: &PermuteInput<'_>,
    num_experts: usize,
    num_local_experts: usize,
) -> Result<Permuted> {
    let spec = input.row_spec();
    let config = ScratchConfig::for_one_call(
        spec,
        (input.topk_ids.num_tokens(), input.topk_ids.topk()),
        (num_experts, num_local_experts),
        Device::Cpu,
    );
    let mut scratch = PermuteScratch::new(config)?;
    super::permute(&mut scratch, input)?;
    Ok(Permuted { scratch, spec })
}

/// [`unpermute_into`] a freshly allocated `[N, H]` output.
///
/// The output is allocated fallibly: an `N*H` that does not fit in usize is
/// [`MoeError::SizeOverflow`](crate::MoeError::SizeOverflow), memory that cannot be
/// had is [`MoeError::OutOfMemory`](crate::MoeError::OutOfMemory), as with a scratch.
pub fn unpermute<T: Accumulate>(input: &UnpermuteInput<'_, T>) -> Result<Vec<T>> {
    // Shapes first (the output's length is what they imply), then the memory.
    let tokens = input.inv_permuted_idx.len() / input.topk.max(1);
    let len = crate::size::product(
        "unpermute output elements (N * H)",
        &[tokens, input.hidden_size],
    )?;
    input.check(len)?;
    let mut out = zeroed("the unpermute output", len)?;
    unpermute_into(input, &mut out)?;
    Ok(out)
}
