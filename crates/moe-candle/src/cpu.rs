//! The CPU path: candle CPU tensors read in place, the runtime's CPU ops writing
//! straight into the vectors the returned tensors own.

use candle_core::{DType, Error, Result, Tensor, WithDType};
use moe_runtime::cpu::{self, PermuteDest, PermuteInput, UnpermuteInput};
use moe_runtime::{Accumulate, Element, Rows, RowsMut, TopkIds};

use crate::tensor::{candle_error, u32_ids_as_i32, with_cpu};
use crate::{Aligned, Permuted, Scratch};

/// Runs `f` with the runtime's view of `topk_ids` (`[N, K]`; u32, i32 or i64).
fn with_topk_ids<R>(
    topk_ids: &Tensor,
    k: usize,
    f: impl FnOnce(TopkIds<'_>) -> Result<R>,
) -> Result<R> {
    match topk_ids.dtype() {
        DType::U32 => with_cpu::<u32, _>(topk_ids, "topk_ids", |v| {
            f(TopkIds::new(u32_ids_as_i32(v), k).map_err(candle_error)?)
        }),
        DType::I32 => with_cpu::<i32, _>(topk_ids, "topk_ids", |v| {
            f(TopkIds::new(v, k).map_err(candle_error)?)
        }),
        DType::I64 => with_cpu::<i64, _>(topk_ids, "topk_ids", |v| {
            f(TopkIds::new(v, k).map_err(candle_error)?)
        }),
        other => Err(Error::msg(format!(
            "topk_ids is {other:?}; expected u32, i32 or i64"
        ))),
    }
}

/// permute on the CPU, rows of `T`.
pub(crate) fn permute<T: WithDType + Element>(
    scratch: &mut Scratch,
    hidden_states: &Tensor,
    topk_ids: &Tensor,
    (n, k, h): (usize, usize, usize),
) -> Result<Permuted> {
    with_cpu::<T, _>(hidden_states, "hidden_states", |hidden| {
        with_topk_ids(topk_ids, k, |ids| {
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
    })
}

/// unpermute on the CPU, rows of `T`.
pub(crate) fn unpermute<T: WithDType + Accumulate>(
    [
        permuted,
        inv_permuted_idx,
        expert_first_token_offset,
        topk_weights,
    ]: [&Tensor; 4],
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

/// align on the CPU.
pub(crate) fn align(scratch: &mut Scratch, topk_ids: &Tensor, k: usize) -> Result<Aligned> {
    let device = scratch.device.clone();
    with_topk_ids(topk_ids, k, |ids| {
        let out = cpu::align(&mut scratch.inner, &ids, None).map_err(candle_error)?;
        let rows = i32::try_from(out.num_rows_post_padded)
            .map_err(|_| Error::msg("align's padded row count exceeds i32"))?;
        Ok(Aligned {
            sorted_ids: Tensor::from_vec(out.sorted_ids.to_vec(), out.sorted_ids.len(), &device)?,
            block_expert_ids: Tensor::from_vec(
                out.block_expert_ids.to_vec(),
                out.block_expert_ids.len(),
                &device,
            )?,
            num_rows_post_padded: Tensor::new(&[rows], &device)?,
            block_size: out.block_size,
        })
    })
}
