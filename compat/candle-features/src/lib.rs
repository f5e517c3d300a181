//! Builds only to show that moe-runtime's CUDA side and candle's cudarc features can be
//! one build: the functions use the runtime on a context of the kind candle creates.

use std::sync::Arc;

use moe_runtime::cuda::{CudaContext, CudaDevice, CudaStream};
use moe_runtime::{MoeError, PermuteScratch, ScratchConfig};

/// A scratch on the context and stream a candle CUDA device holds
/// (`candle_core::CudaDevice::cuda_stream()`), with memory of its own.
pub fn scratch_for_candle_stream(
    stream: &Arc<CudaStream>,
    config: ScratchConfig,
) -> Result<PermuteScratch, MoeError> {
    let context: Arc<CudaContext> = stream.context().clone();
    let device = CudaDevice::from_context(context)?;
    device.stream(stream)?;
    PermuteScratch::with_cuda_device(config, device)
}
