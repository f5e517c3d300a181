//! The MoE block's own kernels around the expert GEMMs: the router and the
//! activation (in `moe-kernels`, launched through the runtime's one launch layer).

use half::bf16;
use moe_kernels::{
    AddParams, AlignInverseParams, ELEMENTWISE_THREADS, GatherIdsParams, GroupedRouterParams,
    ROUTER_MAX_EXPERTS, ROUTER_MAX_GROUPS, ROUTER_MAX_TOP_K, ROUTER_THREADS, RouterParams,
    SiluMulParams,
};
use moe_runtime::cuda::{self, DeviceView, DeviceViewMut, Grid, Kernel, Stream};

use crate::{ExpertsError, GroupedRouting, Result};

fn too_small(tensor: &'static str, len: usize, want: Option<usize>) -> Result<()> {
    if want.is_none_or(|want| len < want) {
        return Err(ExpertsError::Shape {
            tensor,
            len,
            expected: match want {
                Some(want) => format!("at least {want} elements"),
                None => "a size that fits in usize".into(),
            },
        });
    }
    Ok(())
}

/// Makes `device`'s context current on this thread (what a driver or cuBLAS call
/// needs first).
pub(super) fn bind(device: &moe_runtime::cuda::CudaDevice) -> Result<()> {
    device.context().bind_to_thread().map_err(|source| {
        moe_runtime::MoeError::Driver {
            action: "make the CUDA context current",
            source,
        }
        .into()
    })
}

/// Every view usable on `stream`, named by the first that is not.
pub(super) fn check_streams(
    stream: &Stream<'_>,
    views: &[(&'static str, Option<usize>)],
) -> Result<()> {
    match views
        .iter()
        .find(|(_, bound)| bound.is_some_and(|bound| bound != stream.id()))
    {
        Some(&(tensor, Some(bound))) => Err(moe_runtime::MoeError::StreamMismatch {
            tensor,
            bound,
            call: stream.id(),
        }
        .into()),
        _ => Ok(()),
    }
}

/// The checks both routers make of a call: `N = len(logits) / E` tokens, `N * K` ids
/// and weights to write, every view (and `extra`, a router's own input) usable on
/// `stream`; `N` as a grid's count.
fn routed_tokens(
    stream: &Stream<'_>,
    logits: &DeviceView<'_, f32>,
    num_experts: usize,
    top_k: usize,
    (topk_ids, topk_weights): (&DeviceViewMut<'_, i32>, &DeviceViewMut<'_, f32>),
    extra: Option<(&'static str, Option<usize>)>,
) -> Result<u32> {
    let tokens = logits.len() / num_experts;
    too_small("topk_ids", topk_ids.len(), tokens.checked_mul(top_k))?;
    too_small(
        "topk_weights",
        topk_weights.len(),
        tokens.checked_mul(top_k),
    )?;
    let views = [
        ("logits", logits.stream()),
        ("topk_ids", topk_ids.stream()),
        ("topk_weights", topk_weights.stream()),
    ];
    check_streams(stream, &views)?;
    check_streams(stream, extra.as_slice())?;
    u32::try_from(tokens).map_err(|_| ExpertsError::Shape {
        tensor: "logits",
        len: logits.len(),
        expected: "fewer tokens than a grid can cover".into(),
    })
}

/// Routes each token from its `E` f32 logits (`[N, E]`): the `K` largest (ties to the
/// lower id), weighted by softmax probability, renormalised when `norm_topk_prob`.
/// Writes `topk_ids` and `topk_weights` (`[N, K]`), on `stream`.
pub fn router_topk(
    stream: &Stream<'_>,
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
        return Err(ExpertsError::Config(format!(
            "the GPU router takes 1..={ROUTER_MAX_EXPERTS} experts and top_k in 1..={} (got {num_experts} experts, top_k {top_k})",
            ROUTER_MAX_TOP_K
        )));
    }
    let num_tokens = routed_tokens(
        stream,
        &logits,
        num_experts,
        top_k,
        (&topk_ids, &topk_weights),
        None,
    )?;
    let params = RouterParams {
        num_tokens,
        num_experts: num_experts as u32,
        top_k: top_k as u32,
        norm_topk_prob: norm_topk_prob as u32,
        logits: logits.address(),
        topk_ids: topk_ids.address(),
        topk_weights: topk_weights.address(),
    };
    let grid = Grid {
        blocks: num_tokens.div_ceil(ROUTER_THREADS / 32),
        threads: ROUTER_THREADS,
    };
    // SAFETY: `logits` holds `N*E` f32, the outputs `N*K` each (checked above); the
    // grid is a warp per token; every view is usable on `stream`.
    unsafe { cuda::launch(stream, Kernel::RouterTopk, grid, &params)? };
    Ok(())
}

/// Routes each token from its `E` f32 logits (`[N, E]`) as DeepSeek-V3 does, the
/// function of [`crate::route_grouped`], bit for bit: sigmoid scores, `bias`
/// (`e_score_correction_bias`, `[E]`) added for the choice only, the `topk_group` best
/// groups by the sum of their two best, the `K` best experts in them, weighted by
/// their uncorrected scores (renormalised when `norm_topk_prob`) times
/// `routed_scaling_factor`. Writes `topk_ids` and `topk_weights` (`[N, K]`), on
/// `stream`.
#[allow(clippy::too_many_arguments)]
pub fn router_grouped(
    stream: &Stream<'_>,
    logits: DeviceView<'_, f32>,
    bias: DeviceView<'_, f32>,
    num_experts: usize,
    top_k: usize,
    routing: &GroupedRouting,
    norm_topk_prob: bool,
    topk_ids: DeviceViewMut<'_, i32>,
    topk_weights: DeviceViewMut<'_, f32>,
) -> Result<()> {
    if num_experts == 0
        || num_experts > ROUTER_MAX_EXPERTS as usize
        || top_k == 0
        || top_k > num_experts.min(ROUTER_MAX_TOP_K as usize)
        || routing.n_group > ROUTER_MAX_GROUPS as usize
    {
        return Err(ExpertsError::Config(format!(
            "the GPU's grouped router takes 1..={ROUTER_MAX_EXPERTS} experts in at most {ROUTER_MAX_GROUPS} groups and top_k in 1..={ROUTER_MAX_TOP_K} (got {num_experts} experts, {} groups, top_k {top_k})",
            routing.n_group
        )));
    }
    routing.check(num_experts, top_k)?;
    if bias.len() != num_experts {
        return Err(ExpertsError::Shape {
            tensor: "e_score_correction_bias",
            len: bias.len(),
            expected: format!("{num_experts} values, one per expert"),
        });
    }
    let num_tokens = routed_tokens(
        stream,
        &logits,
        num_experts,
        top_k,
        (&topk_ids, &topk_weights),
        Some(("e_score_correction_bias", bias.stream())),
    )?;
    if num_tokens == 0 {
        return Ok(());
    }
    let params = GroupedRouterParams {
        num_tokens,
        num_experts: num_experts as u32,
        top_k: top_k as u32,
        n_group: routing.n_group as u32,
        topk_group: routing.topk_group as u32,
        norm_topk_prob: norm_topk_prob as u32,
        scale_bits: routing.routed_scaling_factor.to_bits(),
        _pad: 0,
        logits: logits.address(),
        bias: bias.address(),
        topk_ids: topk_ids.address(),
        topk_weights: topk_weights.address(),
    };
    let grid = Grid {
        blocks: num_tokens.div_ceil(ROUTER_THREADS / 32),
        threads: ROUTER_THREADS,
    };
    // SAFETY: `logits` holds `N*E` f32, `bias` `E`, the outputs `N*K` each (checked
    // above); the settings are within the kernel's limits (checked above and by
    // `GroupedRouting::check`); a warp per token; every view is usable on `stream`.
    unsafe { cuda::launch(stream, Kernel::RouterGrouped, grid, &params)? };
    Ok(())
}

/// `out[i] = bf16(out[i] + other[i])` over `other`'s length (at most `out`'s), in f32
/// with one rounding, on `stream`: two bf16 tensors added.
pub fn add_bf16(
    stream: &Stream<'_>,
    other: DeviceView<'_, bf16>,
    out: DeviceViewMut<'_, bf16>,
) -> Result<()> {
    too_small("out", out.len(), Some(other.len()))?;
    check_streams(stream, &[("other", other.stream()), ("out", out.stream())])?;
    let len = other.len() as u64;
    let Ok(blocks) = u32::try_from(len.div_ceil(ELEMENTWISE_THREADS as u64)) else {
        return Err(ExpertsError::Shape {
            tensor: "out",
            len: out.len(),
            expected: "fewer elements than a grid can cover".into(),
        });
    };
    if blocks == 0 {
        return Ok(());
    }
    let params = AddParams {
        len,
        other: other.address(),
        out: out.address(),
    };
    let grid = Grid {
        blocks,
        threads: ELEMENTWISE_THREADS,
    };
    // SAFETY: both buffers hold `len` bf16 (checked above); a thread per element;
    // every view is usable on `stream`.
    unsafe { cuda::launch(stream, Kernel::AddBf16, grid, &params)? };
    Ok(())
}

/// `out [rows, I] = bf16(SiLU(gate) * up)` from `gate_up [rows, 2I]` (each row's gate
/// projection, then its up projection), in f32, on `stream`.
pub fn silu_mul(
    stream: &Stream<'_>,
    gate_up: DeviceView<'_, bf16>,
    rows: usize,
    intermediate: usize,
    out: DeviceViewMut<'_, bf16>,
) -> Result<()> {
    let elements = rows.checked_mul(intermediate);
    too_small(
        "gate_up",
        gate_up.len(),
        elements.and_then(|e| e.checked_mul(2)),
    )?;
    too_small("out", out.len(), elements)?;
    check_streams(
        stream,
        &[("gate_up", gate_up.stream()), ("out", out.stream())],
    )?;
    let elements = elements.unwrap_or(0) as u64;
    let blocks = elements.div_ceil(ELEMENTWISE_THREADS as u64);
    let (Ok(blocks), Ok(rows), Ok(columns)) = (
        u32::try_from(blocks),
        u32::try_from(rows),
        u32::try_from(intermediate),
    ) else {
        return Err(ExpertsError::Shape {
            tensor: "out",
            len: out.len(),
            expected: "fewer elements than a grid can cover".into(),
        });
    };
    let params = SiluMulParams {
        rows,
        columns,
        gate_up: gate_up.address(),
        out: out.address(),
    };
    let grid = Grid {
        blocks,
        threads: ELEMENTWISE_THREADS,
    };
    // SAFETY: `gate_up` holds `rows * 2I` and `out` `rows * I` bf16 (checked); a
    // thread per output element; every view is usable on `stream`.
    unsafe { cuda::launch(stream, Kernel::SiluMulBf16, grid, &params)? };
    Ok(())
}

/// Copies `src` into `dst` (at least as long) on `stream`.
pub fn copy_device<T: cuda::DeviceRepr>(
    stream: &Stream<'_>,
    src: DeviceView<'_, T>,
    dst: DeviceViewMut<'_, T>,
) -> Result<()> {
    too_small("dst", dst.len(), Some(src.len()))?;
    check_streams(stream, &[("src", src.stream()), ("dst", dst.stream())])?;
    Ok(src.copy_into(dst.prefix(src.len()), stream)?)
}

/// The combine index of Humming's indexed backend from align's outputs: `inv[e]` =
/// the row of entry `e` in `sorted_ids` (a value above every row for an entry align
/// dropped), and `valid[0]` = align's `num_rows_post_padded` as the i64 valid count
/// unpermute reads. On `stream`; no host wait.
pub fn align_inverse(
    stream: &Stream<'_>,
    sorted_ids: DeviceView<'_, i32>,
    num_rows_post_padded: DeviceView<'_, i32>,
    inv: DeviceViewMut<'_, i32>,
    valid: DeviceViewMut<'_, i64>,
) -> Result<()> {
    too_small("num_rows_post_padded", num_rows_post_padded.len(), Some(1))?;
    too_small("valid", valid.len(), Some(1))?;
    check_streams(
        stream,
        &[
            ("sorted_ids", sorted_ids.stream()),
            ("num_rows_post_padded", num_rows_post_padded.stream()),
            ("inv", inv.stream()),
            ("valid", valid.stream()),
        ],
    )?;
    let (Ok(entries), Ok(max_rows)) = (u32::try_from(inv.len()), u32::try_from(sorted_ids.len()))
    else {
        return Err(ExpertsError::Shape {
            tensor: "sorted_ids",
            len: sorted_ids.len(),
            expected: "fewer rows than 32-bit indices can address".into(),
        });
    };
    bind(stream.device())?;
    if !inv.is_empty() {
        // SAFETY: `inv` is `len` i32 of the stream's device, usable on `stream`
        // (checked); the fill is queued before the kernel on the same stream.
        unsafe {
            cuda::cudarc::driver::result::memset_d8_async(
                inv.address(),
                0x7f,
                inv.len() * size_of::<i32>(),
                stream.cu_stream(),
            )
        }
        .map_err(|source| moe_runtime::MoeError::Driver {
            action: "fill the combine index",
            source,
        })?;
    }
    let params = AlignInverseParams {
        sorted_ids: sorted_ids.address(),
        rows_used: num_rows_post_padded.address(),
        inv: inv.address(),
        valid: valid.address(),
        entries,
        max_rows,
    };
    let grid = Grid {
        blocks: max_rows.div_ceil(ELEMENTWISE_THREADS).max(1),
        threads: ELEMENTWISE_THREADS,
    };
    // SAFETY: `sorted_ids` holds `max_rows` and `inv` `entries` i32, `valid` one i64,
    // `num_rows_post_padded` one i32 (checked); a thread per row; every view is usable
    // on `stream`.
    unsafe { cuda::launch(stream, Kernel::AlignInverse, grid, &params)? };
    Ok(())
}

/// `out[r] = src[index[r]]` for every `r` of `out`, or -1 where `index[r]` is negative
/// or not below `src.len()`: with `src` = `topk_ids` and `index` = permute's
/// `permuted_idx`, each permuted row's global expert (-1 past the kept rows). On
/// `stream`; no host wait.
pub fn gather_ids(
    stream: &Stream<'_>,
    src: DeviceView<'_, i32>,
    index: DeviceView<'_, i32>,
    out: DeviceViewMut<'_, i32>,
) -> Result<()> {
    too_small("index", index.len(), Some(out.len()))?;
    check_streams(
        stream,
        &[
            ("src", src.stream()),
            ("index", index.stream()),
            ("out", out.stream()),
        ],
    )?;
    let (Ok(src_len), Ok(rows)) = (u32::try_from(src.len()), u32::try_from(out.len())) else {
        return Err(ExpertsError::Shape {
            tensor: "gather_ids",
            len: src.len().max(out.len()),
            expected: "fewer elements than 32-bit indices can address".into(),
        });
    };
    if rows == 0 {
        return Ok(());
    }
    bind(stream.device())?;
    let params = GatherIdsParams {
        src: src.address(),
        index: index.address(),
        out: out.address(),
        src_len,
        rows,
    };
    let grid = Grid {
        blocks: rows.div_ceil(ELEMENTWISE_THREADS),
        threads: ELEMENTWISE_THREADS,
    };
    // SAFETY: `src` holds `src_len` i32 and `index` and `out` at least `rows` (checked);
    // a thread per row, every index bounded by `src_len` in the kernel; every view is
    // usable on `stream`.
    unsafe { cuda::launch(stream, Kernel::GatherIds, grid, &params)? };
    Ok(())
}
