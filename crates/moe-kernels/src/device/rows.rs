//! The row kernels: permute's scatter and unpermute's weighted gather.
//!
//! Both cut each token's row over [`blocks_per_row`] blocks of
//! [`ROW_THREADS`](crate::ROW_THREADS), each thread a few vectors of the row: 16 bytes
//! when every row and base address allows it (`*_v16`), else 4 bytes or 1 byte
//! (permute) or one element (unpermute). Several blocks per token keep even one
//! token's work spread over many multiprocessors.

use super::intrinsics::*;
use super::route::{ExpertId, route_place_with};
use crate::params::{
    PERMUTE_VECTORS_PER_THREAD, PermuteFusedParams, PermuteRowsParams, ROUTE_THREADS,
    UNPERMUTE_VECTORS_PER_THREAD, UnpermuteParams, blocks_per_row,
};

/// Rows whose loads unpermute issues before it sums them, for a large call. Measured
/// on an H200 (`moe bench`, DeepSeek-V3 shape, 16384 tokens): 1 reaches the copy
/// bandwidth (500 us); 2 and 4 use more registers, so fewer warps are resident, and
/// reach only 92% and 82% of it. Occupancy, not per-thread ILP, is what hides the
/// latency there.
pub(crate) const LOADS_LARGE: usize = 1;

/// Rows whose loads unpermute issues before it sums them, for a small call: a top-8
/// token's every row. A small call's grid has too few warps to hide a row read's
/// latency, so the rows must be in flight together, not read one after another.
pub(crate) const LOADS_SMALL: usize = 8;

const _: () = assert!(LOADS_LARGE <= 8 && LOADS_SMALL <= 8);

/// 16 bytes with 16-byte alignment: loads and stores become `ld/st.global.v4`.
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
pub(crate) struct V16(pub(crate) [u32; 4]);

/// The valid row count `expert_offsets[n - 1]`, as stored.
///
/// # Safety
/// `offsets` points to `n >= 1` i64.
#[inline(always)]
unsafe fn valid_count(offsets: u64, n: u32) -> i64 {
    // SAFETY: the caller guarantees `n >= 1` elements.
    unsafe { *(offsets as *const i64).add(n as usize - 1) }
}

/// Copies this block's share of source row `t` to rows `inv[t*K + k]` that are valid,
/// reading it once; the token's first block also copies its scales.
///
/// # Safety
/// Launched with `N * blocks_per_row(row vectors, PERMUTE_VECTORS_PER_THREAD, N)` blocks
/// of `ROW_THREADS`; `V` divides `row_bytes` and the rows' alignment; buffers sized by
/// the host for this call.
#[inline(always)]
pub(crate) unsafe fn permute_rows<V: Copy + Default>(p: &PermuteRowsParams) {
    const UNROLL: usize = PERMUTE_VECTORS_PER_THREAD as usize;
    let topk = p.dims.topk;
    let entries = p.dims.num_entries();
    let row_bytes = p.layout.row_bytes as usize;
    let vectors = (row_bytes / size_of::<V>()) as u32;
    let parts = blocks_per_row(vectors, PERMUTE_VECTORS_PER_THREAD, p.dims.num_tokens);
    let token = block() / parts;
    let stride = parts * ROW_THREADS_U * UNROLL as u32;
    // SAFETY: `token < N`, `k < K`, vectors within the row, rows below the valid count
    // which is clamped to the `N*K` rows of the destination.
    unsafe {
        // Written by this call's routing, so within `0..=N*K`; clamped all the same.
        let valid = valid_count(p.expert_offsets, p.dims.num_local_experts + 1)
            .clamp(0, entries as i64) as u32;
        let inv = (p.inv_permuted_idx as *const i32).add((token * topk) as usize);
        let src = (p.hidden_states as *const u8).add(token as usize * row_bytes) as *const V;
        let mut first = (block() % parts) * ROW_THREADS_U * UNROLL as u32 + thread();
        while first < vectors {
            let mut x = [V::default(); UNROLL];
            for (j, x) in x.iter_mut().enumerate() {
                let v = first + j as u32 * ROW_THREADS_U;
                if v < vectors {
                    *x = *src.add(v as usize);
                }
            }
            for k in 0..topk {
                let row = *inv.add(k as usize) as u32;
                if row < valid {
                    let dst = (p.permuted_hidden_states as *mut u8).add(row as usize * row_bytes)
                        as *mut V;
                    for (j, x) in x.iter().enumerate() {
                        let v = first + j as u32 * ROW_THREADS_U;
                        if v < vectors {
                            *dst.add(v as usize) = *x;
                        }
                    }
                }
            }
            first += stride;
        }
        // The token's scales travel with it, copied by its first block.
        let columns = p.layout.scale_columns;
        if block() % parts == 0 {
            let mut s = thread();
            while s < columns {
                let scale = *(p.scales as *const f32).add((token * columns + s) as usize);
                for k in 0..topk {
                    let row = *inv.add(k as usize) as u32;
                    if row < valid {
                        *(p.permuted_scales as *mut f32).add((row * columns + s) as usize) = scale;
                    }
                }
                s += ROW_THREADS_U;
            }
        }
    }
}

/// permute of a small call in one launch (see [`PermuteFusedParams`]): every block
/// routes all `N*K` entries in shared memory (block 0 also writes the index outputs),
/// then block `f` copies the source row of entry `f` to the entry's row, with its
/// scales. One launch instead of the routing's and the scatter's: at small batch a
/// permute is launch-bound, and a block routes a few hundred entries in well under a
/// launch's time.
///
/// # Safety
/// Launched with `max(1, N*K)` blocks of [`ROUTE_THREADS`], `N*K <=
/// FUSED_MAX_ENTRIES`; rows a multiple of 16 bytes at 16-byte aligned addresses;
/// buffers sized by the host for this call.
#[inline(always)]
pub(crate) unsafe fn permute_fused<I: ExpertId>(p: &PermuteFusedParams) {
    let r = &p.rows;
    let f = block();
    let entry = f < r.dims.num_entries();
    let row_bytes = r.layout.row_bytes as usize;
    let vectors = (row_bytes / size_of::<V16>()) as u32;
    let token = if entry { f / r.dims.topk } else { 0 };
    let src = (r.hidden_states as *const u8).wrapping_add(token as usize * row_bytes) as *const V16;
    // The source row does not depend on the routing: its first `FUSED_PREFETCH`
    // vectors a thread (16 KiB a row, every model's row) are read before routing, so
    // that their memory latency overlaps the routing instead of following it.
    let mut head = [V16::default(); FUSED_PREFETCH];
    for (j, x) in head.iter_mut().enumerate() {
        let v = thread() + j as u32 * ROUTE_THREADS;
        if entry && v < vectors {
            // SAFETY: `token < N` for an entry; `v` within the row, 16-byte aligned.
            *x = unsafe { *src.add(v as usize) };
        }
    }
    let shared_inv = fused_inv_shared();
    // SAFETY: one chunk of `N*K <= FUSED_MAX_ENTRIES` entries, which `shared_inv`
    // holds; the routing buffers as the caller guarantees.
    let outputs = (block() == 0, block() == 0);
    let valid = unsafe { route_place_with::<I, false>(&p.route, 0, outputs, false, shared_inv) };
    sync_threads();
    if !entry {
        return;
    }
    // SAFETY: `f < N*K` entries in shared memory; a row below the valid count is one
    // of the destination's `N*K` rows; vectors within the row (16-byte aligned, as
    // the caller guarantees); scales within `[N, S]` and `[N*K, S]`.
    unsafe {
        let row = *shared_inv.add(f as usize) as u32;
        if row >= valid {
            return;
        }
        let dst = (r.permuted_hidden_states as *mut u8).add(row as usize * row_bytes) as *mut V16;
        for (j, x) in head.iter().enumerate() {
            let v = thread() + j as u32 * ROUTE_THREADS;
            if v < vectors {
                *dst.add(v as usize) = *x;
            }
        }
        let mut v = thread() + FUSED_PREFETCH as u32 * ROUTE_THREADS;
        while v < vectors {
            *dst.add(v as usize) = *src.add(v as usize);
            v += ROUTE_THREADS;
        }
        let columns = r.layout.scale_columns;
        let mut s = thread();
        while s < columns {
            *(r.permuted_scales as *mut f32).add((row * columns + s) as usize) =
                *(r.scales as *const f32).add((token * columns + s) as usize);
            s += ROUTE_THREADS;
        }
    }
}

/// Vectors a thread of [`permute_fused`] reads before routing: with [`ROUTE_THREADS`]
/// threads, rows up to 16 KiB are read whole.
const FUSED_PREFETCH: usize = 2;

const ROW_THREADS_U: u32 = crate::params::ROW_THREADS;

/// An element type unpermute sums in f32: its bits, widened and narrowed.
pub(crate) trait Float: Copy + Default {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub(crate) struct F32(u32);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub(crate) struct F16(u16);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub(crate) struct BF16(u16);

impl Float for F32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(self.0)
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        Self(value.to_bits())
    }
}

impl Float for F16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        Self(f32_to_f16(value))
    }
}

impl Float for BF16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        Self(f32_to_bf16(value))
    }
}

/// `N` elements, 16-byte aligned when `N * size_of::<T>() == 16`.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Packet<T, const N: usize>([T; N]);

/// Loads `N` elements at `ptr`: as one 16-byte vector when `VEC`, else one by one.
///
/// # Safety
/// `ptr` points to `N` elements, 16-byte aligned when `VEC`.
#[inline(always)]
unsafe fn load<T: Copy + Default, const N: usize, const VEC: bool>(ptr: *const T) -> [T; N] {
    // SAFETY: the caller guarantees the elements and the alignment.
    unsafe {
        if VEC {
            (*(ptr as *const Packet<T, N>)).0
        } else {
            let mut out = [T::default(); N];
            for j in 0..N {
                out[j] = *ptr.add(j);
            }
            out
        }
    }
}

/// Stores `N` elements at `ptr`, like [`load`].
///
/// # Safety
/// As for [`load`].
#[inline(always)]
unsafe fn store<T: Copy, const N: usize, const VEC: bool>(ptr: *mut T, value: [T; N]) {
    // SAFETY: the caller guarantees the elements and the alignment.
    unsafe {
        if VEC {
            *(ptr as *mut Packet<T, N>) = Packet(value);
        } else {
            for j in 0..N {
                *ptr.add(j) = value[j];
            }
        }
    }
}

/// `out[t] = sum over kept k of w[t,k] * permuted[inv[t*K+k]]` for this thread's `N`
/// elements of token `t`: f32 accumulation in ascending `k` (a multiply and an add,
/// each rounded, as on the CPU), one rounding to `T`, one write per element. `LOADS`
/// rows are read at once: their indices and weights first, then every row, then the
/// sum, so that the row reads overlap ([`LOADS_LARGE`], [`LOADS_SMALL`]).
///
/// Bad input the host could not see is reported to the call's status block, as the
/// CPU reports it: a valid count outside `0..=rows` (block 0), a negative row index
/// (the token's first block). The sum itself stays in bounds whatever the input: the
/// count is clamped to the rows given and a negative index counts as dropped.
///
/// # Safety
/// Launched with `tokens * blocks_per_row(H / N, UNPERMUTE_VECTORS_PER_THREAD, tokens)`
/// blocks of `ROW_THREADS`; `N` divides `H`; 16-byte alignment of every row when
/// `VEC`; buffers sized by the host for this call.
#[inline(always)]
pub(crate) unsafe fn unpermute<T: Float, const N: usize, const VEC: bool, const LOADS: usize>(
    p: &UnpermuteParams,
) {
    let topk = p.topk as usize;
    let hidden = p.hidden_size as usize;
    let vectors = (hidden / N) as u32;
    let parts = blocks_per_row(vectors, UNPERMUTE_VECTORS_PER_THREAD, p.num_tokens);
    let token = block() / parts;
    // SAFETY: `token < N`, `k < K`, rows below the valid count clamped to the rows
    // given, elements within the row.
    unsafe {
        let stored = valid_count(p.expert_offsets, p.num_offsets);
        if stored < 0 || stored > p.num_rows as i64 {
            if block() == 0 && thread() == 0 {
                let position = p.num_offsets - 1;
                super::status::valid_count(p.status, p.call, position, stored, p.num_rows);
            }
        }
        let valid = stored.clamp(0, p.num_rows as i64) as u32;
        let inv = (p.inv_permuted_idx as *const i32).add(token as usize * topk);
        // Every thread reads all `K` row indices of its token in its first pass; the
        // first thread of the token's first block reports the negative ones, from the
        // registers the sum loads them into (a separate pass would add a load's
        // latency to every token).
        let reporter = block() % parts == 0 && thread() == 0;
        let weights = (p.topk_weights as *const f32).add(token as usize * topk);
        let permuted = p.permuted_hidden_states as *const T;
        let mut v = (block() % parts) * ROW_THREADS_U + thread();
        while v < vectors {
            let column = v as usize * N;
            // Constant indices only: the arrays stay in registers (no local memory).
            let mut acc = [0.0f32; N];
            let mut k = 0;
            while k < topk {
                // A negative index becomes a row past every valid one: dropped.
                let mut rows = [u32::MAX; LOADS];
                let mut w = [0.0f32; LOADS];
                unroll_8!(j => if j < LOADS && k + j < topk {
                    rows[j] = *inv.add(k + j) as u32;
                    w[j] = *weights.add(k + j);
                });
                if reporter {
                    unroll_8!(j => if j < LOADS && k + j < topk && (rows[j] as i32) < 0 {
                        let position = token * p.topk + (k + j) as u32;
                        super::status::inv_entry(p.status, p.call, position, rows[j] as i32);
                    });
                }
                let mut x = [[T::default(); N]; LOADS];
                unroll_8!(j => if j < LOADS && rows[j] < valid {
                    x[j] = load::<T, N, VEC>(permuted.add(rows[j] as usize * hidden + column));
                });
                unroll_8!(j => if j < LOADS && rows[j] < valid {
                    for e in 0..N {
                        acc[e] += w[j] * x[j][e].widen();
                    }
                });
                k += LOADS;
            }
            let mut narrow = [T::default(); N];
            for e in 0..N {
                narrow[e] = T::narrow(acc[e]);
            }
            let out = (p.output as *mut T).add(token as usize * hidden + column);
            store::<T, N, VEC>(out, narrow);
            v += parts * ROW_THREADS_U;
        }
    }
}
