//! The checks of an unpermute call, one definition for every device.
//!
//! Shapes are checked on the host, before any memory is touched. The values (the
//! valid count and the row indices) are checked where they are: on the host for the
//! CPU, on the device for CUDA (recorded in a status block, `cuda::DeviceStatus`).
//! Both report the same errors, built here.

use crate::{MoeError, Result};

/// `bound` of the error for a negative row index.
pub(crate) const NEGATIVE_ROW_BOUND: &str = "rows are never negative";

/// `bound` of the error for a valid count outside the `rows` given.
pub(crate) fn valid_count_bound(rows: usize) -> String {
    format!("the valid count must be in 0..={rows}, the rows given")
}

/// The error for a valid count `value` at `position` outside `0..=rows`.
pub(crate) fn valid_count_error(position: usize, value: i64, rows: usize) -> MoeError {
    MoeError::IndexOutOfRange {
        tensor: "expert_first_token_offset",
        position,
        value,
        bound: valid_count_bound(rows),
    }
}

/// The error for a negative row index `value` at `position`.
pub(crate) fn negative_row_error(position: usize, value: i32) -> MoeError {
    MoeError::IndexOutOfRange {
        tensor: "inv_permuted_idx",
        position,
        value: value.into(),
        bound: NEGATIVE_ROW_BOUND.into(),
    }
}

/// The lengths of an unpermute call, in elements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UnpermuteShape {
    /// `permuted_hidden_states`: `[R, H]`.
    pub(crate) permuted_len: usize,
    /// `H`.
    pub(crate) hidden_size: usize,
    /// `inv_permuted_idx`: `[N*K]`.
    pub(crate) inv_len: usize,
    /// `K`.
    pub(crate) topk: usize,
    /// `topk_weights`: `[N*K]`.
    pub(crate) weights_len: usize,
    /// `expert_first_token_offset`: `[L + 1]`.
    pub(crate) offsets_len: usize,
    /// The output: `[N, H]`.
    pub(crate) out_len: usize,
}

/// What the shape check finds out about a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UnpermuteDims {
    /// `N`.
    pub(crate) num_tokens: usize,
    /// `R`, rows of expert outputs given.
    pub(crate) rows: usize,
}

impl UnpermuteShape {
    /// Checks every length against the others, naming the first mismatch.
    pub(crate) fn check(&self) -> Result<UnpermuteDims> {
        let hidden_size = self.hidden_size;
        if hidden_size == 0 || self.permuted_len % hidden_size != 0 {
            return Err(MoeError::Shape {
                tensor: "permuted_hidden_states",
                len: self.permuted_len,
                expected: format!("whole rows of hidden_size {hidden_size} (at least 1)"),
            });
        }
        let entries = self.inv_len;
        if self.topk == 0 || entries % self.topk != 0 || entries > i32::MAX as usize {
            return Err(MoeError::Shape {
                tensor: "inv_permuted_idx",
                len: entries,
                expected: format!(
                    "whole tokens of topk {} (at least 1), N*K within i32",
                    self.topk
                ),
            });
        }
        if self.weights_len != entries {
            return Err(MoeError::Shape {
                tensor: "topk_weights",
                len: self.weights_len,
                expected: format!("N*K = {entries}, like inv_permuted_idx"),
            });
        }
        if self.offsets_len == 0 {
            return Err(MoeError::Shape {
                tensor: "expert_first_token_offset",
                len: 0,
                expected: "L + 1 >= 2 offsets".into(),
            });
        }
        let num_tokens = entries / self.topk;
        let out_len = crate::size::product(
            "unpermute output elements (N * H)",
            &[num_tokens, hidden_size],
        )?;
        if out_len != self.out_len {
            return Err(MoeError::Shape {
                tensor: "output",
                len: self.out_len,
                expected: format!("N*H = {num_tokens}*{hidden_size}"),
            });
        }
        Ok(UnpermuteDims {
            num_tokens,
            rows: self.permuted_len / hidden_size,
        })
    }
}
