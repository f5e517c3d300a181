//! unpermute on the CPU: each token's weighted sum of its expert outputs.

use rayon::prelude::*;

use crate::unpermute_check::{self, UnpermuteShape};
use crate::{Accumulate, Result};

/// Output bytes (one row and the `K` rows it sums) a parallel task handles at least.
const TASK_BYTES: usize = 64 * 1024;

/// Elements of a row the CPU unpermute sums at once, in an f32 accumulator on the
/// stack: the sum of one token needs no heap memory whatever `H` is.
pub const UNPERMUTE_TILE: usize = 2048;
const TILE: usize = UNPERMUTE_TILE;

/// The inputs of unpermute.
#[derive(Clone, Copy, Debug)]
pub struct UnpermuteInput<'a, T> {
    /// `[R, H]` expert outputs in permuted order, `R >= expert_first_token_offset[L]`.
    pub permuted_hidden_states: &'a [T],
    /// `H`.
    pub hidden_size: usize,
    /// `[N, K]` from permute: the row of each entry, `>= valid` for a dropped one.
    pub inv_permuted_idx: &'a [i32],
    /// `[L + 1]` from permute: its last element is the valid row count.
    pub expert_first_token_offset: &'a [i64],
    /// `[N, K]` router weights.
    pub topk_weights: &'a [f32],
    /// `K`.
    pub topk: usize,
}

impl<T> UnpermuteInput<'_, T> {
    /// Checks every shape against the others (the checks every device shares), then
    /// the values: the valid count within the rows given, no negative row index.
    /// Returns `(N, valid rows)`.
    pub(super) fn check(&self, out_len: usize) -> Result<(usize, usize)> {
        let dims = UnpermuteShape {
            permuted_len: self.permuted_hidden_states.len(),
            hidden_size: self.hidden_size,
            inv_len: self.inv_permuted_idx.len(),
            topk: self.topk,
            weights_len: self.topk_weights.len(),
            offsets_len: self.expert_first_token_offset.len(),
            out_len,
        }
        .check()?;
        let position = self.expert_first_token_offset.len() - 1;
        let valid = self.expert_first_token_offset[position];
        if valid < 0 || valid as u64 > dims.rows as u64 {
            return Err(unpermute_check::valid_count_error(
                position, valid, dims.rows,
            ));
        }
        if let Some(position) = self.inv_permuted_idx.iter().position(|&row| row < 0) {
            let value = self.inv_permuted_idx[position];
            return Err(unpermute_check::negative_row_error(position, value));
        }
        Ok((dims.num_tokens, valid as usize))
    }
}

/// Writes `out[t] = sum over kept k of topk_weights[t,k] * permuted[inv[t,k]]`,
/// accumulated in f32 in ascending `k` and rounded once to `T` (nearest even).
/// A token whose entries were all dropped gets zeros. Allocates nothing.
pub fn unpermute_into<T: Accumulate>(input: &UnpermuteInput<'_, T>, out: &mut [T]) -> Result<()> {
    let (num_tokens, valid) = input.check(out.len())?;
    let hidden_size = input.hidden_size;
    if num_tokens == 0 {
        return Ok(());
    }
    let topk = input.topk;
    let bytes_per_token = (hidden_size * size_of::<T>()).saturating_mul(topk + 1);
    let tokens_per_task = (TASK_BYTES / bytes_per_token).max(1);
    let permuted = input.permuted_hidden_states;
    out.par_chunks_mut(tokens_per_task * hidden_size)
        .zip(input.inv_permuted_idx.par_chunks(tokens_per_task * topk))
        .zip(input.topk_weights.par_chunks(tokens_per_task * topk))
        .for_each(|((out, inv), weights)| {
            for ((out, inv), weights) in out
                .chunks_exact_mut(hidden_size)
                .zip(inv.chunks_exact(topk))
                .zip(weights.chunks_exact(topk))
            {
                sum_token(permuted, hidden_size, valid, inv, weights, out);
            }
        });
    Ok(())
}

/// One token's sum, with the widest vectors this CPU has: the same code compiled for
/// AVX2 when the CPU has it (the build targets baseline x86-64, whose 4-wide SSE2
/// leaves the conversions and the `K` multiply-adds per element short of memory speed).
#[inline]
fn sum_token<T: Accumulate>(
    permuted: &[T],
    hidden_size: usize,
    valid: usize,
    inv: &[i32],
    weights: &[f32],
    out: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above), all `sum_token_avx2` asks.
        unsafe { sum_token_avx2(permuted, hidden_size, valid, inv, weights, out) };
        return;
    }
    sum_token_portable(permuted, hidden_size, valid, inv, weights, out);
}

/// [`sum_token_portable`] compiled for AVX2. Not FMA: the contract's sum is one
/// multiply and one add a step, and Rust never contracts them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_token_avx2<T: Accumulate>(
    permuted: &[T],
    hidden_size: usize,
    valid: usize,
    inv: &[i32],
    weights: &[f32],
    out: &mut [T],
) {
    sum_token_portable(permuted, hidden_size, valid, inv, weights, out);
}

#[inline(always)]
fn sum_token_portable<T: Accumulate>(
    permuted: &[T],
    hidden_size: usize,
    valid: usize,
    inv: &[i32],
    weights: &[f32],
    out: &mut [T],
) {
    for start in (0..hidden_size).step_by(TILE) {
        let len = TILE.min(hidden_size - start);
        let mut acc = [0.0f32; TILE];
        let acc = &mut acc[..len];
        for (&row, &weight) in inv.iter().zip(weights) {
            let row = row as usize;
            if row < valid {
                let first = row * hidden_size + start;
                for (acc, &x) in acc.iter_mut().zip(&permuted[first..first + len]) {
                    *acc += weight * x.to_f32();
                }
            }
        }
        for (out, &acc) in out[start..start + len].iter_mut().zip(acc.iter()) {
            *out = T::from_f32(acc);
        }
    }
}
