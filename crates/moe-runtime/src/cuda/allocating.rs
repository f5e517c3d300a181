//! The allocating "before" of the scratch on a CUDA device: permute and unpermute
//! with device buffers made for one call. Kept for the benchmarks' comparison; every
//! serving path uses the scratch and allocates nothing.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::device::{CudaDevice, driver_error};
use super::memory::{DeviceRowsMut, DeviceView, DeviceViewMut};
use super::permute::{DevicePermuteInput, DevicePermuteOutput, views};
use super::unpermute::{DeviceUnpermuteInput, unpermute_into};
use crate::{Accumulate, PermuteScratch, Result, RowSpec, ScratchConfig};

/// A permute with device buffers allocated for this call alone: the "before" of the
/// scratch, kept for comparison.
#[derive(Debug)]
pub struct Permuted {
    scratch: PermuteScratch,
    spec: RowSpec,
}

impl Permuted {
    pub fn output(&self) -> Result<DevicePermuteOutput<'_>> {
        let spec = self.spec;
        let (config, buffers) = self.scratch.cuda_buffers()?;
        let entries = config.max_entries()?;
        let rows = DeviceView::new(&buffers.permuted_rows).prefix(spec.rows_bytes(entries)?);
        let scales = (spec.scale_columns > 0).then(|| {
            DeviceView::new(&buffers.permuted_scales).prefix(entries * spec.scale_columns)
        });
        Ok(views(buffers, config, spec, rows, scales))
    }
}

/// Allocates a scratch sized for this call on `device`, then permutes with it.
pub fn permute(
    device: &Arc<CudaDevice>,
    input: &DevicePermuteInput<'_>,
    num_experts: usize,
    num_local_experts: usize,
) -> Result<Permuted> {
    let spec = input.row_spec();
    let config = ScratchConfig::new(
        input.topk_ids.num_tokens(),
        input.topk_ids.topk(),
        num_experts,
        num_local_experts,
        device.device(),
    )
    .with_rows(spec.hidden_size, spec.dtype)
    .with_scale_columns(spec.scale_columns);
    let mut scratch = PermuteScratch::with_cuda_device(config, device.clone())?;
    super::permute(&mut scratch, input)?;
    Ok(Permuted { scratch, spec })
}

/// [`unpermute_into`](super::unpermute_into) a freshly allocated `[N, H]` device output (the allocating
/// "before").
pub fn unpermute<T: Accumulate + DeviceRepr + ValidAsZeroBits>(
    device: &CudaDevice,
    input: &DeviceUnpermuteInput<'_>,
) -> Result<CudaSlice<T>> {
    let tokens = input.inv_permuted_idx.len() / input.topk.max(1);
    let len = tokens * input.permuted_hidden_states.hidden_size();
    let stream = device.stream();
    let out = if len == 0 {
        // An empty output still needs a valid address: one element, zeroed.
        stream.alloc_zeros::<T>(1)
    } else {
        // SAFETY: `unpermute_into` writes every element before this returns the buffer
        // (a validation failure returns the error, not the buffer).
        unsafe { stream.alloc::<T>(len) }
    };
    let mut out = out.map_err(driver_error("allocate the unpermute output"))?;
    let view = DeviceViewMut::new(&mut out);
    // SAFETY: the first `len` elements of the allocation just made.
    let view = unsafe { DeviceViewMut::from_raw(view.address(), len, device.ordinal()) };
    unpermute_into(
        device,
        input,
        DeviceRowsMut::new::<T>(view, input.permuted_hidden_states.hidden_size())?,
    )?;
    Ok(out)
}
