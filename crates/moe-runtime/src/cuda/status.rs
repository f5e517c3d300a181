//! Errors found on the device, returned when the caller chooses to look.
//!
//! Some bad input is only visible in device memory: a malformed `expert_map` entry, a
//! negative `inv_permuted_idx`, a valid count larger than the rows given. The CPU
//! returns an error for each; reading device memory on every call would cost a host
//! wait and forbid graph capture. So the kernels record the first violation in a
//! [`StatusBlock`] (the scratch's own, or a [`StatusBuffer`]), keep every access in
//! bounds, and [`DeviceStatus::check`] reads it when the caller decides: it returns
//! the same [`MoeError`] the CPU returns for that input, and clears the block. In
//! checked mode ([`PermuteScratch::set_checked`](crate::PermuteScratch::set_checked),
//! [`StatusBuffer::set_checked`]) every call does that itself, at the cost of a host
//! wait; a call on a stream that is capturing a graph skips it (check after replay).
//!
//! The outputs of a call that recorded an error are unspecified (never out of
//! bounds): dropped entries for a bad map entry or row index, the clamped count for a
//! bad valid count.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

pub use moe_kernels::STATUS_BYTES;
use moe_kernels::{STATUS_CLEAR, StatusBlock, status_op};

/// The byte a clear status block holds in every position: a caller that keeps a
/// block in its own memory ([`DeviceStatus::from_raw`]) fills it with this once.
pub const STATUS_CLEAR_BYTE: u8 = 0xFF;

use super::device::{CudaDevice, Stream, driver_error};
use super::memory::Binding;
use crate::{Device, MoeError, Result, unpermute_check};

/// The operations that record into a status block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusOp {
    Permute,
    Align,
    Unpermute,
}

/// A number per call, so that a status block keeps the first failing call's error
/// even when a later call fails too. Graph replays repeat their recorded number: a
/// block checked after several replays holds the lowest position any of them found.
static CALLS: AtomicU64 = AtomicU64::new(1);

impl StatusOp {
    /// The [`StatusBlock::call`] word of a new call of this operation.
    pub(crate) fn next_call(self) -> u64 {
        let op = match self {
            StatusOp::Permute => status_op::PERMUTE,
            StatusOp::Align => status_op::ALIGN,
            StatusOp::Unpermute => status_op::UNPERMUTE,
        };
        // 56 bits of call number: never `STATUS_CLEAR`, never wraps in practice.
        let call = CALLS.fetch_add(1, Ordering::Relaxed) & ((1 << 56) - 1);
        (call << 8) | op
    }
}

/// A status block in device memory, for the calls of one stream: what a call is
/// given to record into, and what [`Self::check`] reads.
#[derive(Clone, Copy, Debug)]
pub struct DeviceStatus<'a> {
    address: u64,
    ordinal: usize,
    binding: Binding,
    checked: bool,
    _borrow: PhantomData<&'a StatusBlock>,
}

impl DeviceStatus<'_> {
    pub(crate) fn from_parts(
        address: u64,
        ordinal: usize,
        binding: Binding,
        checked: bool,
    ) -> Self {
        Self {
            address,
            ordinal,
            binding,
            checked,
            _borrow: PhantomData,
        }
    }

    /// A status block in memory the caller owns (a PyTorch tensor, say), usable on
    /// any stream.
    ///
    /// # Safety
    /// - `address` is [`STATUS_BYTES`] of device memory on CUDA device `ordinal`,
    ///   8-byte aligned, filled with [`STATUS_CLEAR_BYTE`] before its first use;
    /// - it stays allocated until every call given the block has finished on the
    ///   device;
    /// - the calls that record into it and the checks that read it are ordered by the
    ///   caller (one stream, or events), and nothing else writes it.
    pub unsafe fn from_raw(address: u64, ordinal: usize, checked: bool) -> Self {
        Self::from_parts(address, ordinal, Binding::ANY_STREAM, checked)
    }

    /// The block's device address (what kernels receive).
    pub fn address(&self) -> u64 {
        self.address
    }

    /// The CUDA device the block is on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Whether calls recording here check it themselves (checked mode).
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    pub(crate) fn binding(&self) -> Binding {
        self.binding
    }

    /// Reads the block after the work queued on `stream` (a host wait) and returns
    /// the first error recorded since the last check, as the CPU would have returned
    /// it; clears the block when it held one. An error while `stream` is capturing a
    /// graph, where nothing may wait.
    pub fn check(&self, stream: &Stream<'_>) -> Result<()> {
        self.binding.check("status", stream)?;
        if stream.is_capturing()? {
            return Err(MoeError::Capturing {
                action: "read the device status",
            });
        }
        stream.device().bind_to_thread()?;
        let mut words = [0u64; STATUS_BYTES / 8];
        // SAFETY: the block is `STATUS_BYTES` of device memory borrowed for the
        // view's lifetime; `words` is as long; the copy is ordered on `stream`.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut words, self.address, stream.cu_stream())
        }
        .map_err(driver_error("read the device status"))?;
        stream.synchronize()?;
        let block = StatusBlock::from_words(words);
        if block.call == STATUS_CLEAR {
            return Ok(());
        }
        // SAFETY: as above; the clear is ordered after the calls that recorded.
        unsafe { clear_async(self.address, stream)? };
        Err(decode(&block))
    }

    /// In checked mode, [`Self::check`] after a call, unless `stream` is capturing.
    pub(crate) fn after_call(&self, stream: &Stream<'_>) -> Result<()> {
        if self.checked && !stream.is_capturing()? {
            self.check(stream)?;
        }
        Ok(())
    }
}

/// Clears the status block at `address` (every word [`STATUS_CLEAR`]), queued on
/// `stream`.
///
/// # Safety
/// `address` is `STATUS_BYTES` of device memory of the stream's context, not freed
/// before the clear has run, and used by nothing unordered with `stream`.
pub(crate) unsafe fn clear_async(address: u64, stream: &Stream<'_>) -> Result<()> {
    stream.device().bind_to_thread()?;
    // SAFETY: as the caller guarantees.
    unsafe {
        cudarc::driver::result::memset_d8_async(
            address,
            STATUS_CLEAR_BYTE,
            STATUS_BYTES,
            stream.cu_stream(),
        )
    }
    .map_err(driver_error("clear a status block"))
}

/// The error a recorded block stands for: the same value the CPU returns.
fn decode(block: &StatusBlock) -> MoeError {
    match block.call & 0xff {
        status_op::UNPERMUTE if block.valid_bound != STATUS_CLEAR => {
            let (position, rows) = unpack(block.valid_bound);
            let rows = rows as u32 as usize;
            unpermute_check::valid_count_error(position, block.valid_count as i64, rows)
        }
        status_op::UNPERMUTE => {
            let (position, value) = unpack(block.inv_entry);
            unpermute_check::negative_row_error(position, value)
        }
        _ => {
            let (index, value) = unpack(block.map_entry);
            MoeError::ExpertMapEntry {
                index,
                value,
                num_local_experts: block.map_bound as usize,
            }
        }
    }
}

/// `position << 32 | value as u32`, unpacked.
fn unpack(packed: u64) -> (usize, i32) {
    ((packed >> 32) as usize, packed as u32 as i32)
}

/// A status block of its own, for calls made without a scratch (an unpermute whose
/// routing came from elsewhere). Device memory, allocated once.
#[derive(Debug)]
pub struct StatusBuffer {
    memory: super::owned::DeviceMemory,
    ordinal: usize,
    checked: bool,
}

impl StatusBuffer {
    /// A clear status block on `device` (allocates; not while capturing a graph).
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let memory = super::owned::DeviceMemory::allocate(device, "status block", STATUS_BYTES)?;
        memory.fill_sync(device, 0, STATUS_BYTES, STATUS_CLEAR_BYTE)?;
        Ok(Self {
            memory,
            ordinal: device.ordinal(),
            checked: false,
        })
    }

    /// Checked mode: every call recording here reads it back and returns its error.
    pub fn set_checked(&mut self, checked: bool) {
        self.checked = checked;
    }

    /// The block, for calls on any stream: calls on several streams must be ordered
    /// by the caller for [`DeviceStatus::check`] to see them all.
    pub fn view(&self) -> DeviceStatus<'_> {
        DeviceStatus::from_parts(
            self.memory.address(),
            self.ordinal,
            Binding::ANY_STREAM,
            self.checked,
        )
    }
}
