//! Thin wrappers over the PTX instructions the kernels use.
//!
//! Everything here is `#[inline(always)]` and compiles to one or a few instructions;
//! the wrappers exist so that kernel code reads as the algorithm, not as `asm!`.

use core::arch::{asm, nvptx};

/// Thread index in the block (x dimension).
#[inline(always)]
pub(crate) fn thread() -> u32 {
    // SAFETY: reads the %tid.x special register.
    unsafe { nvptx::_thread_idx_x() as u32 }
}

/// Block index in the grid (x dimension).
#[inline(always)]
pub(crate) fn block() -> u32 {
    // SAFETY: reads the %ctaid.x special register.
    unsafe { nvptx::_block_idx_x() as u32 }
}

#[inline(always)]
pub(crate) fn lane() -> u32 {
    thread() & 31
}

#[inline(always)]
pub(crate) fn warp() -> u32 {
    thread() >> 5
}

/// Waits until the grids this one depends on have completed and their memory is
/// visible, then lets the grid queued after this one be scheduled (programmatic
/// dependent launch). The Hopper module runs it first thing in every kernel, so a
/// kernel launched with programmatic serialization never reads what its predecessor
/// has not finished writing, while its launch overlaps the predecessor's end.
#[cfg(moe_sm90)]
#[inline(always)]
pub(crate) fn wait_for_prior_grids() {
    // SAFETY: both instructions only order this grid against its neighbours in the
    // stream; without a programmatic dependency they return at once (sm_90+).
    unsafe { asm!("griddepcontrol.wait;", "griddepcontrol.launch_dependents;") }
}

/// Block-wide barrier; also orders the block's shared and global memory accesses.
#[inline(always)]
pub(crate) fn sync_threads() {
    // SAFETY: every kernel calls this from control flow uniform across its block.
    unsafe { nvptx::_syncthreads() }
}

/// Warp-wide barrier; orders the warp's memory accesses.
#[inline(always)]
pub(crate) fn sync_warp() {
    // SAFETY: called with all 32 lanes converged (full mask).
    unsafe { asm!("bar.warp.sync -1;") }
}

/// The lanes of the warp whose `value` equals this lane's.
#[inline(always)]
pub(crate) fn match_any(value: u32) -> u32 {
    let peers: u32;
    // SAFETY: called with all 32 lanes converged (full mask).
    unsafe { asm!("match.any.sync.b32 {0}, {1}, -1;", out(reg32) peers, in(reg32) value) };
    peers
}

/// Bit mask of the lanes below this one.
#[inline(always)]
pub(crate) fn lanemask_lt() -> u32 {
    let mask: u32;
    // SAFETY: reads the %lanemask_lt special register.
    unsafe { asm!("mov.u32 {0}, %lanemask_lt;", out(reg32) mask) };
    mask
}

/// `value` of the lane `delta` below, or this lane's own below lane `delta`.
#[inline(always)]
pub(crate) fn shfl_up(value: u32, delta: u32) -> u32 {
    let out: u32;
    // SAFETY: called with all 32 lanes converged (full mask).
    unsafe {
        asm!(
            "shfl.sync.up.b32 {0}, {1}, {2}, 0, -1;",
            out(reg32) out,
            in(reg32) value,
            in(reg32) delta,
        )
    };
    out
}

/// Inclusive prefix sum over the lanes of a warp.
#[inline(always)]
pub(crate) fn warp_inclusive_sum(value: u32) -> u32 {
    let mut sum = value;
    let mut delta = 1;
    while delta < 32 {
        let below = shfl_up(sum, delta);
        if lane() >= delta {
            sum += below;
        }
        delta *= 2;
    }
    sum
}

/// f32 to bf16 bits, round to nearest even.
#[inline(always)]
pub(crate) fn f32_to_bf16(value: f32) -> u16 {
    let bits: u16;
    // SAFETY: a pure conversion instruction (sm_80+).
    unsafe { asm!("cvt.rn.bf16.f32 {0}, {1};", out(reg16) bits, in(reg32) value) };
    bits
}

/// f32 to f16 bits, round to nearest even.
#[inline(always)]
pub(crate) fn f32_to_f16(value: f32) -> u16 {
    let bits: u16;
    // SAFETY: a pure conversion instruction.
    unsafe { asm!("cvt.rn.f16.f32 {0}, {1};", out(reg16) bits, in(reg32) value) };
    bits
}

/// f16 bits to f32 (exact).
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let value: f32;
    // SAFETY: a pure conversion instruction.
    unsafe { asm!("cvt.f32.f16 {0}, {1};", out(reg32) value, in(reg16) bits) };
    value
}

// Static shared memory of the routing kernels (layout in `route.rs`). Declared once for
// the module; ptxas gives it only to the kernels that reference it.
core::arch::global_asm!(".shared .align 16 .b8 MOE_ROUTE_SMEM[36992];");

/// Generic address of the routing kernels' shared memory.
#[inline(always)]
pub(crate) fn route_shared() -> *mut u8 {
    let base: *mut u8;
    // SAFETY: converts the address of a shared variable of this module to a generic one.
    unsafe { asm!("cvta.shared.u64 {0}, MOE_ROUTE_SMEM;", out(reg64) base) };
    base
}

// The fused small permute's row of each entry (`FUSED_MAX_ENTRIES` i32).
core::arch::global_asm!(".shared .align 16 .b8 MOE_FUSED_INV[512];");
const _: () = assert!(crate::params::FUSED_MAX_ENTRIES as usize * size_of::<i32>() == 512);

/// Generic address of the fused small permute's per-entry rows in shared memory.
#[inline(always)]
pub(crate) fn fused_inv_shared() -> *mut i32 {
    let base: u64;
    // SAFETY: converts the address of a shared variable of this module to a generic one.
    unsafe { asm!("cvta.shared.u64 {0}, MOE_FUSED_INV;", out(reg64) base) };
    base as *mut i32
}
