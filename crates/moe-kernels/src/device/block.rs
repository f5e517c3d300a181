//! The MoE block's own kernels around the expert GEMMs: the router and the activation.

use super::intrinsics::*;
use crate::params::{
    AddParams, AlignInverseParams, ELEMENTWISE_THREADS, GatherIdsParams, GroupedRouterParams,
    ROUTER_MAX_EXPERTS, ROUTER_THREADS, RouterParams, SiluMulParams,
};
use crate::routing;

/// `e^x` from the special-function unit: `2^(x log2 e)` (about 2 ulp).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let y: f32;
    // SAFETY: a pure arithmetic instruction.
    unsafe {
        core::arch::asm!(
            "ex2.approx.ftz.f32 {0}, {1};",
            out(reg32) y,
            in(reg32) x * core::f32::consts::LOG2_E,
        )
    };
    y
}

#[inline(always)]
fn shfl_xor(value: u32, mask: u32) -> u32 {
    let out: u32;
    // SAFETY: called with all 32 lanes converged (full mask).
    unsafe {
        core::arch::asm!(
            "shfl.sync.bfly.b32 {0}, {1}, {2}, 31, -1;",
            out(reg32) out,
            in(reg32) value,
            in(reg32) mask,
        )
    };
    out
}

fn warp_max(value: f32) -> f32 {
    let mut v = value;
    let mut mask = 16;
    while mask > 0 {
        v = v.max(f32::from_bits(shfl_xor(v.to_bits(), mask)));
        mask /= 2;
    }
    v
}

/// The warp's best `(value, index)` (the larger value, the lower index among equals;
/// `u32::MAX` marks a lane with no candidate), on every lane.
fn warp_best(value: f32, index: u32) -> (f32, u32) {
    let (mut best_value, mut best) = (value, index);
    let mut mask = 16;
    while mask > 0 {
        let other_value = f32::from_bits(shfl_xor(best_value.to_bits(), mask));
        let other = shfl_xor(best, mask);
        let better = other != u32::MAX
            && (best == u32::MAX
                || other_value > best_value
                || (other_value == best_value && other < best));
        if better {
            best_value = other_value;
            best = other;
        }
        mask /= 2;
    }
    (best_value, best)
}

fn warp_sum(value: f32) -> f32 {
    let mut v = value;
    let mut mask = 16;
    while mask > 0 {
        v += f32::from_bits(shfl_xor(v.to_bits(), mask));
        mask /= 2;
    }
    v
}

/// One warp per token: the `K` largest logits (a tie goes to the lower expert id),
/// weighted by their softmax probability, renormalised when asked. The same function
/// as the CPU router (`moe_experts::route`).
///
/// # Safety
/// Launched with `ceil(N / 4)` blocks of [`ROUTER_THREADS`]; `E <= ROUTER_MAX_EXPERTS`,
/// `K <= min(E, ROUTER_MAX_TOP_K)`; buffers sized by the host.
#[inline(always)]
pub(crate) unsafe fn router_topk(p: &RouterParams) {
    const WARPS: u32 = ROUTER_THREADS / 32;
    const WORDS: u32 = ROUTER_MAX_EXPERTS / 32;
    let token = block() * WARPS + warp();
    if token >= p.num_tokens {
        return;
    }
    let experts = p.num_experts;
    // Chosen experts of this warp's token: a bitmask in the routing kernels' shared
    // memory (this kernel does not share a module-level buffer with them at run time).
    let chosen = route_shared()
        .cast::<u32>()
        .wrapping_add((warp() * WORDS) as usize);
    // SAFETY: `token < N`, experts below `E`, chosen words below `WORDS` per warp.
    unsafe {
        let logits = (p.logits as *const f32).add((token * experts) as usize);
        let mut word = lane();
        while word < WORDS {
            *chosen.add(word as usize) = 0;
            word += 32;
        }
        sync_warp();
        let mut max = f32::NEG_INFINITY;
        let mut e = lane();
        while e < experts {
            max = max.max(*logits.add(e as usize));
            e += 32;
        }
        let max = warp_max(max);
        let mut total = 0.0f32;
        let mut e = lane();
        while e < experts {
            total += exp(*logits.add(e as usize) - max);
            e += 32;
        }
        let total = warp_sum(total);

        let ids = (p.topk_ids as *mut i32).add((token * p.top_k) as usize);
        let weights = (p.topk_weights as *mut f32).add((token * p.top_k) as usize);
        let mut chosen_total = 0.0f32;
        for k in 0..p.top_k {
            // This lane's best unchosen expert, then the warp's (lower id on ties).
            let mut best_value = f32::NEG_INFINITY;
            let mut best = u32::MAX;
            let mut e = lane();
            while e < experts {
                let taken = *chosen.add((e / 32) as usize) & (1 << (e % 32)) != 0;
                let value = *logits.add(e as usize);
                if !taken && (best == u32::MAX || value > best_value) {
                    best_value = value;
                    best = e;
                }
                e += 32;
            }
            let (best_value, best) = warp_best(best_value, best);
            let weight = exp(best_value - max);
            chosen_total += weight;
            if lane() == 0 {
                *chosen.add((best / 32) as usize) |= 1 << (best % 32);
                *ids.add(k as usize) = best as i32;
                *weights.add(k as usize) = weight;
            }
            sync_warp();
        }
        let denominator = if p.norm_topk_prob != 0 {
            chosen_total
        } else {
            total
        };
        let mut k = lane();
        while k < p.top_k {
            *weights.add(k as usize) /= denominator;
            k += 32;
        }
    }
}

/// One warp per token, DeepSeek-V3's routing: each expert's choice score (its
/// sigmoid score plus its correction) into shared memory; a lane per group scores the
/// group by its two best; `topk_group` warp-wide argmaxes choose the groups, `K` more
/// the experts among them (a tie goes to the lower group or expert id); lane 0 turns
/// the chosen experts' scores into weights. Every value comes from the functions of
/// [`crate::routing`] in the CPU router's order, so both give the same bits.
///
/// # Safety
/// Launched with `ceil(N / 4)` blocks of [`ROUTER_THREADS`]; `E <= ROUTER_MAX_EXPERTS`,
/// `n_group <= ROUTER_MAX_GROUPS` dividing `E` into groups of at least 2, `topk_group`
/// in `1..=n_group`, `K <= min(ROUTER_MAX_TOP_K, topk_group * E / n_group)`; buffers
/// sized by the host.
#[inline(always)]
pub(crate) unsafe fn router_grouped(p: &GroupedRouterParams) {
    const WARPS: u32 = ROUTER_THREADS / 32;
    const WORDS: u32 = ROUTER_MAX_EXPERTS / 32;
    let token = block() * WARPS + warp();
    if token >= p.num_tokens {
        return;
    }
    let experts = p.num_experts;
    let group_size = experts / p.n_group;
    // Per warp: `E` choice scores, then the chosen-expert bitmask.
    let choice = route_shared()
        .cast::<f32>()
        .wrapping_add((warp() * ROUTER_MAX_EXPERTS) as usize);
    let chosen = route_shared()
        .cast::<u32>()
        .wrapping_add((WARPS * ROUTER_MAX_EXPERTS + warp() * WORDS) as usize);
    // SAFETY: `token < N`; experts below `E <= ROUTER_MAX_EXPERTS`; groups below
    // `n_group`, each `group_size` scores inside this warp's `E`; chosen words below
    // `WORDS`; outputs `K` per token.
    unsafe {
        let logits = (p.logits as *const f32).add((token * experts) as usize);
        let bias = p.bias as *const f32;
        let mut word = lane();
        while word < WORDS {
            *chosen.add(word as usize) = 0;
            word += 32;
        }
        let mut e = lane();
        while e < experts {
            let score = routing::sigmoid(*logits.add(e as usize));
            *choice.add(e as usize) = routing::choice_score(score, *bias.add(e as usize));
            e += 32;
        }
        sync_warp();

        // The groups: lane g holds group g's score until it is chosen.
        let mut group = if lane() < p.n_group { lane() } else { u32::MAX };
        let group_score = if group != u32::MAX {
            let members = core::slice::from_raw_parts(
                choice.add((group * group_size) as usize),
                group_size as usize,
            );
            routing::group_score(members)
        } else {
            f32::NEG_INFINITY
        };
        let mut groups = 0u32;
        for _ in 0..p.topk_group {
            let (_, best) = warp_best(group_score, group);
            groups |= 1 << best;
            if group == best {
                group = u32::MAX;
            }
        }

        let ids = (p.topk_ids as *mut i32).add((token * p.top_k) as usize);
        let weights = (p.topk_weights as *mut f32).add((token * p.top_k) as usize);
        for k in 0..p.top_k {
            // This lane's best unchosen expert of a chosen group, then the warp's.
            let mut best_value = f32::NEG_INFINITY;
            let mut best = u32::MAX;
            let mut e = lane();
            while e < experts {
                let allowed = groups & (1 << (e / group_size)) != 0
                    && *chosen.add((e / 32) as usize) & (1 << (e % 32)) == 0;
                let value = *choice.add(e as usize);
                if allowed && (best == u32::MAX || value > best_value) {
                    best_value = value;
                    best = e;
                }
                e += 32;
            }
            let (_, best) = warp_best(best_value, best);
            if lane() == 0 {
                *chosen.add((best / 32) as usize) |= 1 << (best % 32);
                *ids.add(k as usize) = best as i32;
                // The uncorrected score: the weight ignores the correction.
                *weights.add(k as usize) = routing::sigmoid(*logits.add(best as usize));
            }
            sync_warp();
        }
        if lane() == 0 {
            let weights = core::slice::from_raw_parts_mut(weights, p.top_k as usize);
            routing::finish_weights(weights, p.norm_topk_prob != 0, f32::from_bits(p.scale_bits));
        }
    }
}

/// `out[i] = bf16(out[i] + other[i])`, in f32 with one rounding, one thread per
/// element: two bf16 tensors added (the shared expert's output to the routed one).
///
/// # Safety
/// Launched with `ceil(len / ELEMENTWISE_THREADS)` blocks; buffers sized by the host.
#[inline(always)]
pub(crate) unsafe fn add_bf16(p: &AddParams) {
    let index = block() as u64 * ELEMENTWISE_THREADS as u64 + thread() as u64;
    if index >= p.len {
        return;
    }
    // SAFETY: `index < len`: inside both buffers.
    unsafe {
        let out = (p.out as *mut u16).add(index as usize);
        let a = f32::from_bits((*out as u32) << 16);
        let b = f32::from_bits((*(p.other as *const u16).add(index as usize) as u32) << 16);
        *out = f32_to_bf16(a + b);
    }
}

/// `out[r, j] = bf16(SiLU(g) * u)`, `g = gate_up[r, j]`, `u = gate_up[r, I + j]`, in
/// f32 with one rounding, one thread per output element.
///
/// # Safety
/// Launched with `ceil(rows * I / ELEMENTWISE_THREADS)` blocks; buffers sized by the
/// host.
#[inline(always)]
pub(crate) unsafe fn silu_mul_bf16(p: &SiluMulParams) {
    let index = block() as u64 * ELEMENTWISE_THREADS as u64 + thread() as u64;
    let columns = p.columns as u64;
    if index >= p.rows as u64 * columns {
        return;
    }
    let (row, column) = (index / columns, index % columns);
    // SAFETY: `row < rows`, `column < I`: inside both buffers.
    unsafe {
        let gate_up = (p.gate_up as *const u16).add((row * 2 * columns) as usize);
        let g = f32::from_bits((*gate_up.add(column as usize) as u32) << 16);
        let u = f32::from_bits((*gate_up.add((columns + column) as usize) as u32) << 16);
        let silu = g / (1.0 + exp(-g));
        *(p.out as *mut u16).add(index as usize) = f32_to_bf16(silu * u);
    }
}

/// The indexed backend's combine index (see [`AlignInverseParams`]): a thread per row.
pub(crate) unsafe fn align_inverse(p: &AlignInverseParams) {
    let r = block() * ELEMENTWISE_THREADS + thread();
    // SAFETY: one i32 at `rows_used`.
    let used = unsafe { *(p.rows_used as *const i32) }.clamp(0, p.max_rows as i32) as u32;
    if r == 0 {
        // SAFETY: one i64 at `valid`.
        unsafe { *(p.valid as *mut i64) = used as i64 };
    }
    if r < used {
        // SAFETY: `r < used <= max_rows`, the length of `sorted_ids`.
        let entry = unsafe { *(p.sorted_ids as *const i32).add(r as usize) } as u32;
        if entry < p.entries {
            // SAFETY: `entry < entries`, the length of `inv`.
            unsafe { *(p.inv as *mut i32).add(entry as usize) = r as i32 };
        }
    }
}

/// `out[r] = src[index[r]]`, or -1 for an index outside `src` (see [`GatherIdsParams`]):
/// a thread per row.
pub(crate) unsafe fn gather_ids(p: &GatherIdsParams) {
    let r = block() * ELEMENTWISE_THREADS + thread();
    if r >= p.rows {
        return;
    }
    // SAFETY: `r < rows`, the length of `index` and `out`.
    let at = unsafe { *(p.index as *const i32).add(r as usize) } as u32;
    let id = if at < p.src_len {
        // SAFETY: `at < src_len`, the length of `src` (a negative index is a large u32).
        unsafe { *(p.src as *const i32).add(at as usize) }
    } else {
        -1
    };
    // SAFETY: `r < rows`.
    unsafe { *(p.out as *mut i32).add(r as usize) = id };
}
