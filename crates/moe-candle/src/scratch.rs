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
    /// on it too. Fails with the runtime's message when the sizes cannot be indexed,
    /// and on a device this build does not run on.
    pub fn new(
        device: &Device,
        max_num_tokens: usize,
        topk: usize,
        num_experts: usize,
        align_block_size: Option<usize>,
    ) -> Result<Self> {
        let runtime_device = match device {
            Device::Cpu => moe_runtime::Device::Cpu,
            other => {
                return Err(Error::msg(format!(
                    "moe-candle runs on candle's CPU device in this release; {:?} tensors are not supported yet",
                    other.location()
                )));
            }
        };
        let mut config = ScratchConfig::new(
            max_num_tokens,
            topk,
            num_experts,
            num_experts,
            runtime_device,
        );
        if let Some(block_size) = align_block_size {
            config = config.with_align_block_size(block_size);
        }
        Ok(Self {
            inner: PermuteScratch::new(config).map_err(candle_error)?,
            device: device.clone(),
        })
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
