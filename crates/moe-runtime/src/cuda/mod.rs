//! The CUDA device: the same operations as [`crate::cpu`], as kernels queued on a
//! stream the caller chooses per call.
//!
//! The driver is loaded when the program runs (cudarc; feature `dynamic-loading`, the
//! default), so this module builds everywhere; where there is no driver or no GPU,
//! [`CudaDevice::new`] returns
//! [`MoeError::DeviceUnavailable`](crate::MoeError::DeviceUnavailable) and callers
//! use the CPU.
//!
//! - [`CudaDevice`]: a context and the kernels, loaded once per context.
//! - [`Stream`]: the stream one call runs on, borrowed per call.
//! - Views ([`DeviceView`], [`DeviceRows`], ...): device memory a call reads or
//!   writes, bound to the stream it may be used on (see [`memory`](DeviceView) and
//!   `docs/architecture.md` for the ordering model and what is `unsafe`).
//! - [`permute`], [`permute_into`], [`align`], [`unpermute_into`]: with a scratch, a
//!   call validates on the host, queues its kernels and returns device views; it
//!   allocates nothing and never waits for the GPU, so calls can be captured in a
//!   CUDA graph and replayed.
//! - [`DeviceStatus`]: bad input only the device can see, returned when the caller
//!   checks (or after every call in checked mode).
//! - [`launch()`]: the one `unsafe` launch of every kernel of the workspace.
//! - [`allocating`]: the per-call-allocation baseline the benchmarks compare with.

mod align;
pub mod allocating;
mod buffers;
mod device;
mod launch;
mod memory;
mod owned;
mod permute;
mod status;
mod unpermute;

pub(crate) use buffers::{Carving, CudaBuffers};

pub use align::{DeviceAlignOutput, align};
pub use buffers::{SCRATCH_ALIGNMENT, ScratchMemoryLayout, ScratchOffsets};
pub use device::{CudaDevice, CudaLibrary, KERNEL_MODULE_ENV, Stream, StreamId};
pub use launch::{
    ALIGN_SINGLE_BLOCK_ENTRIES, Grid, MULTI_BLOCK_CHUNK, SCAN_IN_PLACE_ENTRIES,
    SINGLE_BLOCK_ENTRIES, SMALL_CHUNK, SMALL_CHUNK_ENTRIES, launch, route_launches,
};
pub use memory::{
    DeviceExpertIds, DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceView,
    DeviceViewMut,
};
pub use moe_kernels::KernelModule;
pub use owned::DeviceBuffer;
pub use permute::{
    DevicePermuteDest, DevicePermuteInput, DevicePermuteOutput, permute, permute_into,
};
pub use status::{DeviceStatus, STATUS_BYTES, STATUS_CLEAR_BYTE, StatusBuffer};
pub use unpermute::{DeviceUnpermuteInput, unpermute_into};

/// cudarc itself, for what the re-exports above do not cover (the version this crate
/// is built with).
pub use cudarc;
/// The cudarc types that appear in this module's signatures, re-exported so that
/// callers name the same version of them.
pub use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, ValidAsZeroBits,
};
/// The kernels' names and parameter blocks, for [`launch()`].
pub use moe_kernels::{KernelParams, ParamsKind, kernels::Kernel};
