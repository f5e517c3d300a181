//! Borrowed views of device memory: what the CUDA calls take and return.
//!
//! A view is a device address, a length, the device, and the stream it may be used
//! on, borrowed for `'a` from whatever owns the memory. The ordering model
//! (`docs/architecture.md`, "CUDA streams, memory and `unsafe`"):
//!
//! - A view made safely from a cudarc slice ([`DeviceView::new`],
//!   [`DeviceViewMut::new`]) is **bound to the slice's stream**, and a call on any
//!   other stream refuses it ([`MoeError::StreamMismatch`]). On that stream every use
//!   is ordered, and the slice's own drop (a free queued on the same stream) comes
//!   after the call's kernels. Where the slice's context tracks events (cudarc's
//!   default once it has several streams), the view keeps cudarc's protocol: it waits
//!   for the slice's last write when made, and the call records the slice's event
//!   after its kernels, so cudarc orders later uses on other streams after them.
//! - A view of memory the caller owns ([`DeviceView::from_raw`]) or a bound view
//!   released with [`DeviceView::on_any_stream`] is usable on any stream: those are
//!   `unsafe`, and the caller guarantees the ordering.
//!
//! Views returned by the calls (permute's outputs) are bound to the call's stream.

use std::marker::PhantomData;

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, sys};

use super::device::{Stream, StreamId, driver_error};
use crate::{DType, Device, Element, MoeError, Result, ScratchMismatch};

/// What a view may be used with: the stream it is bound to (`None`: any) and the
/// cudarc event to record after a call used it (`None`: no tracking).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) stream: Option<StreamId>,
    event: Option<usize>,
}

impl Binding {
    pub(crate) const ANY_STREAM: Binding = Binding {
        stream: None,
        event: None,
    };

    /// Bound to `stream`, no event.
    pub(crate) fn stream(stream: StreamId) -> Self {
        Self {
            stream: Some(stream),
            event: None,
        }
    }

    /// Checks that `tensor` may be used on `stream`.
    pub(crate) fn check(&self, tensor: &'static str, stream: &Stream<'_>) -> Result<()> {
        match self.stream {
            Some(bound) if bound != stream.id() => Err(MoeError::StreamMismatch {
                tensor,
                bound,
                call: stream.id(),
            }),
            _ => Ok(()),
        }
    }

    /// Records the view's cudarc event on `stream`, after the call's kernels: what
    /// cudarc's own launches do for the slices they use.
    pub(crate) fn record(&self, stream: &Stream<'_>) -> Result<()> {
        if let Some(event) = self.event {
            // SAFETY: the event belongs to a slice borrowed by the view, so it is
            // alive; the stream is valid (its constructors' contract).
            unsafe {
                cudarc::driver::result::event::record(event as sys::CUevent, stream.cu_stream())
            }
            .map_err(driver_error("record a slice's event"))?;
        }
        Ok(())
    }
}

/// The event a cudarc guard would record on drop, taken out of it so that the call
/// records it after its kernels instead of now.
fn take_event(mut guard: SyncOnDrop<'_>) -> Option<usize> {
    match &mut guard {
        SyncOnDrop::Record(target) => target.take().map(|(event, _)| event.cu_event() as usize),
        // Slices never hand out a synchronising guard; dropping one is what it asks.
        SyncOnDrop::Sync(_) => None,
    }
}

/// The accessors both view types share: address, length, device, sub-views.
macro_rules! view_accessors {
    () => {
        /// The view's device address (what kernels receive).
        pub fn address(&self) -> u64 {
            self.address
        }

        /// Number of elements.
        pub fn len(&self) -> usize {
            self.len
        }

        /// Whether the view has no elements.
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        /// The CUDA device the memory is on.
        pub fn device(&self) -> Device {
            Device::Cuda(self.ordinal)
        }

        /// The stream the view is bound to, if any.
        pub fn stream(&self) -> Option<StreamId> {
            self.binding.stream
        }

        /// The first `len` elements (all of them if there are fewer).
        pub fn prefix(self, len: usize) -> Self {
            Self {
                len: len.min(self.len),
                ..self
            }
        }

        /// Elements `start..start + len`; `tensor` names the view in the error.
        pub fn range(self, tensor: &'static str, start: usize, len: usize) -> Result<Self> {
            check_range(tensor, self.len, start, len)?;
            Ok(Self {
                address: self.address + (start * size_of::<T>()) as u64,
                len,
                ..self
            })
        }

        /// The same memory, usable on any stream.
        ///
        /// # Safety
        /// Every use of the view on a stream other than the one it is bound to is
        /// ordered, by the caller, after the work that wrote the memory and before
        /// the work that writes or frees it next.
        pub unsafe fn on_any_stream(self) -> Self {
            Self {
                binding: Binding {
                    stream: None,
                    ..self.binding
                },
                ..self
            }
        }

        pub(crate) fn binding(&self) -> Binding {
            self.binding
        }
    };
}

/// A read-only view of `len` elements of `T` in device memory.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    address: u64,
    len: usize,
    ordinal: usize,
    binding: Binding,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceView<'_, T> {}

impl<'a, T: DeviceRepr> DeviceView<'a, T> {
    /// Views all of a cudarc slice (or a cudarc view of one), bound to its stream.
    pub fn new<S: DevicePtr<T>>(slice: &'a S) -> Self {
        let stream = slice.stream();
        let (address, guard) = slice.device_ptr(stream);
        Self {
            address,
            len: slice.len(),
            ordinal: stream.context().ordinal(),
            binding: Binding {
                stream: Some(stream.cu_stream() as StreamId),
                event: take_event(guard),
            },
            _borrow: PhantomData,
        }
    }

    /// Views memory the caller owns, usable on any stream.
    ///
    /// # Safety
    /// - `address` is the start of `len` initialised elements of `T` on CUDA device
    ///   `ordinal`, aligned for `T`;
    /// - the memory stays allocated until every call given the view has finished on
    ///   the device (a free ordered on the call's stream is enough);
    /// - nothing writes it while those calls run, unless ordered before or after them
    ///   (the same stream, or events).
    pub unsafe fn from_raw(address: u64, len: usize, ordinal: usize) -> Self {
        Self {
            address,
            len,
            ordinal,
            binding: Binding::ANY_STREAM,
            _borrow: PhantomData,
        }
    }

    /// A view the runtime made of its own memory, bound to `binding`.
    pub(crate) fn from_parts(address: u64, len: usize, ordinal: usize, binding: Binding) -> Self {
        Self {
            address,
            len,
            ordinal,
            binding,
            _borrow: PhantomData,
        }
    }

    view_accessors!();

    /// Copies the view to host memory after the work queued on `stream`, waiting for
    /// it. `stream` must be one the view may be used on.
    pub fn to_host(&self, stream: &Stream<'_>) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        self.binding.check("view", stream)?;
        let mut host = vec![T::default(); self.len];
        stream.device().bind_to_thread()?;
        if self.len > 0 {
            // SAFETY: `host` has `len` elements of `T`, the view `len` on the device;
            // the copy is ordered on a stream the view may be used on.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut host,
                    self.address,
                    stream.cu_stream(),
                )
            }
            .map_err(driver_error("copy device memory to the host"))?;
        }
        stream.synchronize()?;
        self.binding.record(stream)?;
        Ok(host)
    }

    /// Queues a copy of the view into `dst` (the same length) on `stream`, where
    /// both may be used; no host wait.
    pub fn copy_into(&self, dst: DeviceViewMut<'_, T>, stream: &Stream<'_>) -> Result<()> {
        self.binding.check("copy source", stream)?;
        dst.binding.check("copy destination", stream)?;
        for (tensor, view) in [
            ("copy source", self.ordinal),
            ("copy destination", dst.ordinal),
        ] {
            if view != stream.device().ordinal() {
                return Err(ScratchMismatch::Device {
                    tensor,
                    expected: stream.device().device(),
                    got: Device::Cuda(view),
                }
                .into());
            }
        }
        if dst.len != self.len {
            return Err(MoeError::Shape {
                tensor: "copy destination",
                len: dst.len,
                expected: format!("{} elements, as many as the source", self.len),
            });
        }
        if self.len > 0 {
            stream.device().bind_to_thread()?;
            // SAFETY: both views are `len` elements of `T` on the stream's device,
            // usable on `stream` (checked), and borrowed for the call, so alive.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.address,
                    self.address,
                    self.len * size_of::<T>(),
                    stream.cu_stream(),
                )
            }
            .map_err(driver_error("copy device memory"))?;
        }
        self.binding.record(stream)?;
        dst.binding.record(stream)
    }

    /// Reinterprets the view as bytes.
    pub(crate) fn bytes(self) -> DeviceView<'a, u8> {
        DeviceView {
            address: self.address,
            len: self.len * size_of::<T>(),
            ordinal: self.ordinal,
            binding: self.binding,
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
    binding: Binding,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T: DeviceRepr> DeviceViewMut<'a, T> {
    /// Views all of a cudarc slice (or a mutable cudarc view of one) for writing,
    /// bound to its stream.
    pub fn new<S: DevicePtrMut<T>>(slice: &'a mut S) -> Self {
        let stream = slice.stream().clone();
        let ordinal = stream.context().ordinal();
        let len = slice.len();
        let (address, guard) = slice.device_ptr_mut(&stream);
        Self {
            address,
            len,
            ordinal,
            binding: Binding {
                stream: Some(stream.cu_stream() as StreamId),
                event: take_event(guard),
            },
            _borrow: PhantomData,
        }
    }

    /// Views memory the caller owns, for writing, usable on any stream.
    ///
    /// # Safety
    /// - `address` is the start of `len` elements of `T` on CUDA device `ordinal`,
    ///   aligned for `T`;
    /// - the memory stays allocated until every call given the view has finished on
    ///   the device;
    /// - nothing reads or writes it while those calls run, unless ordered before or
    ///   after them (the same stream, or events).
    pub unsafe fn from_raw(address: u64, len: usize, ordinal: usize) -> Self {
        Self {
            address,
            len,
            ordinal,
            binding: Binding::ANY_STREAM,
            _borrow: PhantomData,
        }
    }

    /// A view the runtime made of its own memory, bound to `binding`.
    pub(crate) fn from_parts(address: u64, len: usize, ordinal: usize, binding: Binding) -> Self {
        Self {
            address,
            len,
            ordinal,
            binding,
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
            binding: self.binding,
            _borrow: PhantomData,
        }
    }

    /// Reinterprets the view as bytes.
    pub(crate) fn bytes(self) -> DeviceViewMut<'a, u8> {
        DeviceViewMut {
            address: self.address,
            len: self.len * size_of::<T>(),
            ordinal: self.ordinal,
            binding: self.binding,
            _borrow: PhantomData,
        }
    }
}

fn check_range(tensor: &'static str, len: usize, start: usize, count: usize) -> Result<()> {
    if start > len || count > len - start {
        return Err(MoeError::Shape {
            tensor,
            len,
            expected: format!("a range {start}..{} inside it", start.saturating_add(count)),
        });
    }
    Ok(())
}

/// The row count of `len` elements in rows of `columns`; `tensor` names the view.
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

/// Bytes in a row of `hidden_size` elements of `dtype`; an error when that overflows.
fn row_bytes(hidden_size: usize, dtype: DType) -> Result<usize> {
    crate::size::product(
        "row bytes (hidden_size * dtype size)",
        &[hidden_size, dtype.size_bytes()],
    )
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
        row_bytes(hidden_size, T::DTYPE)?;
        Ok(Self {
            bytes: data.bytes(),
            dtype: T::DTYPE,
            hidden_size,
        })
    }

    /// Views device bytes as rows of `hidden_size` elements of `dtype` (fp8 rows are
    /// bytes).
    pub fn from_bytes(bytes: DeviceView<'a, u8>, dtype: DType, hidden_size: usize) -> Result<Self> {
        whole_rows("rows", bytes.len(), row_bytes(hidden_size, dtype)?)?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    /// Rows the runtime sized itself: `bytes.len()` is a whole number of rows.
    pub(crate) fn from_parts(bytes: DeviceView<'a, u8>, dtype: DType, hidden_size: usize) -> Self {
        Self {
            bytes,
            dtype,
            hidden_size,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `H`, elements in one row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Bytes in one row (checked not to overflow when the view was made).
    pub fn row_bytes(&self) -> usize {
        self.hidden_size * self.dtype.size_bytes()
    }

    /// `R`, the number of rows.
    pub fn num_rows(&self) -> usize {
        self.bytes.len() / self.row_bytes()
    }

    /// The rows as bytes.
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
        let bytes = self.bytes;
        Ok(DeviceView::from_parts(
            bytes.address,
            bytes.len / size_of::<T>(),
            bytes.ordinal,
            bytes.binding,
        ))
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
    /// Views writable `data` as rows of `hidden_size` elements.
    pub fn new<T: Element + DeviceRepr>(
        data: DeviceViewMut<'a, T>,
        hidden_size: usize,
    ) -> Result<Self> {
        whole_rows("rows", data.len(), hidden_size)?;
        row_bytes(hidden_size, T::DTYPE)?;
        Ok(Self {
            bytes: data.bytes(),
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
        whole_rows("rows", bytes.len(), row_bytes(hidden_size, dtype)?)?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `H`, elements in one row.
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
    /// `i32` ids.
    I32(DeviceView<'a, i32>),
    /// `i64` ids.
    I64(DeviceView<'a, i64>),
}

impl<'a> DeviceExpertIds<'a> {
    /// u32 ids (candle's top-k index type) read as i32, without a copy: an id of
    /// `2^31` or more reads as negative and is dropped, as the contract drops any id
    /// outside `0..E`.
    pub fn from_u32(ids: DeviceView<'a, u32>) -> Self {
        DeviceExpertIds::I32(DeviceView {
            address: ids.address,
            len: ids.len,
            ordinal: ids.ordinal,
            binding: ids.binding,
            _borrow: PhantomData,
        })
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            DeviceExpertIds::I32(ids) => ids.len(),
            DeviceExpertIds::I64(ids) => ids.len(),
        }
    }

    /// Whether there are no ids.
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

    pub(crate) fn binding(&self) -> Binding {
        match self {
            DeviceExpertIds::I32(ids) => ids.binding(),
            DeviceExpertIds::I64(ids) => ids.binding(),
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
    /// Views `ids` as `[N, K]` with `K = topk`; fails when `topk` is 0 or `ids` is not
    /// whole tokens.
    pub fn new(ids: DeviceExpertIds<'a>, topk: usize) -> Result<Self> {
        whole_rows("topk_ids", ids.len(), topk)?;
        Ok(Self { ids, topk })
    }

    /// The ids, flat (`N*K`).
    pub fn ids(&self) -> DeviceExpertIds<'a> {
        self.ids
    }

    /// `K`.
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// `N`.
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
    /// Views `data` as rows of `columns` scales; fails when `columns` is 0 or `data`
    /// is not whole rows.
    pub fn new(data: DeviceView<'a, f32>, columns: usize) -> Result<Self> {
        whole_rows("scales", data.len(), columns)?;
        Ok(Self { data, columns })
    }

    pub(crate) fn from_parts(data: DeviceView<'a, f32>, columns: usize) -> Self {
        Self { data, columns }
    }

    /// The scales, flat (`N*S`).
    pub fn data(&self) -> DeviceView<'a, f32> {
        self.data
    }

    /// `S`.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// `N`, the number of rows.
    pub fn num_rows(&self) -> usize {
        self.data.len() / self.columns
    }
}

/// The views one call uses, by name: their devices for the scratch's validation,
/// their streams checked against the call's, and their cudarc events recorded after
/// the call's kernels. Fixed capacity: a call allocates nothing.
#[derive(Debug)]
pub(crate) struct CallViews {
    devices: [(&'static str, Device); Self::CAPACITY],
    bindings: [Binding; Self::CAPACITY],
    len: usize,
}

impl CallViews {
    /// More than any operation's views.
    const CAPACITY: usize = 8;

    pub(crate) fn new() -> Self {
        Self {
            devices: [("", Device::Cpu); Self::CAPACITY],
            bindings: [Binding::ANY_STREAM; Self::CAPACITY],
            len: 0,
        }
    }

    /// Adds view `tensor` (on `device`, bound by `binding`).
    pub(crate) fn with(mut self, tensor: &'static str, device: Device, binding: Binding) -> Self {
        self.devices[self.len] = (tensor, device);
        self.bindings[self.len] = binding;
        self.len += 1;
        self
    }

    /// The views' devices, in order, as [`CallShape::devices`](crate::CallShape).
    pub(crate) fn devices(&self) -> &[(&'static str, Device)] {
        &self.devices[..self.len]
    }

    /// Each view on `device` (named by the first that is not).
    pub(crate) fn check_devices(&self, device: Device) -> Result<()> {
        match self.devices().iter().find(|(_, d)| *d != device) {
            Some(&(tensor, got)) => Err(crate::ScratchMismatch::Device {
                tensor,
                expected: device,
                got,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Each view usable on `stream` (named by the first that is not).
    pub(crate) fn check_streams(&self, stream: &Stream<'_>) -> Result<()> {
        self.devices()
            .iter()
            .zip(&self.bindings)
            .try_for_each(|((tensor, _), binding)| binding.check(tensor, stream))
    }

    /// Records the cudarc events of the views that carry one, after the kernels.
    pub(crate) fn record(&self, stream: &Stream<'_>) -> Result<()> {
        self.bindings[..self.len]
            .iter()
            .try_for_each(|binding| binding.record(stream))
    }
}
