//! The CUDA path: candle CUDA tensors read in place (contiguous, at any layout offset),
//! the runtime's kernels queued on the stream of the tensors' candle device, results
//! in memory candle allocates on that stream. Nothing here waits for the device,
//! unless the scratch is in checked mode.
//!
//! Direct storage access, not a `CustomOp`: permute returns four tensors and align
//! three, where a custom op returns one, and both write the scratch, which a custom op
//! cannot borrow mutably.

use std::sync::Arc;

use candle_core::cuda_backend::{CudaDType, CudaDevice as CandleCudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Error, Result, Shape, Storage, Tensor, WithDType};
use moe_runtime::Element;
use moe_runtime::cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use moe_runtime::cuda::{
    self as rt, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput, DeviceRows, DeviceRowsMut,
    DeviceTopkIds, DeviceUnpermuteInput, DeviceView, DeviceViewMut,
};

use crate::tensor::{candle_error, contiguous_range};
use crate::{Aligned, Permuted, Scratch};

/// The runtime's device for a candle CUDA device: its context (the device's primary
/// context, which candle and PyTorch share), with the project's kernels loaded.
pub(crate) fn runtime_device(device: &CandleCudaDevice) -> Result<Arc<rt::CudaDevice>> {
    rt::CudaDevice::from_context(device.cuda_stream().context().clone()).map_err(candle_error)
}

/// What a CUDA call needs of the scratch's candle device: the device, to allocate
/// outputs, and its stream, where every call runs.
struct CallDevice {
    candle: CandleCudaDevice,
    stream: Arc<CudaStream>,
    runtime: Arc<rt::CudaDevice>,
}

impl CallDevice {
    fn of(scratch: &Scratch) -> Result<Self> {
        let candle = scratch.device.as_cuda_device()?.clone();
        let runtime = scratch
            .inner
            .cuda_device()
            .ok_or_else(|| Error::msg("the scratch is not a CUDA scratch"))?
            .clone();
        Ok(Self {
            stream: candle.cuda_stream(),
            candle,
            runtime,
        })
    }

    fn stream(&self) -> Result<rt::Stream<'_>> {
        self.runtime.stream(&self.stream).map_err(candle_error)
    }

    /// `len` elements on the device's stream, to be written in full by the call.
    fn output<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller's call writes every element before the tensor made of
        // the slice can be read (both are queued on this stream, in that order).
        unsafe { self.candle.alloc::<T>(len) }
    }

    /// A tensor of `shape` owning `slice`.
    fn tensor<T: CudaDType>(&self, slice: CudaSlice<T>, shape: impl Into<Shape>) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, self.candle.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}

/// Runs `f` on the runtime's view of `tensor` (dtype `T`, contiguous, on CUDA).
fn with_view<T, R>(
    tensor: &Tensor,
    name: &str,
    f: impl FnOnce(DeviceView<'_, T>) -> Result<R>,
) -> Result<R>
where
    T: WithDType + CudaDType + DeviceRepr,
{
    if tensor.dtype() != T::DTYPE {
        return Err(Error::msg(format!(
            "{name} is {:?}; expected {:?}",
            tensor.dtype(),
            T::DTYPE
        )));
    }
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(Error::msg(format!(
            "{name} is on {:?}; this call runs on CUDA",
            storage.device().location()
        )));
    };
    let slice = cuda.as_cuda_slice::<T>()?;
    let (start, end) = contiguous_range(layout, slice.len(), name)?;
    let view = slice.slice(start..end);
    f(DeviceView::new(&view))
}

/// Runs `f` with the runtime's view of `topk_ids` (`[N, K]`; u32, i32 or i64).
fn with_topk_ids<R>(
    topk_ids: &Tensor,
    k: usize,
    f: impl FnOnce(DeviceTopkIds<'_>) -> Result<R>,
) -> Result<R> {
    let name = "topk_ids";
    let ids = |ids: DeviceExpertIds<'_>| f(DeviceTopkIds::new(ids, k).map_err(candle_error)?);
    match topk_ids.dtype() {
        DType::U32 => with_view::<u32, _>(topk_ids, name, |v| ids(DeviceExpertIds::from_u32(v))),
        DType::I32 => with_view::<i32, _>(topk_ids, name, |v| ids(DeviceExpertIds::I32(v))),
        DType::I64 => with_view::<i64, _>(topk_ids, name, |v| ids(DeviceExpertIds::I64(v))),
        other => Err(Error::msg(format!(
            "topk_ids is {other:?}; expected u32, i32 or i64"
        ))),
    }
}

/// permute on CUDA, rows of `T`: the rows go straight into the returned tensor, the
/// index outputs are copied out of the scratch (which the next layer reuses).
pub(crate) fn permute<T>(
    scratch: &mut Scratch,
    hidden_states: &Tensor,
    topk_ids: &Tensor,
    (n, k, h): (usize, usize, usize),
) -> Result<Permuted>
where
    T: WithDType + Element + CudaDType + DeviceRepr + ValidAsZeroBits,
{
    let device = CallDevice::of(scratch)?;
    let stream = device.stream()?;
    let entries = n * k;
    let experts = scratch.config().num_local_experts;
    let rows_len = moe_runtime::size::product("permuted rows (N * K * H)", &[n, k, h])
        .map_err(candle_error)?;
    // Zeroed: rows past the valid count (entries whose id is outside 0..E) are not
    // written by permute, and read as zeros, as on the CPU.
    let mut rows = device.candle.alloc_zeros::<T>(rows_len)?;
    let mut offsets = device.output::<i64>(experts + 1)?;
    let mut inv = device.output::<i32>(entries)?;
    let mut permuted_idx = device.output::<i32>(entries)?;
    with_view::<T, _>(hidden_states, "hidden_states", |hidden| {
        with_topk_ids(topk_ids, k, |ids| {
            let input =
                DevicePermuteInput::new(DeviceRows::new(hidden, h).map_err(candle_error)?, ids);
            let dest = DevicePermuteDest {
                hidden_states: DeviceRowsMut::new(DeviceViewMut::new(&mut rows), h)
                    .map_err(candle_error)?,
                scales: None,
            };
            let out = rt::permute_into(&mut scratch.inner, &stream, &input, dest)
                .map_err(candle_error)?;
            out.expert_first_token_offset
                .copy_into(DeviceViewMut::new(&mut offsets), &stream)
                .map_err(candle_error)?;
            out.inv_permuted_idx
                .copy_into(DeviceViewMut::new(&mut inv), &stream)
                .map_err(candle_error)?;
            out.permuted_idx
                .copy_into(DeviceViewMut::new(&mut permuted_idx), &stream)
                .map_err(candle_error)
        })
    })?;
    Ok(Permuted {
        permuted_hidden_states: device.tensor(rows, (entries, h)),
        expert_first_token_offset: device.tensor(offsets, experts + 1),
        inv_permuted_idx: device.tensor(inv, (n, k)),
        permuted_idx: device.tensor(permuted_idx, entries),
    })
}

/// unpermute on CUDA, rows of `T`, reporting bad indices into the scratch's status
/// block.
pub(crate) fn unpermute<T>(
    scratch: &Scratch,
    [
        permuted,
        inv_permuted_idx,
        expert_first_token_offset,
        topk_weights,
    ]: [&Tensor; 4],
    (n, k, h): (usize, usize, usize),
) -> Result<Tensor>
where
    T: WithDType + Element + CudaDType + DeviceRepr,
{
    let device = CallDevice::of(scratch)?;
    let stream = device.stream()?;
    let status = scratch
        .inner
        .cuda_status()
        .ok_or_else(|| Error::msg("the scratch is not a CUDA scratch"))?;
    let len =
        moe_runtime::size::product("unpermute output (N * H)", &[n, h]).map_err(candle_error)?;
    let mut out = device.output::<T>(len)?;
    with_view::<T, _>(permuted, "permuted_hidden_states", |rows| {
        with_view::<i32, _>(inv_permuted_idx, "inv_permuted_idx", |inv| {
            with_view::<i64, _>(
                expert_first_token_offset,
                "expert_first_token_offset",
                |offsets| {
                    with_view::<f32, _>(topk_weights, "topk_weights", |weights| {
                        let input = DeviceUnpermuteInput {
                            permuted_hidden_states: DeviceRows::new(rows, h)
                                .map_err(candle_error)?,
                            inv_permuted_idx: inv,
                            expert_first_token_offset: offsets,
                            topk_weights: weights,
                            topk: k,
                            status,
                        };
                        let dest = DeviceRowsMut::new(DeviceViewMut::new(&mut out), h)
                            .map_err(candle_error)?;
                        rt::unpermute_into(&stream, &input, dest).map_err(candle_error)
                    })
                },
            )
        })
    })?;
    Ok(device.tensor(out, (n, h)))
}

/// align on CUDA: the index outputs copied out of the scratch.
pub(crate) fn align(scratch: &mut Scratch, topk_ids: &Tensor, k: usize) -> Result<Aligned> {
    let device = CallDevice::of(scratch)?;
    let stream = device.stream()?;
    with_topk_ids(topk_ids, k, |ids| {
        let out = rt::align(&mut scratch.inner, &stream, &ids, None).map_err(candle_error)?;
        let mut sorted_ids = device.output::<i32>(out.sorted_ids.len())?;
        let mut block_expert_ids = device.output::<i32>(out.block_expert_ids.len())?;
        let mut num_rows = device.output::<i32>(1)?;
        out.sorted_ids
            .copy_into(DeviceViewMut::new(&mut sorted_ids), &stream)
            .map_err(candle_error)?;
        out.block_expert_ids
            .copy_into(DeviceViewMut::new(&mut block_expert_ids), &stream)
            .map_err(candle_error)?;
        out.num_rows_post_padded
            .copy_into(DeviceViewMut::new(&mut num_rows), &stream)
            .map_err(candle_error)?;
        let (sorted_len, blocks) = (out.sorted_ids.len(), out.block_expert_ids.len());
        Ok(Aligned {
            sorted_ids: device.tensor(sorted_ids, sorted_len),
            block_expert_ids: device.tensor(block_expert_ids, blocks),
            num_rows_post_padded: device.tensor(num_rows, 1),
            block_size: out.block_size,
        })
    })
}

/// Reads the scratch's status block after the work queued on its device's stream (a
/// host wait) and returns the first error recorded there.
pub(crate) fn check_status(scratch: &Scratch) -> Result<()> {
    let device = CallDevice::of(scratch)?;
    let stream = device.stream()?;
    scratch.inner.check_status(&stream).map_err(candle_error)
}
