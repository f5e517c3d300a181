//! unpermute on the CPU: each token's weighted sum of its expert outputs.

use rayon::prelude::*;

use crate::size::product;
use crate::{Accumulate, MoeError, Result};

/// Output bytes (one row and the `K` rows it sums) a parallel task handles at least.
const TASK_BYTES: usize = 64 * 1024;

/// Elements of a row summed at once, in an f32 accumulator on the stack: the sum of
/// one token needs no heap memory whatever `H` is.
const TILE: usize = 2048;

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

/// What [`UnpermuteInput::check`] found.
#[derive(Clone, Copy, Debug)]
pub(super) struct Checked {
    /// `N`.
    pub(super) num_tokens: usize,
    /// `expert_first_token_offset[L]`, at most the rows given.
    pub(super) valid: usize,
    /// `N*H`, the length of the output (fits in usize).
    pub(super) output_len: usize,
}

impl<T> UnpermuteInput<'_, T> {
    /// Checks every shape and index against the others.
    pub(super) fn check(&self) -> Result<Checked> {
        let hidden_size = self.hidden_size;
        if hidden_size == 0 || self.permuted_hidden_states.len() % hidden_size != 0 {
            return Err(MoeError::Shape {
                tensor: "permuted_hidden_states",
                len: self.permuted_hidden_states.len(),
                expected: format!("whole rows of hidden_size {hidden_size} (at least 1)"),
            });
        }
        if self.topk == 0 || self.inv_permuted_idx.len() % self.topk != 0 {
            return Err(MoeError::Shape {
                tensor: "inv_permuted_idx",
                len: self.inv_permuted_idx.len(),
                expected: format!("whole tokens of topk {} (at least 1)", self.topk),
            });
        }
        let entries = self.inv_permuted_idx.len();
        if self.topk_weights.len() != entries {
            return Err(MoeError::Shape {
                tensor: "topk_weights",
                len: self.topk_weights.len(),
                expected: format!("N*K = {entries}, like inv_permuted_idx"),
            });
        }
        let rows = self.permuted_hidden_states.len() / hidden_size;
        let Some(&valid) = self.expert_first_token_offset.last() else {
            return Err(MoeError::Shape {
                tensor: "expert_first_token_offset",
                len: 0,
                expected: "L + 1 >= 2 offsets".into(),
            });
        };
        if valid < 0 || valid as u64 > rows as u64 {
            return Err(MoeError::IndexOutOfRange {
                tensor: "expert_first_token_offset",
                position: self.expert_first_token_offset.len() - 1,
                value: valid,
                bound: format!("the valid count must be in 0..={rows}, the rows given"),
            });
        }
        if let Some(position) = self.inv_permuted_idx.iter().position(|&row| row < 0) {
            return Err(MoeError::IndexOutOfRange {
                tensor: "inv_permuted_idx",
                position,
                value: self.inv_permuted_idx[position].into(),
                bound: "rows are never negative".into(),
            });
        }
        let num_tokens = entries / self.topk;
        Ok(Checked {
            num_tokens,
            valid: valid as usize,
            output_len: product(
                "unpermute output elements (N * H)",
                &[num_tokens, hidden_size],
            )?,
        })
    }
}

/// Writes `out[t] = sum over kept k of topk_weights[t,k] * permuted[inv[t,k]]`,
/// accumulated in f32 in ascending `k` and rounded once to `T` (nearest even).
/// A token whose entries were all dropped gets zeros. Allocates nothing.
pub fn unpermute_into<T: Accumulate>(input: &UnpermuteInput<'_, T>, out: &mut [T]) -> Result<()> {
    let Checked {
        num_tokens,
        valid,
        output_len,
    } = input.check()?;
    let hidden_size = input.hidden_size;
    if out.len() != output_len {
        return Err(MoeError::Shape {
            tensor: "output",
            len: out.len(),
            expected: format!("N*H = {num_tokens}*{hidden_size}"),
        });
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let topk = input.topk;
    // Only a task size: saturating is exact enough (`out` holds N*H elements, so the
    // row's bytes fit).
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

#[inline]
fn sum_token<T: Accumulate>(
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
