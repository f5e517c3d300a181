//! permute, unpermute and align on candle tensors.
//!
//! Inputs are read where they are (contiguous, at any layout offset); the permuted rows
//! and the unpermuted output are written straight into the vectors the returned tensors
//! own, so no row is copied twice.

use candle_core::{DType, Error, Result, Tensor, WithDType};
use half::{bf16, f16};
use moe_runtime::cpu::{self, PermuteDest, PermuteInput, UnpermuteInput};
use moe_runtime::{Accumulate, Element, Rows, RowsMut, TopkIds};

use crate::Scratch;
use crate::tensor::{candle_error, dims_of, u32_ids_as_i32, with_cpu};

/// What [`permute`] returns.
#[derive(Clone, Debug)]
pub struct Permuted {
    /// `[N*K, H]`, the input's dtype: the rows grouped by expert, in the order of
    /// `expert_first_token_offset`.
    pub permuted_hidden_states: Tensor,
    /// `[E + 1]` i64: expert `e`'s rows are `offset[e]..offset[e + 1]`.
    pub expert_first_token_offset: Tensor,
    /// `[N, K]` i32: the permuted row of each `(token, choice)`.
    pub inv_permuted_idx: Tensor,
    /// `[N*K]` i32: the flat entry `t*K + k` each permuted row came from.
    pub permuted_idx: Tensor,
}

/// What [`align`] returns.
#[derive(Clone, Debug)]
pub struct Aligned {
    /// `[len]` i32: the entries `t*K + k` grouped by expert, each group padded to a
    /// multiple of the block size with `N*K`.
    pub sorted_ids: Tensor,
    /// `[len / block_size]` i32: each block's expert, -1 past the used rows.
    pub block_expert_ids: Tensor,
    /// Rows of `sorted_ids` in use.
    pub num_rows_post_padded: usize,
}

/// Runs `f` with the runtime's view of `topk_ids` (`[N, K]`; u32, i32 or i64).
fn with_topk_ids<R>(topk_ids: &Tensor, f: impl FnOnce(TopkIds<'_>) -> Result<R>) -> Result<R> {
    let k = dims_of(topk_ids, "topk_ids", 2)?[1];
    let ids = |ids: TopkIds<'_>| f(ids);
    match topk_ids.dtype() {
        DType::U32 => with_cpu::<u32, _>(topk_ids, "topk_ids", |v| {
            ids(TopkIds::new(u32_ids_as_i32(v), k).map_err(candle_error)?)
        }),
        DType::I32 => with_cpu::<i32, _>(topk_ids, "topk_ids", |v| {
            ids(TopkIds::new(v, k).map_err(candle_error)?)
        }),
        DType::I64 => with_cpu::<i64, _>(topk_ids, "topk_ids", |v| {
            ids(TopkIds::new(v, k).map_err(candle_error)?)
        }),
        other => Err(Error::msg(format!(
            "topk_ids is {other:?}; expected u32, i32 or i64"
        ))),
    }
}

/// Groups the rows of `hidden_states` (`[N, H]`; bf16, f16 or f32) by the experts of
/// `topk_ids` (`[N, K]`; u32, i32 or i64), with the scratch's reused routing buffers.
/// Ties keep token order; an entry whose id is outside `0..E` is dropped (no row, no
/// share of the output), as the contract says.
pub fn permute(
    scratch: &mut Scratch,
    hidden_states: &Tensor,
    topk_ids: &Tensor,
) -> Result<Permuted> {
    let h = dims_of(hidden_states, "hidden_states", 2)?[1];
    let device = scratch.device.clone();
    if !hidden_states.device().same_device(&device) || !topk_ids.device().same_device(&device) {
        return Err(Error::msg(
            "hidden_states, topk_ids and the scratch must be on one device",
        ));
    }
    let (n, k) = topk_ids.dims2()?;
    with_topk_ids(topk_ids, |ids| match hidden_states.dtype() {
        DType::BF16 => permute_rows::<bf16>(scratch, hidden_states, h, ids, n, k),
        DType::F16 => permute_rows::<f16>(scratch, hidden_states, h, ids, n, k),
        DType::F32 => permute_rows::<f32>(scratch, hidden_states, h, ids, n, k),
        other => Err(Error::msg(format!(
            "hidden_states is {other:?}; expected bf16, f16 or f32"
        ))),
    })
}

fn permute_rows<T: WithDType + Element>(
    scratch: &mut Scratch,
    hidden_states: &Tensor,
    h: usize,
    ids: TopkIds<'_>,
    n: usize,
    k: usize,
) -> Result<Permuted> {
    with_cpu::<T, _>(hidden_states, "hidden_states", |hidden| {
        let rows = moe_runtime::size::product("permuted rows (N * K * H)", &[n, k, h])
            .map_err(candle_error)?;
        let mut permuted = vec![T::from_f64(0.0); rows];
        let input = PermuteInput::new(Rows::new(hidden, h).map_err(candle_error)?, ids);
        let dest = PermuteDest {
            hidden_states: RowsMut::new(&mut permuted, h).map_err(candle_error)?,
            scales: None,
        };
        let out = cpu::permute_into(&mut scratch.inner, &input, dest).map_err(candle_error)?;
        let offsets = out.expert_first_token_offset.to_vec();
        let inv = out.inv_permuted_idx.to_vec();
        let permuted_idx = out.permuted_idx.to_vec();
        let device = &scratch.device;
        Ok(Permuted {
            expert_first_token_offset: Tensor::new(offsets, device)?,
            inv_permuted_idx: Tensor::from_vec(inv, (n, k), device)?,
            permuted_idx: Tensor::from_vec(permuted_idx, n * k, device)?,
            permuted_hidden_states: Tensor::from_vec(permuted, (n * k, h), device)?,
        })
    })
}

/// Sums each token's `K` rows of `permuted_hidden_states` (`[rows, H]`), weighted by
/// `topk_weights` (`[N, K]` f32), in f32 and in ascending `k`: `[N, H]` in the rows'
/// dtype. `inv_permuted_idx` (`[N, K]` i32) and `expert_first_token_offset` (i64) are
/// [`permute`]'s; a row past the valid count is skipped (a dropped entry).
pub fn unpermute(
    permuted_hidden_states: &Tensor,
    inv_permuted_idx: &Tensor,
    expert_first_token_offset: &Tensor,
    topk_weights: &Tensor,
) -> Result<Tensor> {
    let h = dims_of(permuted_hidden_states, "permuted_hidden_states", 2)?[1];
    let (n, k) = dims_of(topk_weights, "topk_weights", 2).map(|d| (d[0], d[1]))?;
    match permuted_hidden_states.dtype() {
        DType::BF16 => unpermute_rows::<bf16>(
            permuted_hidden_states,
            inv_permuted_idx,
            expert_first_token_offset,
            topk_weights,
            (n, k, h),
        ),
        DType::F16 => unpermute_rows::<f16>(
            permuted_hidden_states,
            inv_permuted_idx,
            expert_first_token_offset,
            topk_weights,
            (n, k, h),
        ),
        DType::F32 => unpermute_rows::<f32>(
            permuted_hidden_states,
            inv_permuted_idx,
            expert_first_token_offset,
            topk_weights,
            (n, k, h),
        ),
        other => Err(Error::msg(format!(
            "permuted_hidden_states is {other:?}; expected bf16, f16 or f32"
        ))),
    }
}

fn unpermute_rows<T: WithDType + Accumulate>(
    permuted: &Tensor,
    inv_permuted_idx: &Tensor,
    expert_first_token_offset: &Tensor,
    topk_weights: &Tensor,
    (n, k, h): (usize, usize, usize),
) -> Result<Tensor> {
    let len =
        moe_runtime::size::product("unpermute output (N * H)", &[n, h]).map_err(candle_error)?;
    let mut out = vec![T::from_f64(0.0); len];
    with_cpu::<T, _>(permuted, "permuted_hidden_states", |rows| {
        with_cpu::<i32, _>(inv_permuted_idx, "inv_permuted_idx", |inv| {
            with_cpu::<i64, _>(
                expert_first_token_offset,
                "expert_first_token_offset",
                |offsets| {
                    with_cpu::<f32, _>(topk_weights, "topk_weights", |weights| {
                        let input = UnpermuteInput {
                            permuted_hidden_states: rows,
                            hidden_size: h,
                            inv_permuted_idx: inv,
                            expert_first_token_offset: offsets,
                            topk_weights: weights,
                            topk: k,
                        };
                        cpu::unpermute_into(&input, &mut out).map_err(candle_error)
                    })
                },
            )
        })
    })?;
    Tensor::from_vec(out, (n, h), permuted.device())
}

/// Sorts the entries of `topk_ids` (`[N, K]`; u32, i32 or i64) by expert, each group
/// padded to the scratch's block size, without moving a row (the input of GEMMs that
/// gather their rows by index). The scratch must be built with an align block size.
pub fn align(scratch: &mut Scratch, topk_ids: &Tensor) -> Result<Aligned> {
    let device = scratch.device.clone();
    with_topk_ids(topk_ids, |ids| {
        let out = cpu::align(&mut scratch.inner, &ids, None).map_err(candle_error)?;
        Ok(Aligned {
            sorted_ids: Tensor::from_vec(out.sorted_ids.to_vec(), out.sorted_ids.len(), &device)?,
            block_expert_ids: Tensor::from_vec(
                out.block_expert_ids.to_vec(),
                out.block_expert_ids.len(),
                &device,
            )?,
            num_rows_post_padded: out.num_rows_post_padded,
        })
    })
}
