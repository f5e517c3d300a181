//! The MoE block's element-wise steps on the GPU: the router and the activation.

use moe_kernels::kernels;
use moe_kernels::{
    ELEMENTWISE_THREADS, ROUTER_MAX_EXPERTS, ROUTER_MAX_TOP_K, ROUTER_THREADS, RouterParams,
    SiluMulParams,
};

use super::device::CudaDevice;
use super::launch::launch;
use super::memory::{DeviceView, DeviceViewMut};
use crate::{MoeError, Result};

fn too_small(tensor: &'static str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(MoeError::Shape {
            tensor,
            len,
            expected: format!("at least {want} elements"),
        });
    }
    Ok(())
}

/// Routes each token from its `E` f32 logits (`[N, E]`): the `K` largest (ties to the
/// lower id), weighted by softmax probability, renormalised when `norm_topk_prob`.
/// Writes `topk_ids` and `topk_weights` (`[N, K]`).
pub fn router_topk(
    device: &CudaDevice,
    logits: DeviceView<'_, f32>,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    topk_ids: DeviceViewMut<'_, i32>,
    topk_weights: DeviceViewMut<'_, f32>,
) -> Result<()> {
    if num_experts == 0
        || num_experts > ROUTER_MAX_EXPERTS as usize
        || top_k == 0
        || top_k > num_experts.min(ROUTER_MAX_TOP_K as usize)
    {
        return Err(MoeError::Shape {
            tensor: "logits",
            len: num_experts,
            expected: format!(
                "1..={ROUTER_MAX_EXPERTS} experts and top_k in 1..={} (got {top_k})",
                ROUTER_MAX_TOP_K
            ),
        });
    }
    let tokens = logits.len() / num_experts;
    too_small("topk_ids", topk_ids.len(), tokens * top_k)?;
    too_small("topk_weights", topk_weights.len(), tokens * top_k)?;
    let params = RouterParams {
        num_tokens: tokens as u32,
        num_experts: num_experts as u32,
        top_k: top_k as u32,
        norm_topk_prob: norm_topk_prob as u32,
        logits: logits.address(),
        topk_ids: topk_ids.address(),
        topk_weights: topk_weights.address(),
    };
    let blocks = (tokens as u32).div_ceil(ROUTER_THREADS / 32);
    launch(
        device,
        kernels::ROUTER_TOPK,
        blocks,
        ROUTER_THREADS,
        &params,
    )
}

/// `out [rows, I] = bf16(SiLU(gate) * up)` from `gate_up [rows, 2I]` (each row's gate
/// projection, then its up projection), in f32.
pub fn silu_mul(
    device: &CudaDevice,
    gate_up: DeviceView<'_, half::bf16>,
    rows: usize,
    intermediate: usize,
    out: DeviceViewMut<'_, half::bf16>,
) -> Result<()> {
    too_small("gate_up", gate_up.len(), rows * 2 * intermediate)?;
    too_small("out", out.len(), rows * intermediate)?;
    let params = SiluMulParams {
        rows: rows as u32,
        columns: intermediate as u32,
        gate_up: gate_up.address(),
        out: out.address(),
    };
    let blocks = ((rows * intermediate) as u64).div_ceil(ELEMENTWISE_THREADS as u64);
    if blocks > u32::MAX as u64 {
        return Err(MoeError::Shape {
            tensor: "out",
            len: rows * intermediate,
            expected: "fewer elements than a grid can cover".into(),
        });
    }
    launch(
        device,
        kernels::SILU_MUL_BF16,
        blocks as u32,
        ELEMENTWISE_THREADS,
        &params,
    )
}

/// Copies `src` into `dst` (at least as long) on `device`'s stream.
pub fn copy_device<T: cudarc::driver::DeviceRepr>(
    device: &CudaDevice,
    src: DeviceView<'_, T>,
    dst: DeviceViewMut<'_, T>,
) -> Result<()> {
    too_small("dst", dst.len(), src.len())?;
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: both ranges are device memory of at least `src.len()` elements (checked
    // above); the views' borrows keep them alive and unaliased during the copy.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            dst.address(),
            src.address(),
            src.len() * size_of::<T>(),
            device.stream().cu_stream(),
        )
    }
    .map_err(super::device::driver_error("copy device memory"))
}
