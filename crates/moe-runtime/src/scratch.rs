//! The permute scratch: every intermediate buffer of permute and align, built once.

use crate::cpu::CpuBuffers;
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
    Cpu(CpuBuffers),
}

impl PermuteScratch {
    /// Checks `config` and allocates every buffer it implies on `config.device`.
    pub fn new(config: ScratchConfig) -> Result<Self> {
        config.check()?;
        let storage = match config.device {
            Device::Cpu => Storage::Cpu(CpuBuffers::new(&config)?),
            device @ Device::Cuda(_) => {
                return Err(MoeError::DeviceUnavailable {
                    device,
                    reason: "this build of moe-runtime has no CUDA device".into(),
                });
            }
        };
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
        }
    }

    /// The host buffers, once a call on the CPU has been validated against the scratch.
    pub(crate) fn cpu_buffers(&mut self) -> (&ScratchConfig, &mut CpuBuffers) {
        match &mut self.storage {
            Storage::Cpu(buffers) => (&self.config, buffers),
        }
    }

    pub(crate) fn cpu_buffers_ref(&self) -> &CpuBuffers {
        match &self.storage {
            Storage::Cpu(buffers) => buffers,
        }
    }
}
