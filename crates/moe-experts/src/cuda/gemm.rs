//! The expert GEMMs on the project's own tensor-core kernels: one launch for every
//! expert, each row tile's expert read from `expert_first_token_offset` on the
//! device, so the host never learns the group sizes (no wait, graph-capturable).

use half::bf16;
use moe_kernels::{GEMM_ALIGN, GEMM_BM, GEMM_BN, GEMM_THREADS, GroupedGemmParams};
use moe_runtime::cuda::{self, DeviceView, DeviceViewMut, Grid, Kernel, Stream};

use super::kernels::check_streams;
use crate::{ExpertsError, Result};

/// What the GEMM writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmEpilogue {
    /// `c = a * b[e]^T`: the down projection.
    Plain,
    /// `c = bf16(SiLU(bf16(a * gate[e]^T)) * bf16(a * up[e]^T))`, with `b[e]` the gate
    /// rows then the up rows (`[2N, K]`): the gate/up projection and the activation in
    /// one kernel, what the two GEMMs and `silu_mul` compute.
    SiluMul,
}

/// The shape of a grouped GEMM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedGemmShape {
    /// Rows of `a` and `c` (the permuted rows, `N * K`): an upper bound of the valid
    /// count, which only the device knows.
    pub max_rows: usize,
    /// Output columns (`2I` gate and up rows give `I`).
    pub n: usize,
    /// The reduction depth.
    pub k: usize,
}

/// `c[r] = a[r] * b[e]^T` for every local expert `e` and its rows
/// `offsets[e]..offsets[e + 1]` of `a` (`[max_rows, K]` bf16, in expert order), with
/// `b` the experts' weights (`[L, N, K]`, or `[L, 2N, K]` for [`GemmEpilogue::SiluMul`])
/// and `c` `[max_rows, N]` bf16; rows past the valid count are not written. Queued on
/// `stream`; no host wait. `N` and `K` must be multiples of 8 (bf16 rows of whole
/// 16-byte chunks), or the call is refused before launch.
pub fn grouped_gemm(
    stream: &Stream<'_>,
    epilogue: GemmEpilogue,
    shape: GroupedGemmShape,
    a: DeviceView<'_, bf16>,
    b: DeviceView<'_, bf16>,
    offsets: DeviceView<'_, i64>,
    c: DeviceViewMut<'_, bf16>,
) -> Result<()> {
    let GroupedGemmShape { max_rows, n, k } = shape;
    let align = GEMM_ALIGN as usize;
    if n == 0 || k == 0 || n % align != 0 || k % align != 0 {
        return Err(ExpertsError::Config(format!(
            "the grouped GEMM needs N and K to be non-zero multiples of {align}, got N = {n}, \
             K = {k} (the model's hidden and intermediate sizes)"
        )));
    }
    let Some(experts) = offsets.len().checked_sub(1).filter(|&l| l > 0) else {
        return Err(ExpertsError::Shape {
            tensor: "expert_first_token_offset",
            len: offsets.len(),
            expected: "L + 1 values for L >= 1 local experts".into(),
        });
    };
    let gated = epilogue == GemmEpilogue::SiluMul;
    let weight_rows = if gated { 2 * n } else { n };
    let exact = |tensor: &'static str, len: usize, want: Option<usize>, at_least: bool| {
        let ok = want.is_some_and(|want| if at_least { len >= want } else { len == want });
        if ok {
            Ok(())
        } else {
            Err(ExpertsError::Shape {
                tensor,
                len,
                expected: match want {
                    Some(want) if at_least => format!("at least {want} elements"),
                    Some(want) => format!("{want} elements ({experts} experts' weights)"),
                    None => "a size that fits in usize".into(),
                },
            })
        }
    };
    exact("a", a.len(), max_rows.checked_mul(k), true)?;
    exact("c", c.len(), max_rows.checked_mul(n), true)?;
    let weights = experts
        .checked_mul(weight_rows)
        .and_then(|x| x.checked_mul(k));
    exact("b", b.len(), weights, false)?;
    check_streams(
        stream,
        &[
            ("a", a.stream()),
            ("b", b.stream()),
            ("expert_first_token_offset", offsets.stream()),
            ("c", c.stream()),
        ],
    )?;
    if max_rows == 0 {
        return Ok(());
    }
    // Every expert adds at most one partial tile to the full ones.
    let m_slots = max_rows.div_ceil(GEMM_BM as usize) + experts.min(max_rows);
    let columns_per_tile = if gated { GEMM_BN / 2 } else { GEMM_BN } as usize;
    let n_tiles = n.div_ceil(columns_per_tile);
    let too_large = || ExpertsError::Shape {
        tensor: "a",
        len: a.len(),
        expected: "fewer rows and columns than a grid and 32-bit indices can cover".into(),
    };
    let blocks = m_slots.checked_mul(n_tiles).ok_or_else(too_large)?;
    let (Ok(blocks), Ok(m_slots), Ok(num_experts), Ok(_), Ok(k32), Ok(rows)) = (
        u32::try_from(blocks),
        u32::try_from(m_slots),
        u32::try_from(experts),
        u32::try_from(weight_rows),
        u32::try_from(k),
        u32::try_from(max_rows),
    ) else {
        return Err(too_large());
    };
    if blocks > i32::MAX as u32 {
        return Err(too_large());
    }
    let params = GroupedGemmParams {
        a: a.address(),
        b: b.address(),
        c: c.address(),
        offsets: offsets.address(),
        num_experts,
        m_slots,
        n: n as u32,
        k: k32,
        max_rows: rows,
        reserved: 0,
    };
    let kernel = if gated {
        Kernel::GroupedGemmSiluBf16
    } else {
        Kernel::GroupedGemmBf16
    };
    let grid = Grid {
        blocks,
        threads: GEMM_THREADS,
    };
    // SAFETY: `a` holds `max_rows * K`, `c` `max_rows * N` and `b` `L * N_w * K` bf16,
    // `offsets` `L + 1` i64 (checked); the kernel clamps every offset to
    // `0..=max_rows`, and its 32-bit row and column indices fit (checked); every view
    // is usable on `stream`.
    unsafe { cuda::launch(stream, kernel, grid, &params)? };
    Ok(())
}
