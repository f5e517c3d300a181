//! The device memory a CUDA permute scratch owns.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use moe_kernels::MAX_LOCAL_EXPERTS;

use super::device::{CudaDevice, driver_error};
use super::launch::route_chunks;
use crate::config::max_padded_rows;
use crate::{ConfigError, MoeError, Result, ScratchConfig};

/// Every intermediate and output of permute and align, on one device, sized for the
/// largest call of the configuration.
#[derive(Debug)]
pub(crate) struct CudaBuffers {
    pub(crate) device: Arc<CudaDevice>,
    /// `[max chunks, L]`: per-chunk counts, then first rows (multi-block routing).
    pub(super) chunk_counts: CudaSlice<u32>,
    /// `[L + 1]`.
    pub(super) expert_first_token_offset: CudaSlice<i64>,
    /// `[max N*K]`.
    pub(super) permuted_idx: CudaSlice<i32>,
    /// `[max N*K]`.
    pub(super) inv_permuted_idx: CudaSlice<i32>,
    /// `[max N*K, H]` bytes (allocations are 256-byte aligned: 16-byte accesses work).
    pub(super) permuted_rows: CudaSlice<u8>,
    /// `[max N*K, S]`.
    pub(super) permuted_scales: CudaSlice<f32>,
    /// align: `[max padded rows]`.
    pub(super) sorted_ids: CudaSlice<i32>,
    /// align: `[max padded rows / block size]`.
    pub(super) block_expert_ids: CudaSlice<i32>,
    /// align: `[L + 1]` first padded row of each expert.
    pub(super) padded_offsets: CudaSlice<i64>,
    /// align: `[1]`.
    pub(super) num_rows_post_padded: CudaSlice<i32>,
}

impl CudaBuffers {
    /// Allocates for `config` (already checked) on `device`.
    pub(crate) fn new(config: &ScratchConfig, device: Arc<CudaDevice>) -> Result<Self> {
        let local = config.num_local_experts;
        if local > MAX_LOCAL_EXPERTS as usize {
            return Err(ConfigError::TooManyLocalExperts {
                local,
                max: MAX_LOCAL_EXPERTS as usize,
            }
            .into());
        }
        let entries = config.max_entries()?;
        let max_chunks = route_chunks(entries as u32).1 as usize;
        let (row_bytes, scales) = config.rows.map_or(Ok((0, 0)), |rows| {
            rows.row_bytes().map(|bytes| (bytes, rows.scale_columns))
        })?;
        let padded = config
            .align_block_size
            .map_or(0, |block| max_padded_rows(entries, local, block));
        let blocks = config
            .align_block_size
            .map_or(0, |block| padded.div_ceil(block));
        let align = usize::from(config.align_block_size.is_some());
        Ok(Self {
            permuted_rows: allocate(&device, "permuted_hidden_states", entries * row_bytes)?,
            permuted_scales: allocate(&device, "permuted_scales", entries * scales)?,
            chunk_counts: allocate(&device, "chunk counts", max_chunks * local)?,
            expert_first_token_offset: allocate(&device, "expert_first_token_offset", local + 1)?,
            permuted_idx: allocate(&device, "permuted_idx", entries)?,
            inv_permuted_idx: allocate(&device, "inv_permuted_idx", entries)?,
            sorted_ids: allocate(&device, "sorted_ids", padded)?,
            block_expert_ids: allocate(&device, "block_expert_ids", blocks)?,
            padded_offsets: allocate(&device, "padded offsets", align * (local + 1))?,
            num_rows_post_padded: allocate(&device, "num_rows_post_padded", align)?,
            device,
        })
    }

    /// Bytes of device memory held.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.chunk_counts.num_bytes()
            + self.expert_first_token_offset.num_bytes()
            + self.permuted_idx.num_bytes()
            + self.inv_permuted_idx.num_bytes()
            + self.permuted_rows.num_bytes()
            + self.permuted_scales.num_bytes()
            + self.sorted_ids.num_bytes()
            + self.block_expert_ids.num_bytes()
            + self.padded_offsets.num_bytes()
            + self.num_rows_post_padded.num_bytes()
    }
}

/// A device buffer of `len` elements (at least one: a zero-size allocation is not a
/// valid device address), left uninitialised.
///
/// Not zeroed, on purpose: every element a kernel reads is written earlier in the same
/// call (rows past the valid count are "not written" by the contract, and are never
/// read), so zeroing would only cost a pass over memory, which the allocating path's
/// benchmark would then count against it.
fn allocate<T: DeviceRepr + ValidAsZeroBits>(
    device: &CudaDevice,
    buffer: &'static str,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is only handed to kernels that write an element before any
    // kernel reads it (see above); the host never reads it before a call has written it.
    unsafe { device.stream().alloc::<T>(len.max(1)) }.map_err(|error| match error.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => MoeError::OutOfMemory {
            buffer,
            bytes: (len * size_of::<T>()) as u128,
        },
        _ => driver_error("allocate the scratch")(error),
    })
}
