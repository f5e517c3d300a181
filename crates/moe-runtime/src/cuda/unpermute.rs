//! unpermute on a CUDA device: one block (or a few) per token sums its kept rows.

use moe_kernels::kernels::{Float, Kernel};
use moe_kernels::{
    ROW_THREADS, UNPERMUTE_VECTORS_PER_THREAD, UnpermuteParams, blocks_per_row,
    unpermute_reads_rows_at_once,
};

use super::device::Stream;
use super::launch::{Grid, launch};
use super::memory::{CallViews, DeviceRows, DeviceRowsMut, DeviceView};
use super::status::{DeviceStatus, StatusOp};
use crate::unpermute_check::UnpermuteShape;
use crate::{DType, MoeError, Result};

/// The element types unpermute sums.
const SUMMABLE: &[DType] = &[DType::F32, DType::F16, DType::BF16];

/// The inputs of unpermute, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceUnpermuteInput<'a> {
    /// `[R, H]` expert outputs in permuted order (f32, f16 or bf16).
    pub permuted_hidden_states: DeviceRows<'a>,
    /// `[N*K]` from permute.
    pub inv_permuted_idx: DeviceView<'a, i32>,
    /// `[L + 1]` from permute: the last element is the valid count.
    pub expert_first_token_offset: DeviceView<'a, i64>,
    /// `[N*K]` router weights.
    pub topk_weights: DeviceView<'a, f32>,
    /// `K`.
    pub topk: usize,
    /// Where a valid count outside `0..=R` or a negative row index is reported: the
    /// permute's [`status`](super::DevicePermuteOutput::status), or a
    /// [`StatusBuffer`](super::StatusBuffer)'s.
    pub status: DeviceStatus<'a>,
}

/// Queues `out[t] = sum over kept k of w[t,k] * permuted[inv[t*K+k]]` (f32
/// accumulation in ascending `k`, one rounding) on `stream`. Allocates nothing and
/// never waits for the device (but in checked mode).
pub fn unpermute_into(
    stream: &Stream<'_>,
    input: &DeviceUnpermuteInput<'_>,
    out: DeviceRowsMut<'_>,
) -> Result<()> {
    let permuted = input.permuted_hidden_states;
    let (out, out_dtype, out_hidden) = out.into_parts();
    let float = match permuted.dtype() {
        DType::F32 => Float::F32,
        DType::F16 => Float::F16,
        DType::BF16 => Float::BF16,
        got => {
            return Err(MoeError::UnsupportedDtype {
                tensor: "permuted_hidden_states",
                op: "unpermute",
                got,
                supported: SUMMABLE,
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
    let hidden = permuted.hidden_size();
    if out_hidden != hidden {
        return Err(MoeError::Shape {
            tensor: "output",
            len: out.len() / out_dtype.size_bytes(),
            expected: format!("rows of hidden_size {hidden}, like permuted_hidden_states"),
        });
    }
    let dims = UnpermuteShape {
        permuted_len: permuted.bytes().len() / permuted.dtype().size_bytes(),
        hidden_size: hidden,
        inv_len: input.inv_permuted_idx.len(),
        topk: input.topk,
        weights_len: input.topk_weights.len(),
        offsets_len: input.expert_first_token_offset.len(),
        out_len: out.len() / out_dtype.size_bytes(),
    }
    .check()?;
    let views = CallViews::new()
        .with(
            "permuted_hidden_states",
            permuted.bytes().device(),
            permuted.bytes().binding(),
        )
        .with(
            "inv_permuted_idx",
            input.inv_permuted_idx.device(),
            input.inv_permuted_idx.binding(),
        )
        .with(
            "expert_first_token_offset",
            input.expert_first_token_offset.device(),
            input.expert_first_token_offset.binding(),
        )
        .with(
            "topk_weights",
            input.topk_weights.device(),
            input.topk_weights.binding(),
        )
        .with("output", out.device(), out.binding())
        .with("status", input.status.device(), input.status.binding());
    let device = stream.device();
    views.check_devices(device.device())?;
    views.check_streams(stream)?;
    let limit = |quantity, value: usize| {
        u32::try_from(value).map_err(|_| MoeError::DeviceLimit {
            quantity,
            value: value as u128,
            max: u32::MAX.into(),
        })
    };
    let hidden_u32 = limit("hidden_size", hidden)?;
    let num_offsets = limit(
        "expert_first_token_offset's length",
        input.expert_first_token_offset.len(),
    )?;
    let num_tokens = dims.num_tokens;
    let params = UnpermuteParams {
        num_tokens: num_tokens as u32,
        topk: input.topk as u32,
        hidden_size: hidden_u32,
        // More rows than i32 can index cannot be addressed by a valid count anyway.
        num_rows: dims.rows.min(i32::MAX as usize) as u32,
        num_offsets,
        _pad: 0,
        call: StatusOp::Unpermute.next_call(),
        status: input.status.address(),
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
    let blocks = limit(
        "the blocks of unpermute's grid (N * blocks per row)",
        num_tokens * parts as usize,
    )?;
    let grid = Grid {
        blocks,
        threads: ROW_THREADS,
    };
    let small = unpermute_reads_rows_at_once(params.num_tokens, params.topk);
    // SAFETY: every length checked against the others (`N` tokens of `K` entries and
    // weights, `R` rows of `H`, `L + 1` offsets, an `[N, H]` output); the kernel
    // clamps the valid count to `R` and skips negative rows, so it reads in bounds
    // whatever the values; every view is usable on `stream`, where it is queued.
    unsafe {
        launch(
            stream,
            Kernel::unpermute(float, vector, small),
            grid,
            &params,
        )?
    };
    views.record(stream)?;
    input.status.after_call(stream)
}
