//! The native module of the `moe_permute` Python package: permute, unpermute and
//! align on PyTorch tensors, through moe-runtime's CPU and CUDA paths.
//!
//! No libtorch: the Python layer (`python/moe_permute`) hands every tensor over as
//! `(data_ptr, shape, strides, dtype, device index)` and the current stream as its
//! handle; this module checks them, makes the runtime's views, and queues the
//! kernels on that stream. The Python layer registers the `torch.library` ops and
//! the vLLM-compatible functions on top.

mod devices;
mod error;
mod ops;
mod scratch;
mod tensor;

use pyo3::prelude::*;

/// `moe_permute._native`.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add_class::<scratch::NativeScratch>()?;
    module.add_function(wrap_pyfunction!(ops::permute, module)?)?;
    module.add_function(wrap_pyfunction!(ops::unpermute, module)?)?;
    module.add_function(wrap_pyfunction!(ops::align, module)?)?;
    module.add_function(wrap_pyfunction!(ops::check_status, module)?)?;
    module.add_function(wrap_pyfunction!(cuda_available, module)?)?;
    module.add_function(wrap_pyfunction!(align_sorted_len, module)?)?;
    module.add("MoeInputError", py.get_type::<error::MoeInputError>())?;
    module.add("MoeDeviceError", py.get_type::<error::MoeDeviceError>())?;
    module.add("STATUS_BYTES", moe_runtime::cuda::STATUS_BYTES)?;
    module.add("STATUS_CLEAR_BYTE", moe_runtime::cuda::STATUS_CLEAR_BYTE)?;
    Ok(())
}

/// Whether the NVIDIA driver can be loaded and shows at least one device.
#[pyfunction]
fn cuda_available() -> bool {
    moe_runtime::cuda::CudaDevice::count().is_ok_and(|count| count > 0)
}

/// The length of align's `sorted_ids` for `num_tokens * topk` entries over
/// `num_local_experts` experts padded to `block_size`.
#[pyfunction]
fn align_sorted_len(
    num_tokens: usize,
    topk: usize,
    num_local_experts: usize,
    block_size: usize,
) -> PyResult<usize> {
    let entries = moe_runtime::size::product("num_tokens * topk", &[num_tokens, topk])
        .map_err(error::moe_error)?;
    if block_size == 0 {
        return Err(error::input_error("block_size must be at least 1".into()));
    }
    Ok(moe_runtime::max_padded_rows(
        entries,
        num_local_experts,
        block_size,
    ))
}
