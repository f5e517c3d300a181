//! Device memory the runtime allocates and frees: the scratch's region, the
//! allocating baseline's buffers, and [`DeviceBuffer`], an owned buffer whose views
//! any stream may use.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaContext, DeviceRepr, ValidAsZeroBits, sys};

use super::device::{CudaDevice, Stream, StreamId, driver_error};
use super::memory::{Binding, DeviceView, DeviceViewMut};
use crate::{MoeError, Result};

/// Device memory the runtime allocated, freed when dropped.
#[derive(Debug)]
pub(crate) struct DeviceMemory {
    address: u64,
    bytes: usize,
    context: Arc<CudaContext>,
    /// The stream a stream-ordered allocation is freed on; `None` for `cuMemAlloc`.
    free_on: Option<StreamId>,
}

impl DeviceMemory {
    /// `bytes` (at least 1) of uninitialised device memory with `cuMemAlloc`: not
    /// stream-ordered, so usable on any stream at once. Not while a graph is captured.
    pub(crate) fn allocate(device: &CudaDevice, what: &'static str, bytes: usize) -> Result<Self> {
        device.bind_to_thread()?;
        // SAFETY: the context is current; the memory is only handed to kernels that
        // write each element before reading it, and to fills.
        let address = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }
            .map_err(|error| out_of_memory(error, what, bytes))?;
        Ok(Self {
            address,
            bytes,
            context: device.context().clone(),
            free_on: None,
        })
    }

    /// `bytes` (at least 1) of uninitialised device memory allocated on `stream`
    /// (`cuMemAllocAsync` where the device has it) and freed on it when dropped: what
    /// a per-call tensor of PyTorch costs, and capturable in a graph.
    ///
    /// # Safety
    /// `stream` stays valid until the memory is dropped, and the memory is used only
    /// on it.
    pub(crate) unsafe fn allocate_on(
        stream: &Stream<'_>,
        what: &'static str,
        bytes: usize,
    ) -> Result<Self> {
        let device = stream.device();
        if !device.context().has_async_alloc() {
            return Self::allocate(device, what, bytes);
        }
        device.bind_to_thread()?;
        // SAFETY: the context is current and `stream` valid (the caller's contract).
        let address =
            unsafe { cudarc::driver::result::malloc_async(stream.cu_stream(), bytes.max(1)) }
                .map_err(|error| out_of_memory(error, what, bytes))?;
        Ok(Self {
            address,
            bytes,
            context: device.context().clone(),
            free_on: Some(stream.id()),
        })
    }

    pub(crate) fn address(&self) -> u64 {
        self.address
    }

    /// Fills `len` bytes from `offset` with `byte`, waiting for it (at build time,
    /// before any call uses the memory).
    pub(crate) fn fill_sync(
        &self,
        device: &CudaDevice,
        offset: usize,
        len: usize,
        byte: u8,
    ) -> Result<()> {
        assert!(
            offset + len <= self.bytes.max(1),
            "a fill inside the allocation"
        );
        device.bind_to_thread()?;
        // SAFETY: inside this allocation (asserted); nothing else uses it yet.
        unsafe { cudarc::driver::result::memset_d8_sync(self.address + offset as u64, byte, len) }
            .map_err(driver_error("fill device memory"))
    }
}

/// An allocation's failure: [`MoeError::OutOfMemory`] when that is what it was.
fn out_of_memory(error: cudarc::driver::DriverError, what: &'static str, bytes: usize) -> MoeError {
    match error.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => MoeError::OutOfMemory {
            buffer: what,
            bytes: bytes as u128,
        },
        _ => driver_error("allocate device memory")(error),
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        self.context.record_err(self.context.bind_to_thread());
        let result = match self.free_on {
            // SAFETY: allocated on this stream, which outlives the memory (the
            // allocation's contract); freed once, after the work queued on it.
            Some(stream) => unsafe {
                cudarc::driver::result::free_async(self.address, stream as sys::CUstream)
            },
            // `cuMemFree` waits until the work queued before it that uses the memory
            // has finished, whatever stream it was on: a scratch may be dropped at once.
            // SAFETY: allocated by `malloc_sync` in this context, freed once.
            None => unsafe { cudarc::driver::result::free_sync(self.address) },
        };
        self.context.record_err(result);
    }
}

/// `len` elements of `T` in device memory the runtime allocated (`cuMemAlloc`) and
/// frees when dropped (`cuMemFree`, which waits for the work still using it).
///
/// Because the free waits, its views may be used on any stream: what the caller
/// orders is only which stream's work sees which values (weights uploaded once and
/// read by every stream, a layer's activations).
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    memory: DeviceMemory,
    len: usize,
    ordinal: usize,
    _elements: PhantomData<T>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// `len` zeroed elements on `device` (waits for the fill; not while capturing).
    pub fn zeros(device: &CudaDevice, len: usize) -> Result<Self>
    where
        T: ValidAsZeroBits,
    {
        let bytes = byte_len::<T>(len)?;
        let memory = DeviceMemory::allocate(device, "device buffer", bytes)?;
        memory.fill_sync(device, 0, bytes, 0)?;
        Ok(Self::from_memory(memory, len, device))
    }

    /// A copy of `host` on `device` (waits for the copy; not while capturing).
    pub fn from_host(device: &CudaDevice, host: &[T]) -> Result<Self> {
        let bytes = byte_len::<T>(host.len())?;
        let memory = DeviceMemory::allocate(device, "device buffer", bytes)?;
        if !host.is_empty() {
            device.bind_to_thread()?;
            // SAFETY: the allocation holds `host.len()` elements of `T`.
            unsafe { cudarc::driver::result::memcpy_htod_sync(memory.address(), host) }
                .map_err(driver_error("copy host memory to the device"))?;
        }
        Ok(Self::from_memory(memory, host.len(), device))
    }

    fn from_memory(memory: DeviceMemory, len: usize, device: &CudaDevice) -> Self {
        Self {
            memory,
            len,
            ordinal: device.ordinal(),
            _elements: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer, for reading, on any stream.
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView::from_parts(
            self.memory.address(),
            self.len,
            self.ordinal,
            Binding::ANY_STREAM,
        )
    }

    /// The whole buffer, for writing, on any stream.
    pub fn view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut::from_parts(
            self.memory.address(),
            self.len,
            self.ordinal,
            Binding::ANY_STREAM,
        )
    }

    /// Copies `host` into the start of the buffer, ordered on `stream` (the host
    /// memory is pageable, so the copy is done when this returns).
    pub fn copy_from_host(&mut self, stream: &Stream<'_>, host: &[T]) -> Result<()> {
        if host.len() > self.len {
            return Err(MoeError::Shape {
                tensor: "device buffer",
                len: self.len,
                expected: format!("room for the {} elements copied in", host.len()),
            });
        }
        if host.is_empty() {
            return Ok(());
        }
        stream.device().bind_to_thread()?;
        // SAFETY: the buffer holds at least `host.len()` elements (checked); the copy
        // is queued on a valid stream of its context.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.memory.address(),
                host,
                stream.cu_stream(),
            )
        }
        .map_err(driver_error("copy host memory to the device"))?;
        stream.synchronize()
    }
}

/// Bytes of `len` elements of `T`, or the error for a size no allocation can have.
fn byte_len<T>(len: usize) -> Result<usize> {
    crate::size::product("device buffer bytes", &[len, size_of::<T>()])
}
