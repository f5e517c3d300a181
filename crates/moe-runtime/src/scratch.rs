//! The permute scratch: every intermediate buffer of permute and align, built once.

use std::sync::Arc;

use crate::cpu::CpuBuffers;
use crate::cuda::{CudaBuffers, CudaDevice, DeviceStatus, ScratchMemoryLayout, Stream, StreamId};
use crate::{CallShape, Device, MoeError, Result, ScratchConfig, ScratchMismatch};

/// Pre-allocated buffers for permute and align, built once from a [`ScratchConfig`]
/// and validated on every call.
///
/// A call that is given a scratch allocates nothing and returns views into it, sized
/// for the call's `N`: two calls return views over the same memory. One scratch can
/// serve every MoE layer of a model, since the layers run one after another; see
/// [`ScratchWorkspace`](crate::ScratchWorkspace) for sharing one between users.
///
/// On a CUDA device the scratch's calls run on one stream at a time: the first call
/// binds it to its stream, a call on another stream is refused
/// ([`ScratchMismatch::Stream`]) until the scratch is moved with
/// [`Self::switch_stream`] (which orders the two streams on the device) or
/// [`Self::assume_stream`] (`unsafe`: the caller has ordered them). Its memory is its
/// own ([`Self::new`], [`Self::with_cuda_device`]) or the caller's
/// ([`Self::in_cuda_memory`]).
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
    /// CUDA scratch opens the device ([`CudaDevice::new`]).
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

    /// A CUDA scratch with memory of its own (`cuMemAlloc`, once) on `device`, whose
    /// kernels its calls launch. Not while a graph is being captured.
    pub fn with_cuda_device(config: ScratchConfig, device: Arc<CudaDevice>) -> Result<Self> {
        check_cuda_device(&config, &device)?;
        let storage = Storage::Cuda(Box::new(CudaBuffers::allocate(&config, device)?));
        Ok(Self { config, storage })
    }

    /// The device memory a CUDA scratch of `config` needs: hand a region of it to
    /// [`Self::in_cuda_memory`].
    pub fn cuda_memory_layout(config: &ScratchConfig) -> Result<ScratchMemoryLayout> {
        Ok(crate::cuda::Carving::of(config)?.layout())
    }

    /// A CUDA scratch over `bytes` of device memory the caller owns at `address`
    /// (PyTorch's caching allocator, a candle tensor), carved into its buffers;
    /// bound to `stream`, where its status block is cleared.
    ///
    /// Errors when the region is smaller than [`Self::cuda_memory_layout`] says or
    /// not aligned as it says.
    ///
    /// # Safety
    /// - `address..address + bytes` is device memory of `device`'s context;
    /// - it stays allocated until the scratch is dropped and every call made with it
    ///   has finished on the device (a free ordered on the stream the scratch is
    ///   bound to last, as PyTorch's allocator orders a tensor's, is enough);
    /// - nothing else reads or writes it meanwhile;
    /// - the work already queued on it before this call is ordered before `stream`.
    pub unsafe fn in_cuda_memory(
        config: ScratchConfig,
        device: Arc<CudaDevice>,
        address: u64,
        bytes: usize,
        stream: &Stream<'_>,
    ) -> Result<Self> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Self::over_cuda_memory(config, device, address, bytes, stream, true) }
    }

    /// [`Self::in_cuda_memory`] over a region that already holds a scratch of an
    /// equal configuration (or a byte copy of one, as PyTorch's functionalization
    /// hands an op a copy of a tensor it mutates): the status block is left as it is,
    /// so errors recorded there are still reported. Queues nothing.
    ///
    /// # Safety
    /// As [`Self::in_cuda_memory`], and the region's status block was set up by
    /// [`Self::in_cuda_memory`] for an equal configuration (or copied from one).
    pub unsafe fn reopen_cuda_memory(
        config: ScratchConfig,
        device: Arc<CudaDevice>,
        address: u64,
        bytes: usize,
        stream: &Stream<'_>,
    ) -> Result<Self> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Self::over_cuda_memory(config, device, address, bytes, stream, false) }
    }

    /// [`Self::in_cuda_memory`] (`clear_status`) or [`Self::reopen_cuda_memory`].
    ///
    /// # Safety
    /// As the one of the two it stands for.
    unsafe fn over_cuda_memory(
        config: ScratchConfig,
        device: Arc<CudaDevice>,
        address: u64,
        bytes: usize,
        stream: &Stream<'_>,
        clear_status: bool,
    ) -> Result<Self> {
        check_cuda_device(&config, &device)?;
        // SAFETY: the caller's contract, passed on.
        let buffers = unsafe {
            CudaBuffers::in_memory(&config, device, address, bytes, stream, clear_status)?
        };
        Ok(Self {
            config,
            storage: Storage::Cuda(Box::new(buffers)),
        })
    }

    /// A CUDA scratch allocated on `stream` (stream-ordered), bound to it for life:
    /// the allocating baseline's.
    ///
    /// # Safety
    /// `stream` stays valid until the scratch is dropped, and the scratch is never
    /// moved to another stream.
    pub(crate) unsafe fn on_stream(
        config: ScratchConfig,
        device: Arc<CudaDevice>,
        stream: &Stream<'_>,
    ) -> Result<Self> {
        check_cuda_device(&config, &device)?;
        // SAFETY: the caller's contract, passed on.
        let buffers = unsafe { CudaBuffers::on_stream(&config, device, stream)? };
        Ok(Self {
            config,
            storage: Storage::Cuda(Box::new(buffers)),
        })
    }

    /// The configuration the scratch was built for.
    pub fn config(&self) -> &ScratchConfig {
        &self.config
    }

    /// The device the scratch's memory is on.
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

    /// Checked mode (CUDA): every call reads the status block back after its kernels
    /// (a host wait) and returns the error it holds, as the CPU does inline. Off by
    /// default; a call on a stream that is capturing a graph skips the read. The CPU
    /// always reports inline.
    pub fn set_checked(&mut self, checked: bool) {
        if let Storage::Cuda(buffers) = &mut self.storage {
            buffers.checked = checked;
        }
    }

    /// Whether calls check the status block themselves (always true on the CPU).
    pub fn is_checked(&self) -> bool {
        match &self.storage {
            Storage::Cuda(buffers) => buffers.checked,
            Storage::Cpu(_) => true,
        }
    }

    /// The status block of a CUDA scratch, where its calls report bad input only the
    /// device sees, bound to the scratch's stream.
    pub fn cuda_status(&self) -> Option<DeviceStatus<'_>> {
        match &self.storage {
            Storage::Cuda(buffers) => Some(buffers.bound_status()),
            Storage::Cpu(_) => None,
        }
    }

    /// Reads the status block after the work queued on `stream` (a host wait) and
    /// returns the first error the scratch's calls recorded since the last check, as
    /// the CPU would have returned it ([`DeviceStatus::check`]). A CPU scratch has
    /// nothing pending: `Ok`.
    pub fn check_status(&self, stream: &Stream<'_>) -> Result<()> {
        match &self.storage {
            Storage::Cuda(buffers) => buffers.bound_status().check(stream),
            Storage::Cpu(_) => Ok(()),
        }
    }

    /// The stream a CUDA scratch is bound to, once a call ran (or it was built on one).
    pub fn bound_stream(&self) -> Option<StreamId> {
        match &self.storage {
            Storage::Cuda(buffers) => buffers.bound_stream(),
            Storage::Cpu(_) => None,
        }
    }

    /// Moves a CUDA scratch from `from`, the stream it is bound to, to `to`: `to`
    /// waits on the device for everything `from` has queued (an event; no host wait),
    /// then later calls run on `to`. Before a graph capture on `to`, not during it.
    pub fn switch_stream(&mut self, from: &Stream<'_>, to: &Stream<'_>) -> Result<()> {
        let (_, buffers) = self.cuda_buffers_mut(to.device().device())?;
        buffers.switch_stream(from, to)
    }

    /// Binds a CUDA scratch to `to` without ordering anything itself.
    ///
    /// # Safety
    /// Every call made with the scratch on its previous stream is ordered before the
    /// work queued on `to` from now on (the caller recorded an event there and made
    /// `to` wait, or synchronised), and `to` stays valid while the scratch is bound to
    /// it.
    pub unsafe fn assume_stream(&mut self, to: &Stream<'_>) -> Result<()> {
        let (_, buffers) = self.cuda_buffers_mut(to.device().device())?;
        // SAFETY: the caller's contract, passed on.
        unsafe { buffers.assume_stream(to) }
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
    /// `call` names the device of the CUDA call, for the error on a CPU scratch.
    pub(crate) fn cuda_buffers(&self, call: Device) -> Result<(&ScratchConfig, &CudaBuffers)> {
        match &self.storage {
            Storage::Cuda(buffers) => Ok((&self.config, buffers)),
            Storage::Cpu(_) => Err(wrong_storage(self.config.device, call)),
        }
    }

    pub(crate) fn cuda_buffers_mut(
        &mut self,
        call: Device,
    ) -> Result<(&ScratchConfig, &mut CudaBuffers)> {
        match &mut self.storage {
            Storage::Cuda(buffers) => Ok((&self.config, buffers)),
            Storage::Cpu(_) => Err(wrong_storage(self.config.device, call)),
        }
    }
}

/// A CUDA scratch's configuration names the device it is built on.
fn check_cuda_device(config: &ScratchConfig, device: &CudaDevice) -> Result<()> {
    config.check_buildable()?;
    if config.device != device.device() {
        return Err(MoeError::Scratch(ScratchMismatch::Device {
            tensor: "the scratch's CUDA device",
            expected: config.device,
            got: device.device(),
        }));
    }
    Ok(())
}

fn wrong_storage(expected: Device, got: Device) -> MoeError {
    MoeError::Scratch(ScratchMismatch::Device {
        tensor: "the call",
        expected,
        got,
    })
}
