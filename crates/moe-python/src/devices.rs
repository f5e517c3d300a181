//! CUDA devices, opened once per ordinal, and the caller's stream.

use std::sync::{Arc, Mutex, PoisonError};

use moe_runtime::cuda::cudarc::driver::sys;
use moe_runtime::cuda::{CudaDevice, Stream};
use pyo3::PyResult;

use crate::error::moe_error;

/// Devices opened so far, by ordinal: opening one loads the kernels into its primary
/// context (the one PyTorch uses), which is done once per process.
static DEVICES: Mutex<Vec<Option<Arc<CudaDevice>>>> = Mutex::new(Vec::new());

/// CUDA device `ordinal` (PyTorch's device index: both number the devices the driver
/// shows).
pub(crate) fn cuda_device(ordinal: usize) -> PyResult<Arc<CudaDevice>> {
    let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(Some(device)) = devices.get(ordinal) {
        return Ok(device.clone());
    }
    let device = CudaDevice::new(ordinal).map_err(moe_error)?;
    if devices.len() <= ordinal {
        devices.resize(ordinal + 1, None);
    }
    devices[ordinal] = Some(device.clone());
    Ok(device)
}

/// The stream PyTorch gave (`torch.cuda.current_stream(device).cuda_stream`).
pub(crate) fn caller_stream(device: &CudaDevice, handle: u64) -> Stream<'_> {
    // SAFETY: the Python layer passes the current stream of the tensors' device, a
    // stream PyTorch created in the device's primary context (or the legacy default
    // stream, 0) and never destroys while the process runs (its stream pools live as
    // long as the process).
    unsafe { device.raw_stream(handle as usize as sys::CUstream) }
}
