//! The permute scratch as the Python layer holds it: over a `torch.uint8` tensor of
//! PyTorch's caching allocator on a GPU, over memory of its own on the CPU.

use std::sync::{Mutex, MutexGuard, PoisonError};

use moe_runtime::cuda::{ScratchMemoryLayout, Stream};
use moe_runtime::{Device, PermuteScratch, ScratchConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::devices::{caller_stream, cuda_device};
use crate::error::{input_error, moe_error};
use crate::tensor::{Elem, Place, Tensor, TensorArg};

/// A permute scratch built once over a workspace tensor. Python's
/// `MoEPermuteScratch` keeps the workspace alive as long as this object.
#[pyclass(module = "moe_permute._native", frozen)]
pub(crate) struct NativeScratch {
    inner: Mutex<Inner>,
}

pub(crate) struct Inner {
    pub(crate) scratch: PermuteScratch,
    /// The workspace: on a GPU, the scratch's own memory; on the CPU, where the
    /// outputs are copied so that Python slices them the same way on both devices.
    pub(crate) workspace: u64,
    pub(crate) layout: ScratchMemoryLayout,
    pub(crate) place: Place,
}

/// The scratch configuration the Python layer asks for.
fn config(
    device: Device,
    max_num_tokens: usize,
    topk: usize,
    num_experts: usize,
    num_local_experts: usize,
    align_block_size: Option<usize>,
) -> ScratchConfig {
    let config = ScratchConfig::new(max_num_tokens, topk, num_experts, num_local_experts, device);
    match align_block_size {
        Some(block) => config.with_align_block_size(block),
        None => config,
    }
}

#[pymethods]
impl NativeScratch {
    /// Bytes, alignment and output offsets of a scratch of this configuration: the
    /// size of the workspace tensor to allocate.
    #[staticmethod]
    #[pyo3(signature = (max_num_tokens, topk, num_experts, num_local_experts, align_block_size=None))]
    fn layout<'py>(
        py: Python<'py>,
        max_num_tokens: usize,
        topk: usize,
        num_experts: usize,
        num_local_experts: usize,
        align_block_size: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let config = config(
            Device::Cuda(0),
            max_num_tokens,
            topk,
            num_experts,
            num_local_experts,
            align_block_size,
        );
        let layout = PermuteScratch::cuda_memory_layout(&config).map_err(moe_error)?;
        layout_dict(py, &layout)
    }

    /// A scratch over `workspace` (at least `layout(...)["bytes"]` of `torch.uint8`,
    /// aligned as it says), made on `stream`.
    #[new]
    #[pyo3(signature = (workspace, max_num_tokens, topk, num_experts, num_local_experts, align_block_size, stream))]
    fn new(
        workspace: TensorArg<'_>,
        max_num_tokens: usize,
        topk: usize,
        num_experts: usize,
        num_local_experts: usize,
        align_block_size: Option<usize>,
        stream: u64,
    ) -> PyResult<Self> {
        let workspace = Tensor::new("workspace", workspace)?;
        workspace.expect(&[Elem::U8], "uint8")?;
        let device = match workspace.place {
            Place::Cpu => Device::Cpu,
            Place::Cuda(ordinal) => Device::Cuda(ordinal),
        };
        let config = config(
            device,
            max_num_tokens,
            topk,
            num_experts,
            num_local_experts,
            align_block_size,
        );
        let layout = PermuteScratch::cuda_memory_layout(&config).map_err(moe_error)?;
        if workspace.bytes() < layout.bytes {
            return Err(input_error(format!(
                "workspace has {} bytes; this scratch needs {}",
                workspace.bytes(),
                layout.bytes
            )));
        }
        let scratch = match workspace.place {
            Place::Cpu => PermuteScratch::new(config).map_err(moe_error)?,
            Place::Cuda(ordinal) => {
                let device = cuda_device(ordinal)?;
                let stream = caller_stream(&device, stream);
                // SAFETY: the workspace is a CUDA tensor of `workspace.bytes()` bytes
                // on this device (checked above), which Python's MoEPermuteScratch
                // keeps alive as long as this object and uses for nothing else; its
                // frees and reuses are ordered by PyTorch's caching allocator on the
                // stream it was allocated on, which the caller orders with `stream`
                // (PyTorch's rule for every tensor used on another stream).
                unsafe {
                    PermuteScratch::in_cuda_memory(
                        config,
                        device.clone(),
                        workspace.address,
                        workspace.bytes(),
                        &stream,
                    )
                }
                .map_err(moe_error)?
            }
        };
        Ok(Self {
            inner: Mutex::new(Inner {
                scratch,
                workspace: workspace.address,
                layout,
                place: workspace.place,
            }),
        })
    }

    /// Reads the scratch's status block after the work queued on `stream` (a host
    /// wait) and raises the first error its calls recorded since the last check.
    fn check(&self, stream: u64) -> PyResult<()> {
        let mut inner = self.lock();
        if let Place::Cuda(ordinal) = inner.place {
            let device = cuda_device(ordinal)?;
            let stream = caller_stream(&device, stream);
            inner.bind(&stream)?;
            inner.scratch.check_status(&stream).map_err(moe_error)?;
        }
        Ok(())
    }

    /// Bytes of the workspace the scratch uses.
    #[getter]
    fn bytes(&self) -> usize {
        self.lock().layout.bytes
    }
}

impl NativeScratch {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic cannot leave the scratch half-updated in a way a later call could
        // misread: every call validates and rewrites what it returns.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The scratch a CUDA call uses: the object's own, or one reopened over a copy of
/// its workspace.
pub(crate) enum CallScratch<'a> {
    Own(&'a mut PermuteScratch),
    Copy(Box<PermuteScratch>),
}

impl CallScratch<'_> {
    pub(crate) fn get(&mut self) -> &mut PermuteScratch {
        match self {
            Self::Own(scratch) => scratch,
            Self::Copy(scratch) => scratch,
        }
    }
}

impl Inner {
    /// The scratch's own workspace, as the tensor Python would describe.
    pub(crate) fn own_workspace(&self) -> Tensor {
        Tensor {
            name: "workspace",
            address: self.workspace,
            shape: vec![self.layout.bytes],
            elem: Elem::U8,
            place: self.place,
            numel: self.layout.bytes,
        }
    }

    /// Checks that `workspace` can be this scratch's: on its device, large enough.
    pub(crate) fn check_workspace(&self, workspace: &Tensor) -> PyResult<()> {
        if workspace.place != self.place || workspace.bytes() < self.layout.bytes {
            return Err(input_error(format!(
                "workspace ({} bytes on {:?}) is not this scratch's ({} bytes on {:?})",
                workspace.bytes(),
                workspace.place,
                self.layout.bytes,
                self.place
            )));
        }
        Ok(())
    }

    /// Binds the scratch to the caller's stream.
    fn bind(&mut self, stream: &Stream<'_>) -> PyResult<()> {
        if self.scratch.bound_stream() != Some(stream.id()) {
            // SAFETY: PyTorch's rule: work on a tensor from two streams is ordered by
            // the caller (torch.cuda.graph makes its capture stream wait for the
            // current one, and a graph's replay runs on the stream it is replayed on,
            // as a caller that switches streams must order them).
            unsafe { self.scratch.assume_stream(stream) }.map_err(moe_error)?;
        }
        Ok(())
    }

    /// The scratch for a CUDA call over `workspace` on `stream`: the object's own when
    /// `workspace` is its memory (bound to the caller's stream), else one over the
    /// copy PyTorch's functionalization (torch.compile) gave the op, status block and
    /// all.
    pub(crate) fn for_call(
        &mut self,
        workspace: &Tensor,
        stream: &Stream<'_>,
        checked: bool,
    ) -> PyResult<CallScratch<'_>> {
        self.check_workspace(workspace)?;
        let mut call = if workspace.address == self.workspace {
            self.bind(stream)?;
            CallScratch::Own(&mut self.scratch)
        } else {
            let config = self.scratch.config().clone();
            let device = stream.device();
            // SAFETY: `workspace` is a live CUDA tensor of at least the layout's bytes
            // on this device (checked above; the Python call holds it), a copy of this
            // scratch's workspace (the only workspace the Python layer passes with this
            // scratch's id), used on the caller's stream like every tensor here.
            let scratch = unsafe {
                PermuteScratch::reopen_cuda_memory(
                    config,
                    cuda_device(device.ordinal())?,
                    workspace.address,
                    workspace.bytes(),
                    stream,
                )
            }
            .map_err(moe_error)?;
            CallScratch::Copy(Box::new(scratch))
        };
        call.get().set_checked(checked);
        Ok(call)
    }
}

fn layout_dict<'py>(py: Python<'py>, layout: &ScratchMemoryLayout) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let o = &layout.offsets;
    for (key, value) in [
        ("bytes", layout.bytes),
        ("alignment", layout.alignment),
        ("status", o.status),
        ("expert_first_token_offset", o.expert_first_token_offset),
        ("permuted_idx", o.permuted_idx),
        ("inv_permuted_idx", o.inv_permuted_idx),
        ("sorted_ids", o.sorted_ids),
        ("block_expert_ids", o.block_expert_ids),
        ("num_rows_post_padded", o.num_rows_post_padded),
    ] {
        dict.set_item(key, value)?;
    }
    Ok(dict)
}
