//! The grouped expert GEMMs on tensor cores (`mma.sync.m16n8k16`, bf16 in, f32
//! accumulation), sm_80 and newer.
//!
//! A block of four warps computes a `GEMM_BM x GEMM_BN` tile: 64 permuted rows of one
//! expert against 128 of its weight rows. Its expert and rows come from
//! `expert_first_token_offset` on the device (warp 0 counts each expert's row tiles
//! and finds the one this block's slot falls in), so no host learns the group sizes.
//!
//! Pipeline: `GEMM_STAGES` stages in dynamic shared memory, each holding a 64x64 tile
//! of rows and a 128x64 tile of weights (each row one 128-byte cache line), filled by
//! `cp.async` (16 bytes a copy, zero-filled past the rows, the weight rows and `K`)
//! `GEMM_STAGES - 1` tiles ahead of the tensor cores. The 16-byte chunks of row `r` are
//! stored at `chunk ^ (r % 8)`, so that the eight rows an `ldmatrix` reads, and the
//! eight chunks a row's copies write, fall in eight different bank groups.
//!
//! Each warp covers all 64 rows and 32 weight rows: four `m16` by four `n8` tiles, 64
//! f32 accumulators a thread. In the plain GEMM warp `w` takes weight rows
//! `32w..32w + 32`; in the gated one it takes gate rows `16w..16w + 16` and the up rows
//! of the same columns (`64 + 16w..`), so a thread holds each output's gate and up
//! values in the same registers' positions and applies SiLU before the store.

use core::arch::asm;

use super::block::exp;
use super::intrinsics::*;
use crate::params::{
    GEMM_BK, GEMM_BM, GEMM_BN, GEMM_SHARED_BYTES, GEMM_STAGES, GemmReduceParams, GroupedGemmParams,
};

/// Bytes of one stage: the row tile, then the weight tile (128-byte rows).
const ROW_BYTES: u32 = GEMM_BK * 2;
const CHUNKS: u32 = ROW_BYTES / 16;
const A_BYTES: u32 = GEMM_BM * ROW_BYTES;
const STAGE_BYTES: u32 = A_BYTES + GEMM_BN * ROW_BYTES;
const _: () = assert!(STAGE_BYTES * GEMM_STAGES == GEMM_SHARED_BYTES && CHUNKS == 8);

// The stages (the launch's dynamic shared memory), and the block's tile as warp 0
// found it (expert, first row, end row).
core::arch::global_asm!(
    ".extern .shared .align 128 .b8 MOE_GEMM_SMEM[];",
    ".shared .align 4 .b32 MOE_GEMM_TILE[3];"
);

/// The shared-window address of the stages.
#[inline(always)]
fn stages() -> u32 {
    let base: u32;
    // SAFETY: the address of the module's dynamic shared memory.
    unsafe { asm!("mov.u32 {0}, MOE_GEMM_SMEM;", out(reg32) base) };
    base
}

/// Generic address of the tile words.
#[inline(always)]
fn tile_words() -> *mut u32 {
    let base: *mut u32;
    // SAFETY: converts the address of a shared variable of this module to a generic one.
    unsafe { asm!("cvta.shared.u64 {0}, MOE_GEMM_TILE;", out(reg64) base) };
    base
}

/// Offset of 16-byte chunk `chunk` of row `row` in a tile of 128-byte rows.
#[inline(always)]
fn swizzled(row: u32, chunk: u32) -> u32 {
    row * ROW_BYTES + ((chunk ^ (row & 7)) << 4)
}

/// Copies 16 bytes from global `src` to shared `dst`, or writes zeros (`bytes` 0).
#[inline(always)]
unsafe fn cp_async_16(dst: u32, src: u64, bytes: u32) {
    // SAFETY: the caller's: `dst` is in the stages, `src` 16 readable bytes when
    // `bytes` is 16 (nothing is read when it is 0).
    unsafe {
        asm!(
            "cp.async.cg.shared.global [{0}], [{1}], 16, {2};",
            in(reg32) dst,
            in(reg64) src,
            in(reg32) bytes,
        )
    }
}

#[inline(always)]
fn cp_async_commit() {
    // SAFETY: groups the thread's outstanding copies.
    unsafe { asm!("cp.async.commit_group;") }
}

/// Waits until at most `GEMM_STAGES - 2` of the thread's copy groups are in flight.
#[inline(always)]
fn cp_async_wait_stage() {
    // SAFETY: waits for the thread's own copies.
    unsafe { asm!("cp.async.wait_group {0};", const GEMM_STAGES - 2) }
}

/// Four 8x8 b16 matrices from shared memory; lane `l` gives the address of row
/// `l % 8` of matrix `l / 8`.
#[inline(always)]
unsafe fn ldmatrix_x4(address: u32) -> [u32; 4] {
    let (r0, r1, r2, r3): (u32, u32, u32, u32);
    // SAFETY: the caller's: `address` is in the stages, 16-byte aligned.
    unsafe {
        asm!(
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{0}, {1}, {2}, {3}}}, [{4}];",
            out(reg32) r0,
            out(reg32) r1,
            out(reg32) r2,
            out(reg32) r3,
            in(reg32) address,
        )
    };
    [r0, r1, r2, r3]
}

/// `acc += a * b` for one 16x8x16 tile (bf16 in, f32 accumulation).
#[inline(always)]
fn mma(acc: &mut [f32; 4], a: &[u32; 4], b0: u32, b1: u32) {
    // SAFETY: a register-only tensor-core instruction, executed by the whole warp
    // (every caller runs it in warp-uniform control flow).
    unsafe {
        asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \
             {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{0}, {1}, {2}, {3}}};",
            inout(reg32) acc[0],
            inout(reg32) acc[1],
            inout(reg32) acc[2],
            inout(reg32) acc[3],
            in(reg32) a[0],
            in(reg32) a[1],
            in(reg32) a[2],
            in(reg32) a[3],
            in(reg32) b0,
            in(reg32) b1,
        )
    }
}

/// `value` of lane `source`.
#[inline(always)]
fn shfl_idx(value: u32, source: u32) -> u32 {
    let out: u32;
    // SAFETY: called with all 32 lanes converged (full mask).
    unsafe {
        asm!(
            "shfl.sync.idx.b32 {0}, {1}, {2}, 31, -1;",
            out(reg32) out,
            in(reg32) value,
            in(reg32) source,
        )
    };
    out
}

/// bf16 bits to f32 (exact).
#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `offsets[e]`, clamped to `0..=max_rows`.
#[inline(always)]
unsafe fn offset(p: &GroupedGemmParams, e: u32) -> u32 {
    // SAFETY: the caller's: `e <= L`, and `offsets` holds `L + 1` values.
    let v = unsafe { *(p.offsets as *const i64).add(e as usize) };
    v.clamp(0, p.max_rows as i64) as u32
}

/// Warp 0: finds the expert and rows of row-tile slot `slot` and writes them to the
/// tile words (expert `u32::MAX` when the slot is past the last tile).
unsafe fn find_tile(p: &GroupedGemmParams, slot: u32) {
    let words = tile_words();
    if lane() == 0 {
        // SAFETY: three words of this module's shared memory.
        unsafe { *words = u32::MAX };
    }
    sync_warp();
    let mut before = 0u32; // tiles of the experts of earlier chunks
    let mut first = 0u32;
    while first < p.num_experts {
        let e = first + lane();
        let (start, end) = if e < p.num_experts {
            // SAFETY: `e < L`: offsets `e` and `e + 1` exist.
            unsafe { (offset(p, e), offset(p, e + 1)) }
        } else {
            (0, 0)
        };
        let rows = end.saturating_sub(start);
        let tiles = rows.div_ceil(GEMM_BM);
        let through = warp_inclusive_sum(tiles);
        let (lo, hi) = (before + through - tiles, before + through);
        if slot >= lo && slot < hi {
            // SAFETY: one lane of warp 0 matches; the words are this module's.
            unsafe {
                *words = e;
                *words.add(1) = start + (slot - lo) * GEMM_BM;
                *words.add(2) = end;
            }
        }
        before += shfl_idx(through, 31);
        first += 32;
    }
}

/// Aligned mode: slot `slot` is rows `64 slot..` of `tile_experts[slot]`, up to the
/// rows align used.
unsafe fn aligned_tile(p: &GroupedGemmParams, slot: u32) {
    let words = tile_words();
    // SAFETY: the caller's: `slot < m_slots` entries of `tile_experts`, one i32 at
    // `rows_used`.
    let (expert, used) = unsafe {
        (
            *(p.tile_experts as *const i32).add(slot as usize),
            *(p.rows_used as *const i32),
        )
    };
    let used = used.clamp(0, p.max_rows as i32) as u32;
    let row0 = slot * GEMM_BM;
    let valid = expert >= 0 && (expert as u32) < p.num_experts && row0 < used;
    // SAFETY: three words of this module's shared memory.
    unsafe {
        *words = if valid { expert as u32 } else { u32::MAX };
        *words.add(1) = row0;
        *words.add(2) = used.min(row0 + GEMM_BM);
    }
}

/// Queues the copies of k-tile `kt` into stage `stage`: the row tile (four chunks a
/// thread) and the weight tile (eight).
#[inline(always)]
unsafe fn load_stage<const GATED: bool>(
    p: &GroupedGemmParams,
    (row0, row_end): (u32, u32),
    (weights, col0): (u64, u32),
    stage: u32,
    kt: u32,
) {
    let base = stages() + stage * STAGE_BYTES;
    let k0 = kt * GEMM_BK;
    let t = thread();
    let mut i = 0;
    while i < GEMM_BM * CHUNKS / 128 {
        let c = t + i * 128;
        let (row, chunk) = (c / CHUNKS, c % CHUNKS);
        let k = k0 + chunk * 8;
        let r = row0 + row;
        // The row of `a`: the tile's row, or in a gather its entry's token.
        let (valid, source_row) = if r >= row_end || k >= p.k {
            (false, 0)
        } else if p.sorted_ids != 0 {
            // SAFETY: `r < row_end <= max_rows`, the length of `sorted_ids`.
            let entry = unsafe { *(p.sorted_ids as *const i32).add(r as usize) } as u32;
            (entry < p.entries, entry / p.topk.max(1))
        } else {
            (true, r)
        };
        let src = if valid {
            p.a + (source_row as u64 * p.k as u64 + k as u64) * 2
        } else {
            p.a
        };
        // SAFETY: inside the stage; `src` is 16 bytes of row `r` when valid.
        unsafe { cp_async_16(base + swizzled(row, chunk), src, if valid { 16 } else { 0 }) };
        i += 1;
    }
    let mut i = 0;
    while i < GEMM_BN * CHUNKS / 128 {
        let c = t + i * 128;
        let (row, chunk) = (c / CHUNKS, c % CHUNKS);
        let k = k0 + chunk * 8;
        // The weight row: plain, column `col0 + row`; gated, the gate row of column
        // `col0 + row` for the first 64 rows, then the up row (`N` rows later).
        let (column, weight_row) = if GATED {
            let column = col0 + (row & 63);
            (column, column + if row >= 64 { p.n } else { 0 })
        } else {
            (col0 + row, col0 + row)
        };
        let valid = column < p.n && k < p.k;
        let src = if valid {
            weights + (weight_row as u64 * p.k as u64 + k as u64) * 2
        } else {
            p.b
        };
        // SAFETY: inside the stage; `src` is 16 bytes of the expert's weights when valid.
        unsafe {
            cp_async_16(
                base + A_BYTES + swizzled(row, chunk),
                src,
                if valid { 16 } else { 0 },
            )
        };
        i += 1;
    }
}

/// The grouped GEMM (see [`GroupedGemmParams`]).
pub(crate) unsafe fn grouped_gemm_bf16<const GATED: bool>(p: &GroupedGemmParams) {
    let split = block() % p.splits;
    let tile_index = block() / p.splits;
    let slot = tile_index % p.m_slots;
    let col_tile = tile_index / p.m_slots;
    if p.tile_experts != 0 {
        if thread() == 0 {
            // SAFETY: `slot < m_slots`, the length of `tile_experts`; one i32 at
            // `rows_used`; the tile words are this module's.
            unsafe { aligned_tile(p, slot) };
        }
    } else if warp() == 0 {
        // SAFETY: reads `L + 1` offsets; writes the tile words.
        unsafe { find_tile(p, slot) };
    }
    sync_threads();
    let words = tile_words();
    // SAFETY: written by warp 0 before the barrier.
    let (expert, row0, row_end) = unsafe { (*words, *words.add(1), *words.add(2)) };
    if expert == u32::MAX {
        return; // uniform across the block
    }
    let weight_rows = if GATED { 2 * p.n } else { p.n };
    let weights = p.b + expert as u64 * weight_rows as u64 * p.k as u64 * 2;
    let col0 = col_tile * if GATED { GEMM_BN / 2 } else { GEMM_BN };
    // This block's k-tiles: its split's share (all of them without splits).
    let all_k_tiles = p.k.div_ceil(GEMM_BK);
    let per_split = all_k_tiles.div_ceil(p.splits);
    let k_first = (split * per_split).min(all_k_tiles);
    let k_tiles = (all_k_tiles - k_first).min(per_split);
    let tile = (row0, row_end);
    let w = (weights, col0);

    let mut stage = 0;
    while stage < GEMM_STAGES - 1 {
        if stage < k_tiles {
            // SAFETY: a stage of this block's shared memory; rows and weights in bounds.
            unsafe { load_stage::<GATED>(p, tile, w, stage, k_first + stage) };
        }
        cp_async_commit();
        stage += 1;
    }

    let (lane, warp) = (lane(), warp());
    // This warp's weight rows in the tile: two 16-row groups.
    let b_groups = if GATED {
        [16 * warp, 64 + 16 * warp]
    } else {
        [32 * warp, 32 * warp + 16]
    };
    let mut acc = [[[0f32; 4]; 4]; 4];
    let mut kt = 0;
    while kt < k_tiles {
        cp_async_wait_stage();
        sync_threads();
        let next = kt + GEMM_STAGES - 1;
        if next < k_tiles {
            // SAFETY: the stage computed on one iteration ago; every warp is past it
            // (the barrier above).
            unsafe { load_stage::<GATED>(p, tile, w, next % GEMM_STAGES, k_first + next) };
        }
        cp_async_commit();
        let base = stages() + (kt % GEMM_STAGES) * STAGE_BYTES;
        let mut ks = 0;
        while ks < GEMM_BK / 16 {
            let mut a = [[0u32; 4]; 4];
            let mut mt = 0;
            while mt < 4 {
                let row = mt as u32 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                let chunk = ks * 2 + (lane >> 4);
                // SAFETY: inside the stage's row tile.
                a[mt] = unsafe { ldmatrix_x4(base + swizzled(row, chunk)) };
                mt += 1;
            }
            let mut g = 0;
            while g < 2 {
                let row = b_groups[g] + (lane & 7) + ((lane >> 4) & 1) * 8;
                let chunk = ks * 2 + ((lane >> 3) & 1);
                // SAFETY: inside the stage's weight tile.
                let b = unsafe { ldmatrix_x4(base + A_BYTES + swizzled(row, chunk)) };
                let mut mt = 0;
                while mt < 4 {
                    mma(&mut acc[mt][2 * g], &a[mt], b[0], b[1]);
                    mma(&mut acc[mt][2 * g + 1], &a[mt], b[2], b[3]);
                    mt += 1;
                }
                g += 1;
            }
            ks += 1;
        }
        kt += 1;
    }

    // Epilogue: thread holds rows `lane / 4` and `+ 8` of each m16 tile, columns
    // `2 * (lane % 4)` and `+ 1` of each n8 tile.
    // (One call per m16 tile, with constant indices: a loop over the tiles would
    // index the accumulators dynamically and move them to local memory.)
    let at = (row0, row_end, col0, warp, lane);
    if p.splits > 1 {
        // SAFETY: the block's tile of its split's partial sums.
        unsafe {
            store_partials::<GATED>(p, &acc[0], 0, split, at);
            store_partials::<GATED>(p, &acc[1], 1, split, at);
            store_partials::<GATED>(p, &acc[2], 2, split, at);
            store_partials::<GATED>(p, &acc[3], 3, split, at);
        }
        return;
    }
    // SAFETY: the block's tile of `c`, as computed above.
    unsafe {
        store_rows::<GATED>(p, &acc[0], 0, at);
        store_rows::<GATED>(p, &acc[1], 1, at);
        store_rows::<GATED>(p, &acc[2], 2, at);
        store_rows::<GATED>(p, &acc[3], 3, at);
    }
}

/// Writes a warp's f32 sums for m16 tile `mt` into split `split`'s partials: the
/// positions [`store_rows`] writes, gate and up columns (`N` apart) separately.
#[inline(always)]
unsafe fn store_partials<const GATED: bool>(
    p: &GroupedGemmParams,
    acc: &[[f32; 4]; 4],
    mt: u32,
    split: u32,
    (row0, row_end, col0, warp, lane): (u32, u32, u32, u32, u32),
) {
    let (quad_row, quad_col) = (lane >> 2, 2 * (lane & 3));
    let width = if GATED { 2 * p.n } else { p.n } as u64;
    let base = p.partials as *mut [f32; 2];
    let mut half = 0usize;
    while half < 2 {
        let row = row0 + mt * 16 + quad_row + 8 * half as u32;
        if row < row_end {
            let line = (split as u64 * p.max_rows as u64 + row as u64) * width;
            let mut j = 0usize;
            while j < 4 {
                // Plain: four n8 tiles of columns. Gated: tiles 0 and 1 are gate
                // columns, 2 and 3 the up columns of the same outputs.
                let (column, shift) = if GATED {
                    (
                        col0 + 16 * warp + 8 * (j as u32 & 1) + quad_col,
                        if j >= 2 { p.n } else { 0 },
                    )
                } else {
                    (col0 + 32 * warp + 8 * j as u32 + quad_col, 0)
                };
                if column < p.n {
                    let index = (line + (shift + column) as u64) / 2;
                    let x = &acc[j];
                    // SAFETY: `row < max_rows`, `shift + column + 1 < W`, split
                    // `< splits`: inside `partials`, 8-byte aligned (column even).
                    unsafe { *base.add(index as usize) = [x[2 * half], x[2 * half + 1]] };
                }
                j += 1;
            }
        }
        half += 1;
    }
}

/// The second step of a split GEMM (see [`GemmReduceParams`]): a thread per output
/// element.
pub(crate) unsafe fn reduce_bf16<const GATED: bool>(p: &GemmReduceParams) {
    let index = block() as u64 * crate::params::ELEMENTWISE_THREADS as u64 + thread() as u64;
    let n = p.n as u64;
    if index >= p.max_rows as u64 * n {
        return;
    }
    let (row, column) = (index / n, index % n);
    // SAFETY: `offsets` holds `L + 1` values.
    let valid = unsafe { *(p.offsets as *const i64).add(p.num_experts as usize) };
    if row as i64 >= valid.clamp(0, p.max_rows as i64) {
        return;
    }
    let width = if GATED { 2 * n } else { n };
    let partials = p.partials as *const f32;
    let (mut x, mut up) = (0f32, 0f32);
    let mut split = 0u64;
    while split < p.splits as u64 {
        let line = (split * p.max_rows as u64 + row) * width;
        // SAFETY: `split < splits`, `row < max_rows`, `column (+ N) < W`.
        unsafe {
            x += *partials.add((line + column) as usize);
            if GATED {
                up += *partials.add((line + n + column) as usize);
            }
        }
        split += 1;
    }
    let value = if GATED { silu_mul(x, up) } else { x };
    // SAFETY: `row < max_rows`, `column < N`: inside `c`.
    unsafe { *(p.c as *mut u16).add(index as usize) = f32_to_bf16(value) };
}

/// Writes a warp's results for m16 tile `mt`: the thread holds its rows `lane / 4`
/// and `+ 8`, columns `2 * (lane % 4)` and `+ 1` of each n8 tile.
#[inline(always)]
unsafe fn store_rows<const GATED: bool>(
    p: &GroupedGemmParams,
    acc: &[[f32; 4]; 4],
    mt: u32,
    (row0, row_end, col0, warp, lane): (u32, u32, u32, u32, u32),
) {
    let (quad_row, quad_col) = (lane >> 2, 2 * (lane & 3));
    let out = p.c as *mut u32;
    let columns_per_warp: usize = if GATED { 2 } else { 4 };
    let mut half = 0usize;
    while half < 2 {
        let row = row0 + mt * 16 + quad_row + 8 * half as u32;
        if row < row_end {
            let mut j = 0usize;
            while j < columns_per_warp {
                let column = if GATED {
                    col0 + 16 * warp + 8 * j as u32 + quad_col
                } else {
                    col0 + 32 * warp + 8 * j as u32 + quad_col
                };
                if column < p.n {
                    let x = &acc[j];
                    let (v0, v1) = if GATED {
                        let up = &acc[j + 2];
                        (
                            silu_mul(x[2 * half], up[2 * half]),
                            silu_mul(x[2 * half + 1], up[2 * half + 1]),
                        )
                    } else {
                        (x[2 * half], x[2 * half + 1])
                    };
                    let bits = f32_to_bf16(v0) as u32 | (f32_to_bf16(v1) as u32) << 16;
                    let index = (row as u64 * p.n as u64 + column as u64) / 2;
                    // SAFETY: `row < row_end <= max_rows`, `column + 1 < N` (both even):
                    // inside `c`, 4-byte aligned.
                    unsafe { *out.add(index as usize) = bits };
                }
                j += 1;
            }
        }
        half += 1;
    }
}

/// `SiLU(g) * u` with `g` and `u` first rounded to bf16, as the separate GEMM and
/// `silu_mul_bf16` compute it.
#[inline(always)]
fn silu_mul(gate: f32, up: f32) -> f32 {
    let g = bf16_to_f32(f32_to_bf16(gate));
    let u = bf16_to_f32(f32_to_bf16(up));
    g / (1.0 + exp(-g)) * u
}
