//! The permute scratch of a candle device: built once, reused by every call.

use candle_core::{Device, Error, Result};
use moe_runtime::{PermuteScratch, ScratchConfig};

use crate::tensor::candle_error;

/// A permute scratch for calls of up to `max_num_tokens` tokens on one candle device:
/// the routing buffers permute and align reuse on every call, so a call allocates
/// only the tensors it returns.
#[derive(Debug)]
pub struct Scratch {
    pub(crate) inner: PermuteScratch,
    pub(crate) device: Device,
}

impl Scratch {
    /// A scratch on `device` for up to `max_num_tokens` tokens choosing `topk` of
    /// `num_experts` experts. `align_block_size` (`Some(b)`) lets [`crate::align`] run
    /// on it too. On a CUDA device the scratch loads the project's kernels into the
    /// device's context and runs every call on the device's stream. Fails with the
    /// runtime's message when the sizes cannot be indexed, and on a device this build
    /// does not run on.
    pub fn new(
        device: &Device,
        max_num_tokens: usize,
        topk: usize,
        num_experts: usize,
        align_block_size: Option<usize>,
    ) -> Result<Self> {
        let config = |device| {
            let config = ScratchConfig::new(max_num_tokens, topk, num_experts, num_experts, device);
            match align_block_size {
                Some(block_size) => config.with_align_block_size(block_size),
                None => config,
            }
        };
        let inner = match device {
            Device::Cpu => PermuteScratch::new(config(moe_runtime::Device::Cpu)),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let runtime = crate::cuda::runtime_device(cuda)?;
                let config = config(moe_runtime::Device::Cuda(runtime.ordinal()));
                PermuteScratch::with_cuda_device(config, runtime)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(crate::ops::no_cuda()),
            other => {
                return Err(Error::msg(format!(
                    "moe-candle runs on candle's CPU and CUDA devices, not {:?}",
                    other.location()
                )));
            }
        };
        Ok(Self {
            inner: inner.map_err(candle_error)?,
            device: device.clone(),
        })
    }

    /// Checked mode (CUDA): every call reads the scratch's status block back after
    /// its kernels (a host wait) and returns the error the device recorded there, as
    /// the CPU returns it inline. Off by default: then an error the device finds (an
    /// index out of range in unpermute's inputs) waits in the status block for
    /// [`Self::check_status`]. The CPU always reports inline.
    pub fn set_checked(&mut self, checked: bool) {
        self.inner.set_checked(checked);
    }

    /// Waits for the work queued on the scratch's device and returns the first error
    /// its calls recorded on the device since the last check (nothing to wait for on
    /// the CPU).
    pub fn check_status(&self) -> Result<()> {
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::cuda::check_status(self),
            _ => Ok(()),
        }
    }

    /// The candle device the scratch serves.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What the scratch was built for.
    pub fn config(&self) -> &ScratchConfig {
        self.inner.config()
    }
}
