//! The library's typed errors as Python exceptions.
//!
//! Bad input (a shape, a dtype, a scratch too small, a malformed `expert_map` entry)
//! raises `moe_permute.MoeInputError`, a `ValueError`; a failure of the device or the
//! driver (out of memory, a CUDA error, no GPU) raises `moe_permute.MoeDeviceError`,
//! a `RuntimeError`. The message is the library's own, the same on every device.

use moe_runtime::MoeError;
use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};

create_exception!(
    moe_permute._native,
    MoeInputError,
    PyValueError,
    "Bad input to an op: the message says which argument and why."
);
create_exception!(
    moe_permute._native,
    MoeDeviceError,
    PyRuntimeError,
    "The device or the driver failed (out of memory, a CUDA error, no GPU)."
);

/// An input error with a message of the binding's own (a tensor's layout, say).
pub(crate) fn input_error(message: String) -> PyErr {
    MoeInputError::new_err(message)
}

/// The exception for one of the library's errors.
pub(crate) fn moe_error(error: MoeError) -> PyErr {
    let message = error.to_string();
    match error {
        MoeError::OutOfMemory { .. }
        | MoeError::Driver { .. }
        | MoeError::DeviceUnavailable { .. }
        | MoeError::KernelParams { .. }
        | MoeError::Capturing { .. }
        | MoeError::WorkspaceLocked { .. }
        | MoeError::WorkspaceConflict { .. } => MoeDeviceError::new_err(message),
        _ => MoeInputError::new_err(message),
    }
}
