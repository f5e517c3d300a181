//! The MoE block's own kernels around the expert GEMMs: the router and the activation.

use super::intrinsics::*;
use crate::params::{
    ELEMENTWISE_THREADS, ROUTER_MAX_EXPERTS, ROUTER_THREADS, RouterParams, SiluMulParams,
};

/// `e^x` from the special-function unit: `2^(x log2 e)` (about 2 ulp).
#[inline(always)]
fn exp(x: f32) -> f32 {
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
