//! The expert GEMMs on the project's own tensor-core kernels: one launch for every
//! expert, each row tile's expert read from `expert_first_token_offset` on the
//! device, so the host never learns the group sizes (no wait, graph-capturable).

use half::bf16;
use moe_kernels::{
    ELEMENTWISE_THREADS, GEMM_ALIGN, GEMM_BK, GEMM_BM, GEMM_BN, GEMM_THREADS, GemmReduceParams,
    GroupedGemmParams,
};
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
    /// Slices of `K` computed by separate blocks (1: none; see [`split_k`]). With more
    /// than one, the call needs an f32 workspace for the partial sums and adds a second
    /// launch that sums them.
    pub splits: usize,
}

/// The buffers of a grouped GEMM call.
#[derive(Debug)]
pub struct GroupedGemmOperands<'a> {
    /// `[max_rows, K]` bf16 rows, in expert order.
    pub a: DeviceView<'a, bf16>,
    /// `[L, N, K]` bf16 weights (`[L, 2N, K]` for [`GemmEpilogue::SiluMul`]).
    pub b: DeviceView<'a, bf16>,
    /// Where each row tile's expert comes from.
    pub tiles: RowTiles<'a>,
    /// `[max_rows, N]` bf16 output.
    pub c: DeviceViewMut<'a, bf16>,
    /// The f32 workspace of a split call ([`split_workspace_len`] elements at least);
    /// `None` without splits.
    pub partials: Option<DeviceViewMut<'a, f32>>,
}

/// How a grouped GEMM finds each row tile's expert, on the device.
#[derive(Debug)]
pub enum RowTiles<'a> {
    /// Rows in expert order (permute's): `[L + 1]` `expert_first_token_offset`.
    Offsets(DeviceView<'a, i64>),
    /// Rows in align's order, padded per expert to [`GEMM_BM`] (align run with that
    /// block size): Humming's indexed backend.
    Aligned(AlignedRows<'a>),
}

/// The outputs of `align` (block size [`GEMM_BM`]) a GEMM over its order reads.
#[derive(Debug)]
pub struct AlignedRows<'a> {
    /// `[max_rows / 64]` i32: each 64-row tile's expert, negative past the used rows.
    pub block_expert_ids: DeviceView<'a, i32>,
    /// One i32: the rows align used.
    pub num_rows_post_padded: DeviceView<'a, i32>,
    /// `L`, the experts the weights hold.
    pub num_experts: usize,
    /// `Some((sorted_ids, topk))`: `a` is the tokens' hidden states `[tokens, K]`, and
    /// row `r` of the GEMM reads token `sorted_ids[r] / topk` (zeros for align's
    /// padding, entries of `tokens * topk` and more); `None`: `a` is already in align's
    /// order.
    pub gather: Option<(DeviceView<'a, i32>, usize)>,
}

/// Most slices [`split_k`] chooses.
pub const MAX_SPLITS: usize = 8;
/// [`split_k`] splits calls of at most this many rows (decode sizes).
pub const SPLIT_MAX_ROWS: usize = 16;

/// f32 elements of the workspace a call of `shape` needs (0 without splits).
pub fn split_workspace_len(epilogue: GemmEpilogue, shape: GroupedGemmShape) -> usize {
    if shape.splits <= 1 {
        return 0;
    }
    let width = match epilogue {
        GemmEpilogue::Plain => shape.n,
        GemmEpilogue::SiluMul => 2 * shape.n,
    };
    shape.splits * shape.max_rows * width
}

/// Slices of `K` for a call of `max_rows` rows over `experts` experts on a GPU of
/// `multiprocessors` SMs: at decode sizes a grouped GEMM can have fewer blocks than the
/// GPU holds at once (three an SM), and each block then walks all of `K` alone, with
/// the SMs it leaves idle; splitting `K` fills them. 1 when the grid already fills the
/// GPU twice, for more than [`SPLIT_MAX_ROWS`] rows, or when a slice would have fewer
/// than four k-tiles.
pub fn split_k(
    epilogue: GemmEpilogue,
    (max_rows, n, k): (usize, usize, usize),
    experts: usize,
    multiprocessors: usize,
) -> usize {
    if max_rows == 0 || max_rows > SPLIT_MAX_ROWS {
        return 1;
    }
    let columns_per_tile = match epilogue {
        GemmEpilogue::Plain => GEMM_BN,
        GemmEpilogue::SiluMul => GEMM_BN / 2,
    } as usize;
    // Row tiles the call can have: one an expert with rows, at most.
    let tiles = experts.min(max_rows).max(1) * n.div_ceil(columns_per_tile);
    let target = 2 * 3 * multiprocessors;
    let by_grid = target.div_ceil(tiles);
    let by_depth = (k.div_ceil(GEMM_BK as usize) / 4).max(1);
    by_grid.min(by_depth).clamp(1, MAX_SPLITS)
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
    operands: GroupedGemmOperands<'_>,
) -> Result<()> {
    let GroupedGemmOperands {
        a,
        b,
        tiles,
        c,
        partials,
    } = operands;
    let GroupedGemmShape {
        max_rows,
        n,
        k,
        splits,
    } = shape;
    if !(1..=64).contains(&splits) {
        return Err(ExpertsError::Config(format!(
            "a grouped GEMM is split into 1 to 64 slices of K, not {splits}"
        )));
    }
    let align = GEMM_ALIGN as usize;
    if n == 0 || k == 0 || n % align != 0 || k % align != 0 {
        return Err(ExpertsError::Config(format!(
            "the grouped GEMM needs N and K to be non-zero multiples of {align}, got N = {n}, \
             K = {k} (the model's hidden and intermediate sizes)"
        )));
    }
    // The tiles' source: (experts, offsets, tile experts, rows used, gather).
    let (experts, offsets, aligned) = match &tiles {
        RowTiles::Offsets(offsets) => {
            let Some(experts) = offsets.len().checked_sub(1).filter(|&l| l > 0) else {
                return Err(ExpertsError::Shape {
                    tensor: "expert_first_token_offset",
                    len: offsets.len(),
                    expected: "L + 1 values for L >= 1 local experts".into(),
                });
            };
            (experts, Some(*offsets), None)
        }
        RowTiles::Aligned(rows) => {
            if rows.num_experts == 0 || splits != 1 {
                return Err(ExpertsError::Config(
                    "a GEMM in align's order needs experts and takes no slices of K".into(),
                ));
            }
            (rows.num_experts, None, Some(rows))
        }
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
    let gathered = aligned.is_some_and(|rows| rows.gather.is_some());
    if gathered {
        // The tokens' rows, whole ones.
        exact("a", a.len(), Some(a.len() / k * k), false)?;
    } else {
        exact("a", a.len(), max_rows.checked_mul(k), true)?;
    }
    exact("c", c.len(), max_rows.checked_mul(n), true)?;
    let weights = experts
        .checked_mul(weight_rows)
        .and_then(|x| x.checked_mul(k));
    exact("b", b.len(), weights, false)?;
    let partials_address = if splits > 1 {
        let Some(partials) = &partials else {
            return Err(ExpertsError::Config(
                "a split grouped GEMM needs a workspace for its partial sums".into(),
            ));
        };
        let want = splits
            .checked_mul(max_rows)
            .and_then(|x| x.checked_mul(weight_rows));
        exact("partials", partials.len(), want, true)?;
        check_streams(stream, &[("partials", partials.stream())])?;
        partials.address()
    } else {
        0
    };
    check_streams(
        stream,
        &[("a", a.stream()), ("b", b.stream()), ("c", c.stream())],
    )?;
    let (mut tile_experts, mut rows_used, mut sorted_ids, mut topk, mut entries) =
        (0, 0, 0, 0u32, 0u32);
    let m_slots = match (offsets, aligned) {
        (Some(offsets), _) => {
            check_streams(stream, &[("expert_first_token_offset", offsets.stream())])?;
            // Every expert adds at most one partial tile to the full ones.
            max_rows.div_ceil(GEMM_BM as usize) + experts.min(max_rows)
        }
        (None, Some(rows)) => {
            let tiles = max_rows.div_ceil(GEMM_BM as usize);
            exact(
                "block_expert_ids",
                rows.block_expert_ids.len(),
                Some(tiles),
                true,
            )?;
            exact(
                "num_rows_post_padded",
                rows.num_rows_post_padded.len(),
                Some(1),
                true,
            )?;
            check_streams(
                stream,
                &[
                    ("block_expert_ids", rows.block_expert_ids.stream()),
                    ("num_rows_post_padded", rows.num_rows_post_padded.stream()),
                ],
            )?;
            tile_experts = rows.block_expert_ids.address();
            rows_used = rows.num_rows_post_padded.address();
            if let Some((ids, k_route)) = &rows.gather {
                exact("sorted_ids", ids.len(), Some(max_rows), true)?;
                check_streams(stream, &[("sorted_ids", ids.stream())])?;
                // `a` holds the tokens; align pads with `tokens * topk`.
                let tokens = a.len() / k;
                let (Ok(t), Ok(e)) = (
                    u32::try_from(*k_route),
                    u32::try_from(tokens.saturating_mul(*k_route)),
                ) else {
                    return Err(ExpertsError::Config(
                        "the routing's entries do not fit in 32 bits".into(),
                    ));
                };
                if t == 0 {
                    return Err(ExpertsError::Config("a gather needs top_k >= 1".into()));
                }
                (sorted_ids, topk, entries) = (ids.address(), t, e);
            }
            tiles
        }
        (None, None) => unreachable!("every RowTiles has a source"),
    };
    if max_rows == 0 {
        return Ok(());
    }
    let columns_per_tile = if gated { GEMM_BN / 2 } else { GEMM_BN } as usize;
    let n_tiles = n.div_ceil(columns_per_tile);
    let too_large = || ExpertsError::Shape {
        tensor: "a",
        len: a.len(),
        expected: "fewer rows and columns than a grid and 32-bit indices can cover".into(),
    };
    let blocks = m_slots
        .checked_mul(n_tiles)
        .and_then(|x| x.checked_mul(splits))
        .ok_or_else(too_large)?;
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
        offsets: offsets.map_or(0, |o| o.address()),
        num_experts,
        m_slots,
        n: n as u32,
        k: k32,
        max_rows: rows,
        splits: splits as u32,
        partials: partials_address,
        tile_experts,
        rows_used,
        sorted_ids,
        topk,
        entries,
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
    // `offsets` `L + 1` i64, `partials` (split) `splits * max_rows * N_w` f32
    // (checked); the kernel clamps every offset to `0..=max_rows`, and its 32-bit row
    // and column indices fit (checked); every view is usable on `stream`.
    unsafe { cuda::launch(stream, kernel, grid, &params)? };
    if splits > 1 {
        let elements = (max_rows * n) as u64;
        let reduce = GemmReduceParams {
            partials: partials_address,
            c: params.c,
            offsets: params.offsets,
            num_experts,
            max_rows: rows,
            n: n as u32,
            splits: splits as u32,
        };
        let grid = Grid {
            blocks: u32::try_from(elements.div_ceil(ELEMENTWISE_THREADS as u64))
                .map_err(|_| too_large())?,
            threads: ELEMENTWISE_THREADS,
        };
        let kernel = if gated {
            Kernel::GemmReduceSiluBf16
        } else {
            Kernel::GemmReduceBf16
        };
        // SAFETY: the same buffers, checked above; a thread per element of `c`, rows
        // past the valid count left alone; queued after the GEMM on the same stream.
        unsafe { cuda::launch(stream, kernel, grid, &reduce)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_fills_the_gpu_at_decode_sizes_only() {
        // Mixtral's down projection for one token: 2 experts x 32 column tiles on 132
        // SMs (396 resident blocks) is split; its gate/up projection already has 448
        // tiles, so only a little.
        assert!(split_k(GemmEpilogue::Plain, (2, 4096, 14336), 8, 132) >= 4);
        assert!(split_k(GemmEpilogue::SiluMul, (2, 14336, 4096), 8, 132) <= 2);
        // More rows than decode, a short K, no rows: not split.
        assert_eq!(split_k(GemmEpilogue::Plain, (17, 4096, 14336), 8, 132), 1);
        assert_eq!(split_k(GemmEpilogue::Plain, (2, 4096, 128), 8, 132), 1);
        assert_eq!(split_k(GemmEpilogue::Plain, (0, 4096, 14336), 8, 132), 1);
        // Never more than MAX_SPLITS, whatever the GPU.
        assert_eq!(
            split_k(GemmEpilogue::Plain, (1, 128, 1 << 20), 1, 10_000),
            MAX_SPLITS
        );
        let shape = GroupedGemmShape {
            max_rows: 3,
            n: 64,
            k: 256,
            splits: 4,
        };
        assert_eq!(
            split_workspace_len(GemmEpilogue::SiluMul, shape),
            4 * 3 * 128
        );
        assert_eq!(
            split_workspace_len(GemmEpilogue::Plain, GroupedGemmShape { splits: 1, ..shape }),
            0
        );
    }
}
