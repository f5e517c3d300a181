//! unpermute on a CUDA device: one block per token sums its kept rows.

use moe_kernels::kernels::{self, Float};
use moe_kernels::{ROW_THREADS, UNPERMUTE_VECTORS_PER_THREAD, UnpermuteParams, blocks_per_row};

use super::device::CudaDevice;
use super::launch::launch;
use super::memory::{DeviceRows, DeviceRowsMut, DeviceView};
use crate::{DType, MoeError, Result, ScratchMismatch};

/// The inputs of unpermute, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceUnpermuteInput<'a> {
    /// `[R, H]` expert outputs in permuted order (f32, f16 or bf16).
    pub permuted_hidden_states: DeviceRows<'a>,
    /// `[N*K]` from permute.
    pub inv_permuted_idx: DeviceView<'a, i32>,
    /// `[L + 1]` from permute: the last element is the valid count (clamped to `R`).
    pub expert_first_token_offset: DeviceView<'a, i64>,
    /// `[N*K]` router weights.
    pub topk_weights: DeviceView<'a, f32>,
    /// `K`.
    pub topk: usize,
}

/// Queues `out[t] = sum over kept k of w[t,k] * permuted[inv[t*K+k]]` (f32
/// accumulation in ascending `k`, one rounding) on `device`'s stream. Allocates
/// nothing and never waits for the device.
pub fn unpermute_into(
    device: &CudaDevice,
    input: &DeviceUnpermuteInput<'_>,
    out: DeviceRowsMut<'_>,
) -> Result<()> {
    let permuted = input.permuted_hidden_states;
    let (out, out_dtype, out_hidden) = out.into_parts();
    let float = match permuted.dtype() {
        DType::F32 => Float::F32,
        DType::F16 => Float::F16,
        DType::BF16 => Float::BF16,
        other => {
            return Err(MoeError::Dtype {
                tensor: "permuted_hidden_states",
                op: "unpermute",
                expected: DType::BF16,
                got: other,
            });
        }
    };
    if out_dtype != permuted.dtype() {
        return Err(MoeError::Dtype {
            tensor: "output",
            op: "unpermute",
            expected: permuted.dtype(),
            got: out_dtype,
        });
    }
    let topk = input.topk;
    let entries = input.inv_permuted_idx.len();
    if topk == 0 || entries % topk != 0 || entries > i32::MAX as usize {
        return Err(MoeError::Shape {
            tensor: "inv_permuted_idx",
            len: entries,
            expected: format!("whole tokens of topk {topk} (at least 1), N*K within i32"),
        });
    }
    if input.topk_weights.len() != entries {
        return Err(MoeError::Shape {
            tensor: "topk_weights",
            len: input.topk_weights.len(),
            expected: format!("N*K = {entries}, like inv_permuted_idx"),
        });
    }
    if input.expert_first_token_offset.is_empty() {
        return Err(MoeError::Shape {
            tensor: "expert_first_token_offset",
            len: 0,
            expected: "L + 1 >= 2 offsets".into(),
        });
    }
    let num_tokens = entries / topk;
    let hidden = permuted.hidden_size();
    if out_hidden != hidden || out.len() != num_tokens * permuted.row_bytes() {
        return Err(MoeError::Shape {
            tensor: "output",
            len: out.len() / out_dtype.size_bytes(),
            expected: format!("N*H = {num_tokens}*{hidden}"),
        });
    }
    let devices = [
        ("permuted_hidden_states", permuted.bytes().device()),
        ("inv_permuted_idx", input.inv_permuted_idx.device()),
        (
            "expert_first_token_offset",
            input.expert_first_token_offset.device(),
        ),
        ("topk_weights", input.topk_weights.device()),
        ("output", out.device()),
    ];
    if let Some(&(tensor, got)) = devices.iter().find(|(_, d)| *d != device.device()) {
        return Err(ScratchMismatch::Device {
            tensor,
            expected: device.device(),
            got,
        }
        .into());
    }
    let rows = permuted.num_rows().min(i32::MAX as usize);
    let params = UnpermuteParams {
        num_tokens: num_tokens as u32,
        topk: topk as u32,
        hidden_size: hidden as u32,
        num_rows: rows as u32,
        num_offsets: input.expert_first_token_offset.len() as u32,
        _pad: 0,
        permuted_hidden_states: permuted.bytes().address(),
        inv_permuted_idx: input.inv_permuted_idx.address(),
        expert_offsets: input.expert_first_token_offset.address(),
        topk_weights: input.topk_weights.address(),
        output: out.address(),
    };
    let vector =
        (permuted.row_bytes() | permuted.bytes().address() as usize | out.address() as usize) % 16
            == 0;
    let lanes = if vector {
        16 / permuted.dtype().size_bytes()
    } else {
        1
    };
    let parts = blocks_per_row(
        (hidden / lanes) as u32,
        UNPERMUTE_VECTORS_PER_THREAD,
        num_tokens as u32,
    );
    launch(
        device,
        kernels::unpermute(float, vector),
        num_tokens as u32 * parts,
        ROW_THREADS,
        &params,
    )
}
