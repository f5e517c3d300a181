//! The permute scratch: every intermediate buffer of permute and align, built once.

use std::sync::Arc;

use crate::cpu::CpuBuffers;
use crate::cuda::{CudaBuffers, CudaDevice};
use crate::{CallShape, Device, MoeError, Result, ScratchConfig, ScratchMismatch};

/// Pre-allocated buffers for permute and align, built once from a [`ScratchConfig`]
/// and validated on every call.
///
/// A call that is given a scratch allocates nothing and returns views into it, sized
/// for the call's `N`: two calls return views over the same memory. One scratch can
/// serve every MoE layer of a model, since the layers run one after another; see
/// [`ScratchWorkspace`](crate::ScratchWorkspace) for sharing one between users.
#[derive(Debug)]
pub struct PermuteScratch {
    config: ScratchConfig,
    storage: Storage,
}

/// The scratch's memory, on its device.
#[derive(Debug)]
enum Storage {
    // Boxed: both hold a dozen buffers, and a scratch is built once.
    Cpu(Box<CpuBuffers>),
    Cuda(Box<CudaBuffers>),
}

impl PermuteScratch {
    /// Checks `config` and allocates every buffer it implies on `config.device`; a
    /// CUDA scratch opens the device with a stream of its own ([`CudaDevice::new`]).
    ///
    /// Fails before allocating when the configuration is invalid
    /// ([`ScratchConfig::check`]) or a buffer's size does not fit in usize
    /// ([`MoeError::SizeOverflow`]); a buffer the device cannot give is
    /// [`MoeError::OutOfMemory`].
    pub fn new(config: ScratchConfig) -> Result<Self> {
        config.check_buildable()?;
        let storage = match config.device {
            Device::Cpu => Storage::Cpu(Box::new(CpuBuffers::new(&config)?)),
            Device::Cuda(ordinal) => {
                return Self::with_cuda_device(config, CudaDevice::new(ordinal)?);
            }
        };
        Ok(Self { config, storage })
    }

    /// A CUDA scratch on `device`, whose stream every call with it will use (a
    /// serving stack's own stream, through [`CudaDevice::with_stream`]).
    pub fn with_cuda_device(config: ScratchConfig, device: Arc<CudaDevice>) -> Result<Self> {
        config.check_buildable()?;
        if config.device != device.device() {
            return Err(MoeError::Scratch(ScratchMismatch::Device {
                tensor: "the scratch's CUDA device",
                expected: config.device,
                got: device.device(),
            }));
        }
        let storage = Storage::Cuda(Box::new(CudaBuffers::new(&config, device)?));
        Ok(Self { config, storage })
    }

    pub fn config(&self) -> &ScratchConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.config.device
    }

    /// Checks one call against the scratch, naming the first mismatch.
    pub fn validate(&self, call: &CallShape<'_>) -> Result<(), ScratchMismatch> {
        self.config.validate(call)
    }

    /// Bytes of memory the scratch holds on its device.
    pub fn allocated_bytes(&self) -> usize {
        match &self.storage {
            Storage::Cpu(buffers) => buffers.allocated_bytes(),
            Storage::Cuda(buffers) => buffers.allocated_bytes(),
        }
    }

    /// The CUDA device of a CUDA scratch.
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        match &self.storage {
            Storage::Cuda(buffers) => Some(&buffers.device),
            Storage::Cpu(_) => None,
        }
    }

    /// The host buffers, once a CPU call has been validated against the scratch.
    /// Validation checked the devices, so a mismatch here is reported, not hidden.
    pub(crate) fn cpu_buffers(&mut self) -> Result<(&ScratchConfig, &mut CpuBuffers)> {
        let expected = self.config.device;
        match &mut self.storage {
            Storage::Cpu(buffers) => Ok((&self.config, buffers)),
            Storage::Cuda(_) => Err(wrong_storage(expected, Device::Cpu)),
        }
    }

    pub(crate) fn cpu_buffers_ref(&self) -> Result<&CpuBuffers> {
        match &self.storage {
            Storage::Cpu(buffers) => Ok(buffers),
            Storage::Cuda(_) => Err(wrong_storage(self.config.device, Device::Cpu)),
        }
    }

    /// The device buffers, once a CUDA call has been validated against the scratch.
    pub(crate) fn cuda_buffers(&self) -> Result<(&ScratchConfig, &CudaBuffers)> {
        match &self.storage {
            Storage::Cuda(buffers) => Ok((&self.config, buffers)),
            Storage::Cpu(_) => Err(wrong_storage(self.config.device, Device::Cuda(0))),
        }
    }
}

fn wrong_storage(expected: Device, got: Device) -> MoeError {
    MoeError::Scratch(ScratchMismatch::Device {
        tensor: "the call",
        expected,
        got,
    })
}
