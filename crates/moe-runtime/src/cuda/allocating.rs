//! The allocating "before" of the scratch on a CUDA device: permute and unpermute
//! with device buffers made for one call (stream-ordered `cuMemAllocAsync`, as
//! PyTorch's and vLLM's per-call tensors are), freed on the same stream when the
//! result is dropped. Kept for the benchmarks' comparison; every serving path uses
//! the scratch and allocates nothing.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::DeviceRepr;

use super::device::{CudaDevice, Stream};
use super::memory::{Binding, DeviceRowsMut, DeviceView, DeviceViewMut};
use super::owned::DeviceMemory;
use super::permute::{DevicePermuteInput, DevicePermuteOutput, outputs};
use super::unpermute::{DeviceUnpermuteInput, unpermute_into};
use crate::size::product;
use crate::{Accumulate, PermuteScratch, Result, RowSpec, ScratchConfig};

/// The result of [`permute`]: a scratch sized for one call, holding its outputs, its
/// memory freed on the call's stream (which it borrows, `'a`) when dropped.
#[derive(Debug)]
pub struct Permuted<'a> {
    scratch: PermuteScratch,
    spec: RowSpec,
    binding: Binding,
    _stream: PhantomData<&'a ()>,
}

impl Permuted<'_> {
    /// The permute's outputs, as [`super::permute`] returns them.
    pub fn output(&self) -> Result<DevicePermuteOutput<'_>> {
        let (config, buffers) = self.scratch.cuda_buffers(self.scratch.device())?;
        let entries = config.max_entries()?;
        let ordinal = buffers.device.ordinal();
        let rows = DeviceView::from_parts(
            buffers.address(|c| c.permuted_rows),
            self.spec.rows_bytes(entries)?,
            ordinal,
            self.binding,
        );
        let scales = (self.spec.scale_columns > 0).then(|| {
            DeviceView::from_parts(
                buffers.address(|c| c.permuted_scales),
                entries * self.spec.scale_columns,
                ordinal,
                self.binding,
            )
        });
        Ok(outputs(
            config,
            buffers,
            self.binding,
            self.spec,
            rows,
            scales,
        ))
    }
}

/// Allocates a scratch sized for this call on `stream`, then permutes with it.
pub fn permute<'a>(
    device: &Arc<CudaDevice>,
    stream: &Stream<'a>,
    input: &DevicePermuteInput<'_>,
    num_experts: usize,
    num_local_experts: usize,
) -> Result<Permuted<'a>> {
    let spec = input.row_spec();
    let config = ScratchConfig::for_one_call(
        spec,
        (input.topk_ids.num_tokens(), input.topk_ids.topk()),
        (num_experts, num_local_experts),
        device.device(),
    );
    // SAFETY: the scratch lives in the returned value, which borrows the stream for
    // 'a: the stream outlives the free queued on it when the scratch is dropped.
    let mut scratch = unsafe { PermuteScratch::on_stream(config, device.clone(), stream)? };
    super::permute(&mut scratch, stream, input)?;
    Ok(Permuted {
        scratch,
        spec,
        binding: Binding::stream(stream.id()),
        _stream: PhantomData,
    })
}

/// Device memory of `len` elements of `T` allocated for one call on a stream
/// (borrowed, `'a`), freed on it when dropped.
#[derive(Debug)]
pub struct Buffer<'a, T> {
    memory: DeviceMemory,
    len: usize,
    ordinal: usize,
    binding: Binding,
    _stream: PhantomData<&'a [T]>,
}

impl<T: DeviceRepr> Buffer<'_, T> {
    /// The buffer, on its stream.
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView::from_parts(self.memory.address(), self.len, self.ordinal, self.binding)
    }
}

/// [`unpermute_into`] a freshly allocated `[N, H]` output.
pub fn unpermute<'a, T: Accumulate + DeviceRepr>(
    stream: &Stream<'a>,
    input: &DeviceUnpermuteInput<'_>,
) -> Result<Buffer<'a, T>> {
    let tokens = input.inv_permuted_idx.len() / input.topk.max(1);
    let hidden = input.permuted_hidden_states.hidden_size();
    let len = product("unpermute output elements (N * H)", &[tokens, hidden])?;
    let bytes = product("unpermute output bytes", &[len, size_of::<T>()])?;
    // SAFETY: the buffer borrows the stream for 'a, so the stream outlives the free
    // queued on it when the buffer is dropped.
    let memory = unsafe { DeviceMemory::allocate_on(stream, "unpermute output", bytes)? };
    let binding = Binding::stream(stream.id());
    let ordinal = stream.device().ordinal();
    let out = DeviceViewMut::from_parts(memory.address(), len, ordinal, binding);
    unpermute_into(stream, input, DeviceRowsMut::new::<T>(out, hidden)?)?;
    Ok(Buffer {
        memory,
        len,
        ordinal,
        binding,
        _stream: PhantomData,
    })
}
