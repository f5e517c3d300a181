//! Reporting bad input into a [`StatusBlock`]: what the host cannot check without
//! reading device memory, the kernels record for the caller to read later.
//!
//! Reports are rare (bad input only) and every one is a few global atomics, so they
//! cost nothing on the paths that matter.

use core::arch::asm;

use crate::params::{STATUS_CLEAR, StatusBlock};

// The block's words are touched only by the kernels of one GPU while they run (the
// host reads it after a synchronisation), so every access is relaxed and of GPU
// scope: a system-scope atomic (what `core::sync::atomic` compiles to here) would
// make the kernel pay for coherence with the host on the common, error-free path.

/// The address of word `index` of the block at `status`.
#[inline(always)]
fn word(status: u64, index: usize) -> u64 {
    status + 8 * index as u64
}

/// `compare-and-swap` of the word at `address`: `new` where it held `old`; returns
/// what it held.
///
/// # Safety
/// `address` is an 8-byte aligned global address that only atomics touch.
#[inline(always)]
unsafe fn cas(address: u64, old: u64, new: u64) -> u64 {
    let previous: u64;
    // SAFETY: as the caller guarantees.
    unsafe {
        asm!(
            "atom.relaxed.gpu.global.cas.b64 {0}, [{1}], {2}, {3};",
            out(reg64) previous,
            in(reg64) address,
            in(reg64) old,
            in(reg64) new,
        )
    };
    previous
}

/// Atomic minimum of the word at `address` and `value`.
///
/// # Safety
/// As for [`cas`].
#[inline(always)]
unsafe fn min(address: u64, value: u64) {
    // SAFETY: as the caller guarantees.
    unsafe {
        asm!(
            "red.relaxed.gpu.global.min.u64 [{0}], {1};",
            in(reg64) address,
            in(reg64) value,
        )
    };
}

/// Stores `value` to the word at `address`.
///
/// # Safety
/// As for [`cas`].
#[inline(always)]
unsafe fn store(address: u64, value: u64) {
    // SAFETY: as the caller guarantees.
    unsafe {
        asm!(
            "st.relaxed.gpu.global.b64 [{0}], {1};",
            in(reg64) address,
            in(reg64) value,
        )
    };
}

/// Takes the block for `call` unless another call reported first; true when this
/// call owns it (it took it now or earlier).
///
/// # Safety
/// `status` is the address of a [`StatusBlock`].
#[inline(always)]
unsafe fn claim(status: u64, call: u64) -> bool {
    // SAFETY: as the caller guarantees.
    let owner = unsafe { cas(word(status, StatusBlock::CALL), STATUS_CLEAR, call) };
    owner == STATUS_CLEAR || owner == call
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
            min(word(status, StatusBlock::MAP_ENTRY), packed(index, value));
            store(word(status, StatusBlock::MAP_BOUND), num_local as u64);
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
            store(word(status, StatusBlock::VALID_COUNT), value as u64);
            store(
                word(status, StatusBlock::VALID_BOUND),
                packed(position, rows as i32),
            );
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
            min(
                word(status, StatusBlock::INV_ENTRY),
                packed(position, value),
            );
        }
    }
}
