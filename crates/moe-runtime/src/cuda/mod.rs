//! The CUDA device: the same operations as [`crate::cpu`], as kernels queued on a
//! stream.
//!
//! The driver is loaded when the program runs (cudarc), so this module builds
//! everywhere; where there is no driver or no GPU, [`CudaDevice::new`] returns
//! [`MoeError::DeviceUnavailable`](crate::MoeError::DeviceUnavailable) and callers
//! use the CPU. With a scratch, a call validates on the host, queues its kernels and
//! returns device views: it allocates nothing and never waits for the GPU, so calls
//! can be captured in a CUDA graph and replayed.

mod align;
pub mod allocating;
mod blas;
mod block_ops;
mod buffers;
mod device;
mod launch;
mod memory;
mod permute;
mod unpermute;

pub(crate) use buffers::CudaBuffers;

pub use align::{DeviceAlignOutput, align};
pub use blas::{Blas, GemmOutput};
pub use block_ops::{copy_device, router_topk, silu_mul};
pub use device::CudaDevice;
pub use memory::{
    DeviceExpertIds, DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceView,
    DeviceViewMut,
};
pub use permute::{
    DevicePermuteDest, DevicePermuteInput, DevicePermuteOutput, permute, permute_into,
};
pub use unpermute::{DeviceUnpermuteInput, unpermute_into};
