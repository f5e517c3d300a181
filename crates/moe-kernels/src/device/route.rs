//! The routing kernels: a stable counting sort of the `N*K` entries by local expert.
//!
//! One block sorts a chunk of [`ROUTE_CHUNK`] entries with its 16 warps, each warp a
//! contiguous segment of the chunk. A warp counts its segment per expert with
//! `match.any` (lanes with the same expert add their count once, so no atomics), a
//! scan over `(expert, warp)` gives each warp its first row per expert, and the warp
//! walks its segment again to place each entry at `first row + rank among equal
//! lanes below it`. Segments and chunks are ordered by entry, so the order inside an
//! expert is ascending entry: the same stable order as the CPU reference.
//!
//! - `N*K <= ROUTE_CHUNK`: `route_place_*` alone, one block, computes the expert
//!   offsets itself (one launch).
//! - larger: `route_count_*` (a block per chunk counts per expert), `route_scan` (one
//!   block turns the counts into each chunk's first row per expert and the offsets),
//!   then `route_place_*` (a block per chunk).
//!
//! The same kernels serve `align` (`*_align_*`): offsets padded to the block size,
//! entries written to `sorted_ids` instead of the permutation.
//!
//! Shared memory (`MOE_ROUTE_SMEM`, 36992 bytes): per-warp 16-bit counters
//! `[ROUTE_WARPS][MAX_LOCAL_EXPERTS]` at 0, a u32 per expert at 32768, and 32 u32 of
//! scan scratch at 36864.

use super::intrinsics::*;
use crate::params::{MAX_LOCAL_EXPERTS, ROUTE_THREADS, ROUTE_WARPS, RouteParams};

const WARP_COUNTS: usize = 0;
const EXPERT_WORDS: usize = 32768;
const SCAN_WORDS: usize = 36864;
/// Local expert value of lanes past the end of their segment: never a real expert.
const NO_ENTRY: u32 = u32::MAX;

/// Per-warp 16-bit counters; warp `w`'s counter of expert `e` is at `w * MAX + e`.
#[inline(always)]
fn warp_counts() -> *mut u16 {
    route_shared().wrapping_add(WARP_COUNTS).cast()
}

/// One u32 per local expert.
#[inline(always)]
fn expert_words() -> *mut u32 {
    route_shared().wrapping_add(EXPERT_WORDS).cast()
}

#[inline(always)]
fn scan_words() -> *mut u32 {
    route_shared().wrapping_add(SCAN_WORDS).cast()
}

/// An integer type of `topk_ids`.
pub(crate) trait ExpertId: Copy {
    /// The id of entry `f`, widened.
    ///
    /// # Safety
    /// `ids` points to at least `f + 1` ids.
    unsafe fn load(ids: u64, f: u32) -> i64;
}

impl ExpertId for i32 {
    #[inline(always)]
    unsafe fn load(ids: u64, f: u32) -> i64 {
        // SAFETY: the caller guarantees `f` is in bounds.
        unsafe { *(ids as *const i32).add(f as usize) as i64 }
    }
}

impl ExpertId for i64 {
    #[inline(always)]
    unsafe fn load(ids: u64, f: u32) -> i64 {
        // SAFETY: the caller guarantees `f` is in bounds.
        unsafe { *(ids as *const i64).add(f as usize) }
    }
}

/// The local expert of entry `f`, or `L` when the entry is dropped. A map entry
/// outside `-1..L` (a malformed map, reported by [`check_expert_map`]) drops the
/// entry: never an out-of-range group.
///
/// # Safety
/// `f < N*K`; `topk_ids` holds `N*K` ids and `expert_map`, when not 0, `E` entries.
#[inline(always)]
unsafe fn local_expert<I: ExpertId>(p: &RouteParams, f: u32) -> u32 {
    let local = p.dims.num_local_experts;
    // SAFETY: the caller guarantees `f` is in bounds.
    let id = unsafe { I::load(p.topk_ids, f) };
    if id < 0 || id >= p.dims.num_experts as i64 {
        return local;
    }
    let mapped = if p.expert_map == 0 {
        id as i32
    } else {
        // SAFETY: `0 <= id < E` and the map holds `E` entries.
        unsafe { *(p.expert_map as *const i32).add(id as usize) }
    };
    if mapped >= 0 && (mapped as u32) < local {
        mapped as u32
    } else {
        local
    }
}

/// Reports the malformed entries of `expert_map` (outside `-1..L`) into the call's
/// status block: the whole map, as the CPU checks it, whichever ids the call holds.
/// Run by the one block of a call's single-block kernel (`route_place` alone, or
/// `route_scan`); every thread takes a stride of the map.
///
/// # Safety
/// `expert_map`, when not 0, holds `E` entries; `status` is a status block.
#[inline(always)]
unsafe fn check_expert_map(p: &RouteParams) {
    if p.expert_map == 0 {
        return;
    }
    let local = p.dims.num_local_experts as i32;
    let map = p.expert_map as *const i32;
    let mut index = thread();
    while index < p.dims.num_experts {
        // SAFETY: `index < E`, the map's length; the status block as guaranteed.
        unsafe {
            let value = *map.add(index as usize);
            if value < -1 || value >= local {
                super::status::map_entry(p.status, p.call, index, value, local as u32);
            }
        }
        index += ROUTE_THREADS;
    }
}

/// Exclusive prefix sum over the local experts of `value(e)` rounded up to
/// `block_size`, computed by the whole block (each thread owns two consecutive
/// experts); calls `put(e, first_row)` and returns the total. Every thread of the
/// block must call it.
#[inline(always)]
fn scan_experts(
    local: u32,
    block_size: u32,
    value: impl Fn(u32) -> u32,
    mut put: impl FnMut(u32, u32),
) -> u32 {
    const ITEMS: u32 = MAX_LOCAL_EXPERTS / ROUTE_THREADS;
    let first = thread() * ITEMS;
    let mut items = [0u32; ITEMS as usize];
    let mut sum = 0;
    for (i, item) in items.iter_mut().enumerate() {
        let expert = first + i as u32;
        if expert < local {
            *item = value(expert).div_ceil(block_size) * block_size;
        }
        sum += *item;
    }
    let inclusive = warp_inclusive_sum(sum);
    let scan = scan_words();
    // SAFETY: `scan` has 32 words; warps and lanes index below 32.
    unsafe {
        if lane() == 31 {
            *scan.add(warp() as usize) = inclusive;
        }
        sync_threads();
        if warp() == 0 {
            let own = if lane() < ROUTE_WARPS {
                *scan.add(lane() as usize)
            } else {
                0
            };
            let warps_inclusive = warp_inclusive_sum(own);
            sync_warp();
            if lane() < ROUTE_WARPS {
                *scan.add(lane() as usize) = warps_inclusive - own;
            }
            if lane() == ROUTE_WARPS - 1 {
                *scan.add(ROUTE_WARPS as usize) = warps_inclusive;
            }
        }
        sync_threads();
        let mut row = *scan.add(warp() as usize) + inclusive - sum;
        for (i, item) in items.iter().enumerate() {
            let expert = first + i as u32;
            if expert < local {
                put(expert, row);
            }
            row += *item;
        }
        let total = *scan.add(ROUTE_WARPS as usize);
        sync_threads();
        total
    }
}

/// align: the local expert of every block of `sorted_ids`, -1 past the padded rows.
/// `first_rows` holds each expert's first padded row; the whole block calls this.
///
/// # Safety
/// The align buffers of `p` are sized for this call.
#[inline(always)]
unsafe fn write_block_expert_ids(p: &RouteParams, first_rows: *const u32, total: u32) {
    let local = p.dims.num_local_experts;
    let block_size = p.align.block_size;
    let num_blocks = p.align.max_padded_rows.div_ceil(block_size);
    let ids = p.block_expert_ids as *mut i32;
    // SAFETY: blocks and experts are within the sizes the caller guarantees.
    unsafe {
        let mut b = total / block_size + thread();
        while b < num_blocks {
            *ids.add(b as usize) = -1;
            b += ROUTE_THREADS;
        }
        let mut expert = thread();
        while expert < local {
            let end = if expert + 1 < local {
                *first_rows.add(expert as usize + 1)
            } else {
                total
            };
            let mut b = *first_rows.add(expert as usize) / block_size;
            while b < end / block_size {
                *ids.add(b as usize) = expert as i32;
                b += 1;
            }
            expert += ROUTE_THREADS;
        }
        if thread() == 0 {
            *(p.num_rows_post_padded as *mut i32) = total as i32;
        }
    }
}

/// Counts each chunk's entries per local expert into `chunk_counts[chunk][expert]`.
/// For align it also fills `sorted_ids` with the sentinel `N*K` (grid-stride), ahead
/// of `route_place`.
///
/// # Safety
/// Launched with `num_chunks` blocks of [`ROUTE_THREADS`], buffers sized by the host.
#[inline(always)]
pub(crate) unsafe fn route_count<I: ExpertId, const ALIGN: bool>(p: &RouteParams) {
    let local = p.dims.num_local_experts;
    let entries = p.dims.num_entries();
    let counts = expert_words();
    let first = block() * p.chunk_entries;
    let end = entries.min(first + p.chunk_entries);
    // SAFETY: experts < L <= MAX_LOCAL_EXPERTS words of shared memory; entries and
    // chunk rows are within the buffers the host sized for this call.
    unsafe {
        let mut expert = thread();
        while expert < local {
            *counts.add(expert as usize) = 0;
            expert += ROUTE_THREADS;
        }
        sync_threads();
        let mut f = first + thread();
        while f < end {
            let expert = local_expert::<I>(p, f);
            if expert < local {
                core::sync::atomic::AtomicU32::from_ptr(counts.add(expert as usize))
                    .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            }
            f += ROUTE_THREADS;
        }
        if ALIGN {
            let sorted = p.sorted_ids as *mut i32;
            let mut i = block() * ROUTE_THREADS + thread();
            while i < p.align.max_padded_rows {
                *sorted.add(i as usize) = entries as i32;
                i += p.num_chunks * ROUTE_THREADS;
            }
        }
        sync_threads();
        let out = (p.chunk_counts as *mut u32).add((block() * local) as usize);
        let mut expert = thread();
        while expert < local {
            *out.add(expert as usize) = *counts.add(expert as usize);
            expert += ROUTE_THREADS;
        }
    }
}

/// One block: turns `chunk_counts` into each chunk's first row per expert, in place,
/// and writes `expert_offsets` (and for align the block experts and the padded count).
///
/// # Safety
/// Launched with one block of [`ROUTE_THREADS`] after `route_count`.
#[inline(always)]
pub(crate) unsafe fn route_scan(p: &RouteParams, align: bool) {
    let local = p.dims.num_local_experts;
    let chunks = p.num_chunks;
    let counts = p.chunk_counts as *mut u32;
    let offsets = p.expert_offsets as *mut i64;
    let first_rows = expert_words();
    // SAFETY: `chunk_counts` is `[num_chunks, L]`, `expert_offsets` `[L + 1]`, shared
    // memory has a word per expert; the map and status block as the host sized them.
    unsafe {
        check_expert_map(p);
        // An expert's counts are read `COUNTS_IN_FLIGHT` chunks at a time, all loads in
        // flight before the first is used: one after another, 128 chunks were 128
        // memory latencies in a row (48 us of a DeepSeek-V3 permute of 16384 tokens).
        let mut expert = thread();
        while expert < local {
            let mut running = 0;
            let mut chunk = 0;
            while chunk < chunks {
                let at = |j: usize| counts.add(((chunk + j as u32) * local + expert) as usize);
                let mut n = [0u32; COUNTS_IN_FLIGHT];
                unroll_16!(j => if chunk + (j as u32) < chunks {
                    n[j] = *at(j);
                });
                unroll_16!(j => if chunk + (j as u32) < chunks {
                    *at(j) = running;
                    running += n[j];
                });
                chunk += COUNTS_IN_FLIGHT as u32;
            }
            *first_rows.add(expert as usize) = running;
            expert += ROUTE_THREADS;
        }
        sync_threads();
        let total = scan_experts(
            local,
            p.align.block_size,
            |e| *first_rows.add(e as usize),
            |e, row| {
                *first_rows.add(e as usize) = row;
                *offsets.add(e as usize) = row as i64;
            },
        );
        if thread() == 0 {
            *offsets.add(local as usize) = total as i64;
        }
        let mut expert = thread();
        while expert < local {
            let row = *first_rows.add(expert as usize);
            let mut chunk = 0;
            while chunk < chunks {
                let at = |j: usize| counts.add(((chunk + j as u32) * local + expert) as usize);
                let mut first = [0u32; COUNTS_IN_FLIGHT];
                unroll_16!(j => if chunk + (j as u32) < chunks {
                    first[j] = *at(j);
                });
                unroll_16!(j => if chunk + (j as u32) < chunks {
                    *at(j) = first[j] + row;
                });
                chunk += COUNTS_IN_FLIGHT as u32;
            }
            expert += ROUTE_THREADS;
        }
        if align {
            sync_threads();
            write_block_expert_ids(p, first_rows, total);
        }
    }
}

/// Chunk counts one thread reads before using the first (`route_scan`,
/// [`column_sum`]): 128 chunks are eight rounds of memory latency. 32 took
/// `route_scan` to 139 registers a thread, more than a block of 512 threads may hold.
const COUNTS_IN_FLIGHT: usize = 16;

/// `sum over c < chunks of counts[c * local + expert]`, [`COUNTS_IN_FLIGHT`] loads in
/// flight at a time.
///
/// # Safety
/// `counts` holds `chunks * local` counts and `expert < local`.
#[inline(always)]
unsafe fn column_sum(counts: *const u32, local: u32, expert: u32, chunks: u32) -> u32 {
    let mut total = 0;
    let mut chunk = 0;
    while chunk < chunks {
        let mut n = [0u32; COUNTS_IN_FLIGHT];
        unroll_16!(j => if chunk + (j as u32) < chunks {
            // SAFETY: `chunk + j < chunks` and `expert < local`, as the caller guarantees.
            n[j] = unsafe { *counts.add(((chunk + j as u32) * local + expert) as usize) };
        });
        unroll_16!(j => total += n[j]);
        chunk += COUNTS_IN_FLIGHT as u32;
    }
    total
}

/// Places the entries of one chunk: see the module documentation.
///
/// # Safety
/// Launched with `num_chunks` blocks of [`ROUTE_THREADS`]; when `num_chunks > 1`,
/// after `route_count` and `route_scan`.
#[inline(always)]
pub(crate) unsafe fn route_place<I: ExpertId, const ALIGN: bool>(p: &RouteParams) {
    // SAFETY: as the caller guarantees.
    let outputs = (true, true);
    unsafe { route_place_with::<I, ALIGN>(p, block(), outputs, false, core::ptr::null_mut()) };
}

/// [`route_place`] after `route_count` alone: each block turns the chunks' raw counts
/// into its own first row per expert (the scan `route_scan` would have done, redone
/// by every block: a few thousand counts for the calls this runs), and block 0 writes
/// the expert offsets and checks the map. Permute only; one launch fewer.
///
/// # Safety
/// Launched with `num_chunks` blocks of [`ROUTE_THREADS`] after `route_count`.
#[inline(always)]
pub(crate) unsafe fn route_place_scan<I: ExpertId>(p: &RouteParams) {
    // SAFETY: as the caller guarantees.
    let outputs = (block() == 0, true);
    unsafe { route_place_with::<I, false>(p, block(), outputs, true, core::ptr::null_mut()) };
}

/// [`route_place`] of chunk `chunk`, writing the call-wide outputs (expert offsets, the
/// map check, align's block experts) only when `call_outputs`, the chunk's entries and
/// rows only when `chunk_outputs`, and each entry's row (or `N*K` for a dropped entry)
/// to `shared_inv[f]` too when it is not null: how the fused small permute's blocks
/// each route the one chunk and learn every entry's row while one of them writes the
/// outputs. With `scan` (several
/// chunks, permute), the block scans the chunks' raw counts itself
/// ([`route_place_scan`]). Returns the valid row count.
///
/// # Safety
/// As [`route_place`], with `chunk < num_chunks`; `shared_inv`, when not null, holds
/// `N*K` i32; with `scan`, `chunk_counts` holds `route_count`'s raw counts.
#[inline(always)]
pub(crate) unsafe fn route_place_with<I: ExpertId, const ALIGN: bool>(
    p: &RouteParams,
    chunk: u32,
    (call_outputs, chunk_outputs): (bool, bool),
    scan: bool,
    shared_inv: *mut i32,
) -> u32 {
    let local = p.dims.num_local_experts;
    let entries = p.dims.num_entries();
    let single = p.num_chunks == 1;
    let first = chunk * p.chunk_entries;
    let end = entries.min(first + p.chunk_entries);
    let per_warp = p.chunk_entries.div_ceil(ROUTE_WARPS);
    let segment = first + warp() * per_warp;
    let segment_end = end.min(segment + per_warp);
    let steps = per_warp.div_ceil(32);
    let counts = warp_counts().wrapping_add((warp() * MAX_LOCAL_EXPERTS) as usize);
    let first_rows = expert_words();

    // SAFETY: shared indices are below MAX_LOCAL_EXPERTS per warp; entries below
    // `N*K`; rows below the valid (or padded) count, which the buffers hold.
    unsafe {
        let entry_expert = |step: u32| -> (u32, u32) {
            let f = segment + step * 32 + lane();
            let expert = if f < segment_end {
                local_expert::<I>(p, f)
            } else {
                NO_ENTRY
            };
            (f, expert)
        };

        if (single || scan) && call_outputs {
            check_expert_map(p);
        }
        let mut expert = lane();
        while expert < local {
            *counts.add(expert as usize) = 0;
            expert += 32;
        }
        if ALIGN && single && call_outputs {
            let sorted = p.sorted_ids as *mut i32;
            let mut i = thread();
            while i < p.align.max_padded_rows {
                *sorted.add(i as usize) = entries as i32;
                i += ROUTE_THREADS;
            }
        }
        sync_warp();

        // Count this warp's segment: each group of equal lanes adds once.
        for step in 0..steps {
            let (_, expert) = entry_expert(step);
            let peers = match_any(expert);
            if expert < local && (peers & lanemask_lt()) == 0 {
                *counts.add(expert as usize) += peers.count_ones() as u16;
            }
            sync_warp();
        }
        sync_threads();

        // Per expert: each warp's first rank inside the chunk, and the chunk's total.
        let all_counts = warp_counts();
        let mut expert = thread();
        while expert < local {
            let mut running = 0u16;
            for w in 0..ROUTE_WARPS {
                let count = all_counts.add((w * MAX_LOCAL_EXPERTS + expert) as usize);
                let n = *count;
                *count = running;
                running += n;
            }
            *first_rows.add(expert as usize) = running as u32;
            expert += ROUTE_THREADS;
        }
        sync_threads();

        // The chunk's first row per expert.
        let valid = if single {
            let offsets = p.expert_offsets as *mut i64;
            let total = scan_experts(
                local,
                p.align.block_size,
                |e| *first_rows.add(e as usize),
                |e, row| {
                    *first_rows.add(e as usize) = row;
                    if call_outputs {
                        *offsets.add(e as usize) = row as i64;
                    }
                },
            );
            if call_outputs && thread() == 0 {
                *offsets.add(local as usize) = total as i64;
            }
            if ALIGN && call_outputs {
                write_block_expert_ids(p, first_rows, total);
            }
            total
        } else if scan {
            // Every chunk's counts: their totals give each expert's first row, the
            // chunks before this one its first row inside the expert.
            let counts = p.chunk_counts as *const u32;
            let mut expert = thread();
            while expert < local {
                *first_rows.add(expert as usize) = column_sum(counts, local, expert, p.num_chunks);
                expert += ROUTE_THREADS;
            }
            sync_threads();
            let offsets = p.expert_offsets as *mut i64;
            let total = scan_experts(
                local,
                1,
                |e| *first_rows.add(e as usize),
                |e, row| {
                    *first_rows.add(e as usize) = row;
                    if call_outputs {
                        *offsets.add(e as usize) = row as i64;
                    }
                },
            );
            if call_outputs && thread() == 0 {
                *offsets.add(local as usize) = total as i64;
            }
            let mut expert = thread();
            while expert < local {
                *first_rows.add(expert as usize) += column_sum(counts, local, expert, chunk);
                expert += ROUTE_THREADS;
            }
            total
        } else {
            let chunk_rows = (p.chunk_counts as *const u32).add((chunk * local) as usize);
            let mut expert = thread();
            while expert < local {
                *first_rows.add(expert as usize) = *chunk_rows.add(expert as usize);
                expert += ROUTE_THREADS;
            }
            *(p.expert_offsets as *const i64).add(local as usize) as u32
        };
        sync_threads();

        // Place: row = chunk's first row + warp's first rank + rank among equal lanes.
        let inv = p.inv_permuted_idx as *mut i32;
        let permuted = p.permuted_idx as *mut i32;
        let sorted = p.sorted_ids as *mut i32;
        for step in 0..steps {
            let (f, expert) = entry_expert(step);
            let peers = match_any(expert);
            let rank = (peers & lanemask_lt()).count_ones();
            if expert < local {
                let row =
                    *first_rows.add(expert as usize) + *counts.add(expert as usize) as u32 + rank;
                if !shared_inv.is_null() {
                    *shared_inv.add(f as usize) = row as i32;
                }
                if chunk_outputs && ALIGN {
                    *sorted.add(row as usize) = f as i32;
                } else if chunk_outputs {
                    *inv.add(f as usize) = row as i32;
                    *permuted.add(row as usize) = f as i32;
                }
            } else if expert != NO_ENTRY && !ALIGN {
                if !shared_inv.is_null() {
                    *shared_inv.add(f as usize) = entries as i32;
                }
                if chunk_outputs {
                    *inv.add(f as usize) = entries as i32;
                }
            }
            sync_warp();
            if expert < local && rank == 0 {
                *counts.add(expert as usize) += peers.count_ones() as u16;
            }
            sync_warp();
        }

        // permute: rows of this chunk's range past the valid count hold the sentinel.
        if !ALIGN && chunk_outputs {
            let mut row = first.max(valid) + thread();
            while row < end {
                *permuted.add(row as usize) = entries as i32;
                row += ROUTE_THREADS;
            }
        }
        valid
    }
}
