//! Reporting bad input into a [`StatusBlock`]: what the host cannot check without
//! reading device memory, the kernels record for the caller to read later.
//!
//! Reports are rare (bad input only) and every one is a few global atomics, so they
//! cost nothing on the paths that matter.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::params::{STATUS_CLEAR, StatusBlock};

/// The status word `index` of the block at `status`.
///
/// # Safety
/// `status` is the address of a [`StatusBlock`]; `index` one of its word indices.
#[inline(always)]
unsafe fn word<'a>(status: u64, index: usize) -> &'a AtomicU64 {
    // SAFETY: the caller guarantees the block; its words are 8-byte aligned u64 that
    // only atomics touch while kernels run.
    unsafe { AtomicU64::from_ptr((status as *mut u64).add(index)) }
}

/// Takes the block for `call` unless another call reported first; true when this
/// call owns it (it took it now or earlier).
///
/// # Safety
/// As for [`word`].
#[inline(always)]
unsafe fn claim(status: u64, call: u64) -> bool {
    // SAFETY: as the caller guarantees.
    let owner = unsafe { word(status, StatusBlock::CALL) };
    match owner.compare_exchange(STATUS_CLEAR, call, Relaxed, Relaxed) {
        Ok(_) => true,
        Err(current) => current == call,
    }
}

/// `position << 32 | value as u32`: ordered by position first, so an atomic minimum
/// keeps the lowest position together with its own value.
#[inline(always)]
fn packed(position: u32, value: i32) -> u64 {
    ((position as u64) << 32) | value as u32 as u64
}

/// `expert_map[index] = value` is outside `-1..num_local`.
///
/// # Safety
/// `status` is the address of a [`StatusBlock`].
#[inline(always)]
pub(crate) unsafe fn map_entry(status: u64, call: u64, index: u32, value: i32, num_local: u32) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if claim(status, call) {
            word(status, StatusBlock::MAP_ENTRY).fetch_min(packed(index, value), Relaxed);
            word(status, StatusBlock::MAP_BOUND).store(num_local as u64, Relaxed);
        }
    }
}

/// The valid count `expert_offsets[position] = value` is negative or above `rows`.
///
/// # Safety
/// `status` is the address of a [`StatusBlock`].
#[inline(always)]
pub(crate) unsafe fn valid_count(status: u64, call: u64, position: u32, value: i64, rows: u32) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if claim(status, call) {
            word(status, StatusBlock::VALID_COUNT).store(value as u64, Relaxed);
            word(status, StatusBlock::VALID_BOUND).store(packed(position, rows as i32), Relaxed);
        }
    }
}

/// `inv_permuted_idx[position] = value` is negative.
///
/// # Safety
/// `status` is the address of a [`StatusBlock`].
#[inline(always)]
pub(crate) unsafe fn inv_entry(status: u64, call: u64, position: u32, value: i32) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if claim(status, call) {
            word(status, StatusBlock::INV_ENTRY).fetch_min(packed(position, value), Relaxed);
        }
    }
}
