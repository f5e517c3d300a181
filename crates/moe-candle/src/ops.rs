//! permute, unpermute and align on candle tensors, on the scratch's device: the CPU
//! path (`cpu`) or, with feature `cuda`, the CUDA path (`cuda`).
//!
//! Inputs are read where they are (contiguous, at any layout offset); the permuted rows
//! and the unpermuted output are written once, straight into the returned tensors.

use candle_core::{DType, Device, Error, Result, Tensor};
use half::{bf16, f16};

use crate::Scratch;
use crate::tensor::dims_of;

/// What [`permute`] returns, on the scratch's device.
#[derive(Clone, Debug)]
pub struct Permuted {
    /// `[N*K, H]`, the input's dtype: the rows grouped by expert, in the order of
    /// `expert_first_token_offset`. Rows past the valid count (entries dropped for an
    /// id outside `0..E`) are zero.
    pub permuted_hidden_states: Tensor,
    /// `[E + 1]` i64: expert `e`'s rows are `offset[e]..offset[e + 1]`; the last
    /// element is the valid count.
    pub expert_first_token_offset: Tensor,
    /// `[N, K]` i32: the permuted row of each `(token, choice)`.
    pub inv_permuted_idx: Tensor,
    /// `[N*K]` i32: the flat entry `t*K + k` each permuted row came from.
    pub permuted_idx: Tensor,
}

/// What [`align`] returns, on the scratch's device.
#[derive(Clone, Debug)]
pub struct Aligned {
    /// `[len]` i32: the entries `t*K + k` grouped by expert, each group padded to a
    /// multiple of the block size with `N*K`.
    pub sorted_ids: Tensor,
    /// `[len / block_size]` i32: each block's expert, -1 past the used rows.
    pub block_expert_ids: Tensor,
    /// `[1]` i32: rows of `sorted_ids` in use, a multiple of the block size. A tensor,
    /// not a number: on CUDA, reading it would wait for the device.
    pub num_rows_post_padded: Tensor,
    /// The scratch's align block size.
    pub block_size: usize,
}

/// Checks that every tensor is on the scratch's device.
fn check_devices(scratch: &Scratch, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, tensor) in tensors {
        if !tensor.device().same_device(&scratch.device) {
            return Err(Error::msg(format!(
                "{name} is on {:?}, the scratch on {:?}: a call runs on one device",
                tensor.device().location(),
                scratch.device.location()
            )));
        }
    }
    Ok(())
}

/// Groups the rows of `hidden_states` (`[N, H]`; bf16, f16 or f32) by the experts of
/// `topk_ids` (`[N, K]`; u32, i32 or i64), with the scratch's reused routing buffers,
/// on the scratch's device (on CUDA, queued on the device's stream, no host wait).
/// Ties keep token order; an entry whose id is outside `0..E` is dropped (no row, no
/// share of the output), as the contract says.
pub fn permute(
    scratch: &mut Scratch,
    hidden_states: &Tensor,
    topk_ids: &Tensor,
) -> Result<Permuted> {
    check_devices(
        scratch,
        &[("hidden_states", hidden_states), ("topk_ids", topk_ids)],
    )?;
    let h = dims_of(hidden_states, "hidden_states", 2)?[1];
    let (n, k) = dims_of(topk_ids, "topk_ids", 2).map(|d| (d[0], d[1]))?;
    let shape = (n, k, h);
    let on_cuda = matches!(scratch.device, Device::Cuda(_));
    match (hidden_states.dtype(), on_cuda) {
        (DType::BF16, false) => {
            crate::cpu::permute::<bf16>(scratch, hidden_states, topk_ids, shape)
        }
        (DType::F16, false) => crate::cpu::permute::<f16>(scratch, hidden_states, topk_ids, shape),
        (DType::F32, false) => crate::cpu::permute::<f32>(scratch, hidden_states, topk_ids, shape),
        #[cfg(feature = "cuda")]
        (DType::BF16, true) => {
            crate::cuda::permute::<bf16>(scratch, hidden_states, topk_ids, shape)
        }
        #[cfg(feature = "cuda")]
        (DType::F16, true) => crate::cuda::permute::<f16>(scratch, hidden_states, topk_ids, shape),
        #[cfg(feature = "cuda")]
        (DType::F32, true) => crate::cuda::permute::<f32>(scratch, hidden_states, topk_ids, shape),
        #[cfg(not(feature = "cuda"))]
        (DType::BF16 | DType::F16 | DType::F32, true) => Err(no_cuda()),
        (other, _) => Err(Error::msg(format!(
            "hidden_states is {other:?}; expected bf16, f16 or f32"
        ))),
    }
}

/// Sums each token's `K` rows of `permuted_hidden_states` (`[rows, H]`), weighted by
/// `topk_weights` (`[N, K]` f32), in f32 and in ascending `k`: `[N, H]` in the rows'
/// dtype. `inv_permuted_idx` (`[N, K]` i32) and `expert_first_token_offset` (i64) are
/// [`permute`]'s; a row past the valid count is skipped (a dropped entry). `scratch`
/// is the one the permute ran with: on CUDA, an index the device finds out of range
/// is recorded in its status block ([`Scratch::check_status`]).
pub fn unpermute(
    scratch: &Scratch,
    permuted_hidden_states: &Tensor,
    inv_permuted_idx: &Tensor,
    expert_first_token_offset: &Tensor,
    topk_weights: &Tensor,
) -> Result<Tensor> {
    let tensors = [
        permuted_hidden_states,
        inv_permuted_idx,
        expert_first_token_offset,
        topk_weights,
    ];
    check_devices(
        scratch,
        &[
            ("permuted_hidden_states", permuted_hidden_states),
            ("inv_permuted_idx", inv_permuted_idx),
            ("expert_first_token_offset", expert_first_token_offset),
            ("topk_weights", topk_weights),
        ],
    )?;
    let h = dims_of(permuted_hidden_states, "permuted_hidden_states", 2)?[1];
    let (n, k) = dims_of(topk_weights, "topk_weights", 2).map(|d| (d[0], d[1]))?;
    let shape = (n, k, h);
    let on_cuda = matches!(scratch.device, Device::Cuda(_));
    match (permuted_hidden_states.dtype(), on_cuda) {
        (DType::BF16, false) => crate::cpu::unpermute::<bf16>(tensors, shape),
        (DType::F16, false) => crate::cpu::unpermute::<f16>(tensors, shape),
        (DType::F32, false) => crate::cpu::unpermute::<f32>(tensors, shape),
        #[cfg(feature = "cuda")]
        (DType::BF16, true) => crate::cuda::unpermute::<bf16>(scratch, tensors, shape),
        #[cfg(feature = "cuda")]
        (DType::F16, true) => crate::cuda::unpermute::<f16>(scratch, tensors, shape),
        #[cfg(feature = "cuda")]
        (DType::F32, true) => crate::cuda::unpermute::<f32>(scratch, tensors, shape),
        #[cfg(not(feature = "cuda"))]
        (DType::BF16 | DType::F16 | DType::F32, true) => Err(no_cuda()),
        (other, _) => Err(Error::msg(format!(
            "permuted_hidden_states is {other:?}; expected bf16, f16 or f32"
        ))),
    }
}

/// Sorts the entries of `topk_ids` (`[N, K]`; u32, i32 or i64) by expert, each group
/// padded to the scratch's block size, without moving a row (the input of GEMMs that
/// gather their rows by index). The scratch must be built with an align block size.
pub fn align(scratch: &mut Scratch, topk_ids: &Tensor) -> Result<Aligned> {
    check_devices(scratch, &[("topk_ids", topk_ids)])?;
    let k = dims_of(topk_ids, "topk_ids", 2)?[1];
    match scratch.device {
        Device::Cpu => crate::cpu::align(scratch, topk_ids, k),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::align(scratch, topk_ids, k),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
        _ => Err(Error::msg(
            "moe-candle runs on candle's CPU and CUDA devices",
        )),
    }
}

/// The error of a CUDA call in a build without feature `cuda`.
#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda() -> Error {
    Error::msg(
        "moe-candle was built without feature `cuda`: CUDA tensors need \
         `moe-candle = { default-features = false, features = [\"cuda\"] }`",
    )
}
