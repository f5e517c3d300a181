//! Where a scratch lives and where a call's tensors are.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A device that can hold tensors and run the operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Host memory; operations run on the rayon thread pool.
    Cpu,
    /// A CUDA device, by ordinal.
    Cuda(usize),
}

impl Device {
    /// The first CUDA device when a driver and a GPU are present, else the CPU together
    /// with the reason CUDA could not be used (for the caller to report).
    pub fn best_available() -> (Device, Option<crate::MoeError>) {
        match crate::cuda::CudaDevice::count() {
            Ok(count) if count > 0 => (Device::Cuda(0), None),
            Ok(_) => (
                Device::Cpu,
                Some(crate::MoeError::DeviceUnavailable {
                    device: Device::Cuda(0),
                    reason: "the driver reports no CUDA device".into(),
                }),
            ),
            Err(error) => (Device::Cpu, Some(error)),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}
