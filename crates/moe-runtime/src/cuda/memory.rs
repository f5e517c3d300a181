//! Borrowed views of device memory: what the CUDA calls take and return.
//!
//! A view is a raw device address, a length and the device it is on, borrowed for
//! `'a` from whatever owns the memory (a `CudaSlice`, a scratch, or the caller's own
//! allocator through the `unsafe` constructors). Kernels receive the addresses; the
//! lengths are what validation checks.

use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::device::driver_error;
use crate::{DType, Device, Element, MoeError, Result};

/// The accessors both view types share: address, length, device, sub-views.
macro_rules! view_accessors {
    () => {
        /// The view's device address (what kernels receive).
        pub fn address(&self) -> u64 {
            self.address
        }

        pub fn len(&self) -> usize {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        pub fn device(&self) -> Device {
            Device::Cuda(self.ordinal)
        }

        /// The first `len` elements (all of them if there are fewer).
        pub fn prefix(self, len: usize) -> Self {
            Self {
                len: len.min(self.len),
                ..self
            }
        }

        /// Elements `start..start + len`.
        pub fn range(self, start: usize, len: usize) -> Result<Self> {
            check_range(self.len, start, len)?;
            Ok(Self {
                address: self.address + (start * size_of::<T>()) as u64,
                len,
                ..self
            })
        }
    };
}

/// A read-only view of `len` elements of `T` in device memory.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    address: u64,
    len: usize,
    ordinal: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceView<'_, T> {}

impl<'a, T: DeviceRepr> DeviceView<'a, T> {
    /// Views all of `slice`.
    pub fn new(slice: &'a CudaSlice<T>) -> Self {
        let (address, _no_event) = slice.device_ptr(slice.stream());
        Self {
            address,
            len: slice.len(),
            ordinal: slice.ordinal(),
            _borrow: PhantomData,
        }
    }

    /// Views memory the caller owns.
    ///
    /// # Safety
    /// `address` is the start of `len` initialised elements of `T` on CUDA device
    /// `ordinal`, which stay allocated and are not written by anyone else while the
    /// view (lifetime `'a`) is in use, including by work already queued on the stream.
    pub unsafe fn from_raw(address: u64, len: usize, ordinal: usize) -> Self {
        Self {
            address,
            len,
            ordinal,
            _borrow: PhantomData,
        }
    }

    view_accessors!();

    /// Copies the view to host memory, after the work queued on `stream`.
    pub fn to_host(&self, stream: &CudaStream) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        let mut host = vec![T::default(); self.len];
        if self.len > 0 {
            // SAFETY: `host` has `len` elements of `T`, the view `len` on the device.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut host,
                    self.address,
                    stream.cu_stream(),
                )
            }
            .map_err(driver_error("copy device memory to the host"))?;
        }
        stream
            .synchronize()
            .map_err(driver_error("synchronize the stream"))?;
        Ok(host)
    }

    /// Reinterprets the view as bytes.
    pub(crate) fn bytes(self) -> DeviceView<'a, u8> {
        DeviceView {
            address: self.address,
            len: self.len * size_of::<T>(),
            ordinal: self.ordinal,
            _borrow: PhantomData,
        }
    }
}

/// A writable view of `len` elements of `T` in device memory.
#[derive(Debug)]
pub struct DeviceViewMut<'a, T> {
    address: u64,
    len: usize,
    ordinal: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T: DeviceRepr> DeviceViewMut<'a, T> {
    /// Views all of `slice` for writing.
    pub fn new(slice: &'a mut CudaSlice<T>) -> Self {
        let ordinal = slice.ordinal();
        let len = slice.len();
        let stream = slice.stream().clone();
        let (address, _no_event) = slice.device_ptr_mut(&stream);
        Self {
            address,
            len,
            ordinal,
            _borrow: PhantomData,
        }
    }

    /// Views memory the caller owns, for writing.
    ///
    /// # Safety
    /// `address` is the start of `len` elements of `T` on CUDA device `ordinal`, which
    /// stay allocated and are neither read nor written by anyone else while the view
    /// (lifetime `'a`) is in use.
    pub unsafe fn from_raw(address: u64, len: usize, ordinal: usize) -> Self {
        Self {
            address,
            len,
            ordinal,
            _borrow: PhantomData,
        }
    }

    view_accessors!();

    /// The same memory, read-only.
    pub fn into_view(self) -> DeviceView<'a, T> {
        DeviceView {
            address: self.address,
            len: self.len,
            ordinal: self.ordinal,
            _borrow: PhantomData,
        }
    }
}

fn check_range(len: usize, start: usize, count: usize) -> Result<()> {
    if start > len || count > len - start {
        return Err(MoeError::Shape {
            tensor: "view",
            len,
            expected: format!("a range {start}..{} inside it", start.saturating_add(count)),
        });
    }
    Ok(())
}

fn whole_rows(tensor: &'static str, len: usize, columns: usize) -> Result<usize> {
    if columns == 0 || len % columns != 0 {
        return Err(MoeError::Shape {
            tensor,
            len,
            expected: format!("whole rows of {columns} (at least 1)"),
        });
    }
    Ok(len / columns)
}

/// `[R, H]` rows of any [`DType`] in device memory, seen as bytes.
#[derive(Clone, Copy, Debug)]
pub struct DeviceRows<'a> {
    bytes: DeviceView<'a, u8>,
    dtype: DType,
    hidden_size: usize,
}

impl<'a> DeviceRows<'a> {
    /// Views `data` as rows of `hidden_size` elements.
    pub fn new<T: Element + DeviceRepr>(
        data: DeviceView<'a, T>,
        hidden_size: usize,
    ) -> Result<Self> {
        whole_rows("rows", data.len(), hidden_size)?;
        Ok(Self {
            bytes: data.bytes(),
            dtype: T::DTYPE,
            hidden_size,
        })
    }

    /// Views device bytes as rows of `hidden_size` elements of `dtype` (fp8 rows are
    /// bytes).
    pub fn from_bytes(bytes: DeviceView<'a, u8>, dtype: DType, hidden_size: usize) -> Result<Self> {
        whole_rows(
            "rows",
            bytes.len(),
            hidden_size.saturating_mul(dtype.size_bytes()),
        )?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    pub(crate) fn from_parts(bytes: DeviceView<'a, u8>, dtype: DType, hidden_size: usize) -> Self {
        Self {
            bytes,
            dtype,
            hidden_size,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn row_bytes(&self) -> usize {
        self.hidden_size * self.dtype.size_bytes()
    }

    pub fn num_rows(&self) -> usize {
        self.bytes.len() / self.row_bytes()
    }

    pub fn bytes(&self) -> DeviceView<'a, u8> {
        self.bytes
    }

    /// The rows as elements of `T`, when `T` is their type.
    pub fn typed<T: Element + DeviceRepr>(&self) -> Result<DeviceView<'a, T>> {
        if T::DTYPE != self.dtype {
            return Err(MoeError::Dtype {
                tensor: "rows",
                op: "typed",
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        // SAFETY: the same memory, borrowed for the same 'a, in its own element type.
        Ok(unsafe {
            DeviceView::from_raw(
                self.bytes.address(),
                self.bytes.len() / size_of::<T>(),
                self.bytes.ordinal,
            )
        })
    }
}

/// Writable `[R, H]` rows in device memory.
#[derive(Debug)]
pub struct DeviceRowsMut<'a> {
    bytes: DeviceViewMut<'a, u8>,
    dtype: DType,
    hidden_size: usize,
}

impl<'a> DeviceRowsMut<'a> {
    pub fn new<T: Element + DeviceRepr>(
        data: DeviceViewMut<'a, T>,
        hidden_size: usize,
    ) -> Result<Self> {
        whole_rows("rows", data.len(), hidden_size)?;
        Ok(Self {
            bytes: DeviceViewMut {
                address: data.address,
                len: data.len * size_of::<T>(),
                ordinal: data.ordinal,
                _borrow: PhantomData,
            },
            dtype: T::DTYPE,
            hidden_size,
        })
    }

    /// Views writable device bytes as rows of `hidden_size` elements of `dtype`.
    pub fn from_bytes(
        bytes: DeviceViewMut<'a, u8>,
        dtype: DType,
        hidden_size: usize,
    ) -> Result<Self> {
        whole_rows(
            "rows",
            bytes.len(),
            hidden_size.saturating_mul(dtype.size_bytes()),
        )?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub(crate) fn into_parts(self) -> (DeviceViewMut<'a, u8>, DType, usize) {
        (self.bytes, self.dtype, self.hidden_size)
    }
}

/// `topk_ids` `[N, K]` in device memory, i32 or i64.
#[derive(Clone, Copy, Debug)]
pub enum DeviceExpertIds<'a> {
    I32(DeviceView<'a, i32>),
    I64(DeviceView<'a, i64>),
}

impl DeviceExpertIds<'_> {
    pub fn len(&self) -> usize {
        match self {
            DeviceExpertIds::I32(ids) => ids.len(),
            DeviceExpertIds::I64(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn address(&self) -> u64 {
        match self {
            DeviceExpertIds::I32(ids) => ids.address(),
            DeviceExpertIds::I64(ids) => ids.address(),
        }
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            DeviceExpertIds::I32(ids) => ids.device(),
            DeviceExpertIds::I64(ids) => ids.device(),
        }
    }
}

/// `topk_ids` with its `K`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTopkIds<'a> {
    ids: DeviceExpertIds<'a>,
    topk: usize,
}

impl<'a> DeviceTopkIds<'a> {
    pub fn new(ids: DeviceExpertIds<'a>, topk: usize) -> Result<Self> {
        whole_rows("topk_ids", ids.len(), topk)?;
        Ok(Self { ids, topk })
    }

    pub fn ids(&self) -> DeviceExpertIds<'a> {
        self.ids
    }

    pub fn topk(&self) -> usize {
        self.topk
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.len() / self.topk
    }
}

/// Per-token f32 scales `[N, S]` in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceScales<'a> {
    data: DeviceView<'a, f32>,
    columns: usize,
}

impl<'a> DeviceScales<'a> {
    pub fn new(data: DeviceView<'a, f32>, columns: usize) -> Result<Self> {
        whole_rows("scales", data.len(), columns)?;
        Ok(Self { data, columns })
    }

    pub(crate) fn from_parts(data: DeviceView<'a, f32>, columns: usize) -> Self {
        Self { data, columns }
    }

    pub fn data(&self) -> DeviceView<'a, f32> {
        self.data
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    pub fn num_rows(&self) -> usize {
        self.data.len() / self.columns
    }
}
