//! `#[repr(C)]` argument blocks shared by the kernels and the host launches.
//!
//! Every kernel takes one of these by value (a PTX `.param` aggregate), so host and
//! device read the same bytes through the same definition. Device pointers travel
//! as `u64` (CUDA's `CUdeviceptr`); 0 means "absent" where a field says so. All counts
//! are `u32`: the runtime validates every call first (`N*K` and every padded length
//! fit in `i32`), so nothing here can overflow.

/// Threads in a block of the routing kernels: 16 warps.
pub const ROUTE_THREADS: u32 = 512;
/// Warps in a block of the routing kernels.
pub const ROUTE_WARPS: u32 = ROUTE_THREADS / 32;
/// Entries one routing block sorts. A call with at most this many entries is routed
/// by a single block, in a single launch.
pub const ROUTE_CHUNK: u32 = 4096;
/// The most local experts the routing kernels handle: their per-warp counters live in
/// shared memory (`ROUTE_WARPS * MAX_LOCAL_EXPERTS` 16-bit counts).
pub const MAX_LOCAL_EXPERTS: u32 = 1024;
/// Threads in a block of the row kernels (permute rows, unpermute).
pub const ROW_THREADS: u32 = 128;
/// Vectors of a row each thread of `permute_rows_*` copies.
pub const PERMUTE_VECTORS_PER_THREAD: u32 = 2;
/// Vectors of a row each thread of `unpermute_*` sums.
pub const UNPERMUTE_VECTORS_PER_THREAD: u32 = 1;
/// The fewest choices a token needs for unpermute to read its rows all at once.
pub const UNPERMUTE_SMALL_MIN_TOPK: u32 = 4;
/// The most entries (`N*K`) for which unpermute reads each token's rows all at once.
pub const UNPERMUTE_SMALL_MAX_ENTRIES: u32 = 8192;

/// Whether unpermute reads each token's rows all at once (`unpermute_*_small`)
/// rather than one after another. Measured on an H200 (`moe bench`, docs/kernels.md):
/// for top-8 it takes 0.55-0.68x the time up to 64 tokens and 0.62-1.00x from 128 to
/// 1024 (8192 entries), and 1.12-1.13x at 2048, where the grid has warps enough to
/// hide a row read's latency and the extra registers cost occupancy; for top-2 it is
/// 1.08-2.1x slower at every size (two rows give little to overlap). Top-3 to top-7 were not
/// measured: from 4 choices on the rows to overlap are taken to pay, as for top-8.
pub const fn unpermute_reads_rows_at_once(num_tokens: u32, topk: u32) -> bool {
    topk >= UNPERMUTE_SMALL_MIN_TOPK
        && (num_tokens as u64) * (topk as u64) <= UNPERMUTE_SMALL_MAX_ENTRIES as u64
}

/// Blocks a row kernel's grid aims at: enough to fill every multiprocessor of an
/// H100 or H200 several times over.
pub const ROW_GRID_TARGET: u32 = 1024;

/// Blocks of [`ROW_THREADS`] that share one row of `vectors` vectors in a call of
/// `num_tokens` tokens: as many as the row allows (`per_thread` vectors a thread) while
/// the grid is small, so that one token's work still spreads over many
/// multiprocessors; one block per row once there are enough tokens, so that large
/// calls do not pay for many tiny blocks. A row kernel's grid is
/// `num_tokens * blocks_per_row(..)`; each block strides over its share of the row.
pub const fn blocks_per_row(vectors: u32, per_thread: u32, num_tokens: u32) -> u32 {
    let most = vectors.div_ceil(ROW_THREADS * per_thread);
    let wanted = ROW_GRID_TARGET.div_ceil(if num_tokens == 0 { 1 } else { num_tokens });
    let blocks = if most < wanted { most } else { wanted };
    if blocks == 0 { 1 } else { blocks }
}

/// The routing shape of one call: `N` tokens, each choosing `K` of `E` global experts,
/// of which `L` live on this rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoutingDims {
    /// `N`, tokens in this call.
    pub num_tokens: u32,
    /// `K`, experts chosen by each token.
    pub topk: u32,
    /// `E`, global experts: valid ids are `0..E`.
    pub num_experts: u32,
    /// `L`, experts on this rank: local ids are `0..L`.
    pub num_local_experts: u32,
}

impl RoutingDims {
    /// `N*K`: the number of `(token, choice)` entries, and the sentinel that marks a
    /// dropped entry in `inv_permuted_idx`, `permuted_idx` and `sorted_ids`.
    pub const fn num_entries(&self) -> u32 {
        self.num_tokens * self.topk
    }
}

/// How one row of hidden states is laid out in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowLayout {
    /// Bytes in one row: `H * size_of(dtype)`.
    pub row_bytes: u32,
    /// `S`, per-token scales (`f32`) that travel with each row; 0 when there are none.
    pub scale_columns: u32,
}

/// Parameters of the index-only `align` operation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlignDims {
    /// Each expert's group is padded up to a multiple of this many rows; 1 for permute.
    pub block_size: u32,
    /// Length of the `sorted_ids` view for this call:
    /// `N*K + min(L, N*K) * (block_size - 1)`; 0 for permute.
    pub max_padded_rows: u32,
}

/// Arguments of the routing kernels (`route_count_*`, `route_scan`, `route_place_*`):
/// the counting sort of entries by local expert, for permute or for align.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteParams {
    /// `N`, `K`, `E` and `L` of the call.
    pub dims: RoutingDims,
    /// The block size and padded length for align; `{ 1, 0 }` for permute.
    pub align: AlignDims,
    /// Entries each block sorts: [`ROUTE_CHUNK`], or `N*K` when one block does all.
    pub chunk_entries: u32,
    /// Blocks of the count and place kernels: `ceil(N*K / chunk_entries)`.
    pub num_chunks: u32,
    /// `[N, K]` global expert ids, i32 or i64 as the kernel's name says.
    pub topk_ids: u64,
    /// `[E]` i32 global-to-local map; 0 when there is none (then `L == E`).
    pub expert_map: u64,
    /// `[num_chunks, L]` u32: counts per block, then each block's first row per expert.
    /// Unused when `num_chunks == 1`.
    pub chunk_counts: u64,
    /// `[L + 1]` i64: first row of each expert (padded rows for align).
    pub expert_offsets: u64,
    /// permute: `[N*K]` i32 row of each entry, `N*K` when dropped.
    pub inv_permuted_idx: u64,
    /// permute: `[N*K]` i32 entry of each row, `N*K` after the valid rows.
    pub permuted_idx: u64,
    /// align: `[max_padded_rows]` i32.
    pub sorted_ids: u64,
    /// align: `[ceil(max_padded_rows / block_size)]` i32.
    pub block_expert_ids: u64,
    /// align: `[1]` i32, the padded row count.
    pub num_rows_post_padded: u64,
    /// The call's [`StatusBlock::call`] word: `(call id << 8) | op`.
    pub call: u64,
    /// The [`StatusBlock`] a malformed `expert_map` entry is reported in.
    pub status: u64,
}

/// Arguments of `permute_rows_*`: the scatter of each source row to its `K` rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermuteRowsParams {
    /// `N`, `K`, `E` and `L` of the call.
    pub dims: RoutingDims,
    /// How each row moved is laid out: its bytes and scale columns.
    pub layout: RowLayout,
    /// `[N, H]` source rows.
    pub hidden_states: u64,
    /// `[N, S]` f32 scales; 0 when `scale_columns == 0`.
    pub scales: u64,
    /// `[N*K]` i32 from the routing kernels.
    pub inv_permuted_idx: u64,
    /// `[L + 1]` i64 from the routing kernels: the last element is the valid count.
    pub expert_offsets: u64,
    /// `[N*K, H]` destination rows.
    pub permuted_hidden_states: u64,
    /// `[N*K, S]` destination scales; 0 when `scale_columns == 0`.
    pub permuted_scales: u64,
}

/// Arguments of `unpermute_*`: each token's weighted sum of its kept expert rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnpermuteParams {
    /// `N` tokens of `K` entries.
    pub num_tokens: u32,
    /// `K`, entries per token.
    pub topk: u32,
    /// `H`, elements in a row.
    pub hidden_size: u32,
    /// Rows of `permuted_hidden_states`: the valid count is clamped to it.
    pub num_rows: u32,
    /// Elements of `expert_offsets` (`L + 1`): its last element is the valid count.
    pub num_offsets: u32,
    /// Explicit padding: the block has no implicit padding bytes.
    pub _pad: u32,
    /// The call's [`StatusBlock::call`] word: `(call id << 8) | op`.
    pub call: u64,
    /// The [`StatusBlock`] a bad valid count or a negative row index is reported in.
    pub status: u64,
    /// `[R, H]` expert outputs in permuted order.
    pub permuted_hidden_states: u64,
    /// `[N*K]` i32.
    pub inv_permuted_idx: u64,
    /// `[L + 1]` i64.
    pub expert_offsets: u64,
    /// `[N*K]` f32.
    pub topk_weights: u64,
    /// `[N, H]` output.
    pub output: u64,
}

/// Bytes of a [`StatusBlock`] in device memory.
pub const STATUS_BYTES: usize = 64;
/// The value of every word of a clear [`StatusBlock`] (a `0xFF` byte fill).
pub const STATUS_CLEAR: u64 = u64::MAX;

/// Which operation a [`StatusBlock::call`] word names (its low 8 bits).
pub mod status_op {
    /// A permute call (it reports a malformed `expert_map` entry).
    pub const PERMUTE: u64 = 1;
    /// An align call (it reports a malformed `expert_map` entry).
    pub const ALIGN: u64 = 2;
    /// An unpermute call (it reports a bad valid count or a negative row index).
    pub const UNPERMUTE: u64 = 3;
}

/// Where kernels record bad input the host could not see without reading device
/// memory: a malformed `expert_map` entry (permute, align), a valid count outside
/// the rows given or a negative row index (unpermute).
///
/// Every word is [`STATUS_CLEAR`] until something is reported. The first call that
/// reports takes [`Self::call`] (compare-and-swap); reports of later calls with
/// another call word are dropped, so the block holds the first failing call's
/// error. Within a call, each slot keeps the lowest position (an atomic minimum over
/// `position << 32 | value`), as the CPU reports the first offending element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusBlock {
    /// `(call id << 8) | op` of the first call that reported ([`status_op`]).
    pub call: u64,
    /// `index << 32 | value as u32` of the lowest malformed `expert_map` entry.
    pub map_entry: u64,
    /// `L`: local ids must be `-1` or in `0..L`.
    pub map_bound: u64,
    /// The valid count `expert_first_token_offset[L]` as read (i64 bits).
    pub valid_count: u64,
    /// `position << 32 | rows`: the offset's index (`L`) and the rows given.
    pub valid_bound: u64,
    /// `position << 32 | value as u32` of the lowest negative `inv_permuted_idx` entry.
    pub inv_entry: u64,
    /// Pads the block to [`STATUS_BYTES`]; no kernel writes it.
    pub _reserved: [u64; 2],
}

impl StatusBlock {
    // Word indices of the fields, for the kernels' atomics.
    /// Word index of [`Self::call`].
    pub const CALL: usize = 0;
    /// Word index of [`Self::map_entry`].
    pub const MAP_ENTRY: usize = 1;
    /// Word index of [`Self::map_bound`].
    pub const MAP_BOUND: usize = 2;
    /// Word index of [`Self::valid_count`].
    pub const VALID_COUNT: usize = 3;
    /// Word index of [`Self::valid_bound`].
    pub const VALID_BOUND: usize = 4;
    /// Word index of [`Self::inv_entry`].
    pub const INV_ENTRY: usize = 5;

    /// A block read back from the device, from its `STATUS_BYTES / 8` words.
    pub const fn from_words(words: [u64; STATUS_BYTES / 8]) -> Self {
        Self {
            call: words[Self::CALL],
            map_entry: words[Self::MAP_ENTRY],
            map_bound: words[Self::MAP_BOUND],
            valid_count: words[Self::VALID_COUNT],
            valid_bound: words[Self::VALID_BOUND],
            inv_entry: words[Self::INV_ENTRY],
            _reserved: [words[6], words[7]],
        }
    }
}

/// Threads in a block of `router_topk`: one warp per token.
pub const ROUTER_THREADS: u32 = 128;
/// The most experts a token may choose on the GPU router.
pub const ROUTER_MAX_TOP_K: u32 = 32;
/// The most experts the GPU router handles (its chosen-set bitmask is in shared
/// memory, one per warp).
pub const ROUTER_MAX_EXPERTS: u32 = 1024;
/// Threads in a block of `silu_mul_bf16`.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// Arguments of `router_topk`: softmax over each token's logits, top-k, optional
/// renormalisation (the MoE block's router).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouterParams {
    /// `N`, tokens to route.
    pub num_tokens: u32,
    /// `E`, logits per token.
    pub num_experts: u32,
    /// `K`, at most [`ROUTER_MAX_TOP_K`] and `E`.
    pub top_k: u32,
    /// 1: renormalise the chosen probabilities to sum to 1.
    pub norm_topk_prob: u32,
    /// `[N, E]` f32.
    pub logits: u64,
    /// `[N, K]` i32 output.
    pub topk_ids: u64,
    /// `[N, K]` f32 output.
    pub topk_weights: u64,
}

/// The most expert groups the GPU's grouped router handles (a lane per group).
pub const ROUTER_MAX_GROUPS: u32 = 32;

/// Arguments of `router_grouped`: DeepSeek-V3-style routing (sigmoid scores, a score
/// correction for the choice, group-limited top-k), with the arithmetic of
/// [`crate::routing`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupedRouterParams {
    /// `N`, tokens to route.
    pub num_tokens: u32,
    /// `E`, logits per token, at most [`ROUTER_MAX_EXPERTS`].
    pub num_experts: u32,
    /// `K`, at most [`ROUTER_MAX_TOP_K`] and the experts of `topk_group` groups.
    pub top_k: u32,
    /// Groups of `E / n_group` experts, at most [`ROUTER_MAX_GROUPS`]; each has at
    /// least two.
    pub n_group: u32,
    /// Groups a token chooses its experts in, `1..=n_group`.
    pub topk_group: u32,
    /// 1: divide the chosen scores by their sum.
    pub norm_topk_prob: u32,
    /// `routed_scaling_factor`'s f32 bits.
    pub scale_bits: u32,
    /// Explicit padding before the pointers; 0.
    pub _pad: u32,
    /// `[N, E]` f32.
    pub logits: u64,
    /// `[E]` f32, `e_score_correction_bias`.
    pub bias: u64,
    /// `[N, K]` i32 output.
    pub topk_ids: u64,
    /// `[N, K]` f32 output.
    pub topk_weights: u64,
}

/// Arguments of `add_bf16`: `out[i] = bf16(out[i] + other[i])` in f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddParams {
    /// Elements of both buffers.
    pub len: u64,
    /// bf16 input.
    pub other: u64,
    /// bf16, read and written.
    pub out: u64,
}

/// Arguments of `silu_mul_bf16`: `out[r, j] = bf16(SiLU(g) * u)` with
/// `g = gate_up[r, j]`, `u = gate_up[r, I + j]`, in f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SiluMulParams {
    /// Rows of `gate_up` and of `out`.
    pub rows: u32,
    /// `I`.
    pub columns: u32,
    /// `[rows, 2I]` bf16: each row's gate projection, then its up projection.
    pub gate_up: u64,
    /// `[rows, I]` bf16 output.
    pub out: u64,
}

/// Rows of a grouped GEMM tile (the permuted rows of one expert).
pub const GEMM_BM: u32 = 64;
/// Weight rows of a grouped GEMM tile: output columns of the plain GEMM; for the gated
/// one, half are gate rows and half the up rows of the same output columns.
pub const GEMM_BN: u32 = 128;
/// The reduction (`K`) depth of a pipeline stage: 128-byte rows, whole cache lines.
pub const GEMM_BK: u32 = 64;
/// Pipeline stages in shared memory (`cp.async` copies run this many tiles ahead, less
/// one).
pub const GEMM_STAGES: u32 = 3;
/// Dynamic shared memory of a grouped GEMM block: its stages (72 KiB, above the 48 KiB
/// a kernel gets without asking; the runtime raises the limit when it loads it).
pub const GEMM_SHARED_BYTES: u32 = GEMM_STAGES * (GEMM_BM + GEMM_BN) * GEMM_BK * 2;
/// Threads of a grouped GEMM block: four warps, side by side along the columns.
pub const GEMM_THREADS: u32 = 128;
/// `K` and `N` must be multiples of this (16-byte rows of bf16 for `cp.async`).
pub const GEMM_ALIGN: u32 = 8;

/// The expert GEMMs of the MoE block over permuted rows, with the expert of each row
/// tile read from `expert_first_token_offset` on the device: for each local expert `e`
/// and each of its rows `r` (`offsets[e] <= r < offsets[e + 1]`),
/// `c[r, j] = sum_k a[r, k] * b[e, j, k]` (f32 accumulation, bf16 out). The gated
/// kernel reads `b[e]` as `[2N, K]` (gate rows, then up rows) and writes
/// `c[r, j] = bf16(SiLU(bf16(gate)) * bf16(up))`, what `silu_mul_bf16` computes from
/// the two GEMM outputs.
///
/// Block `x` of the grid computes row-tile slot `x % m_slots` of column tile
/// `x / m_slots`; slot `t` is the `t`-th tile of `GEMM_BM` rows counted over the
/// experts in order, and a block whose slot is past the last tile returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupedGemmParams {
    /// `[max_rows, K]` bf16 rows, in expert order.
    pub a: u64,
    /// `[L, N, K]` bf16 weights (`[L, 2N, K]` gated), each expert's rows `[out, in]`.
    pub b: u64,
    /// `[max_rows, N]` bf16 output.
    pub c: u64,
    /// `[L + 1]` i64 `expert_first_token_offset`; values are clamped to
    /// `0..=max_rows`, and an expert whose end is below its start has no rows.
    pub offsets: u64,
    /// `L`.
    pub num_experts: u32,
    /// Row-tile slots per column tile: at least the tiles the rows can need,
    /// `ceil(max_rows / GEMM_BM) + min(L, max_rows)`.
    pub m_slots: u32,
    /// `N`, output columns (a multiple of [`GEMM_ALIGN`]).
    pub n: u32,
    /// `K` (a multiple of [`GEMM_ALIGN`]).
    pub k: u32,
    /// Rows of `a` and `c`.
    pub max_rows: u32,
    /// Slices of `K` the grid is split into (1: none). With more, block `x` computes
    /// slice `x % splits` of its tile (its share of the k-tiles) and stores f32 sums
    /// into `partials` instead of `c`, and `grouped_gemm_reduce_*` adds the slices.
    pub splits: u32,
    /// `[splits, max_rows, W]` f32, `W` the weight rows of an expert (`N`, or `2N`
    /// gated: gate columns, then up columns); 0 without splits.
    pub partials: u64,
    /// Aligned mode (Humming's indexed backend), when not 0: `[m_slots]` i32
    /// `block_expert_ids` of `align` run with a block size of [`GEMM_BM`]. Slot `t` is
    /// rows `64t..64t + 64` of expert `tile_experts[t]` (none when negative), up to
    /// `rows_used`; `offsets` is then unused.
    pub tile_experts: u64,
    /// Aligned mode: one i32, align's `num_rows_post_padded` (clamped to `max_rows`).
    pub rows_used: u64,
    /// When not 0, `a` is gathered: row `r` of the tile is token `sorted_ids[r] / topk`
    /// of `a` (`[tokens, K]`), and a row whose entry is `entries` or more (align's
    /// padding) reads zeros.
    pub sorted_ids: u64,
    /// `K` of the routing (entries per token), for the gather.
    pub topk: u32,
    /// `N * K` of the routing: align's padding value, for the gather.
    pub entries: u32,
}

/// The second step of a split grouped GEMM: `c[r, j]` from the sum, in split order, of
/// `partials[s, r, j]` (and of the up columns `N + j`, gated), for every row below the
/// valid count `offsets[L]` (clamped to `max_rows`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmReduceParams {
    /// `[splits, max_rows, W]` f32.
    pub partials: u64,
    /// `[max_rows, N]` bf16.
    pub c: u64,
    /// `[L + 1]` i64.
    pub offsets: u64,
    /// `L`.
    pub num_experts: u32,
    /// Rows of `c`.
    pub max_rows: u32,
    /// `N`.
    pub n: u32,
    /// Slices.
    pub splits: u32,
}

/// The combine's index of Humming's indexed backend: for each row `r` below align's
/// `rows_used` whose entry `e = sorted_ids[r]` is below `entries`, `inv[e] = r`; and
/// `valid[0] = rows_used` (clamped to `0..=max_rows`), the valid count unpermute reads.
/// `inv` is filled beforehand with a value above any row (dropped entries keep it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlignInverseParams {
    /// `[max_rows]` i32 align `sorted_ids`.
    pub sorted_ids: u64,
    /// One i32, align's `num_rows_post_padded`.
    pub rows_used: u64,
    /// `[entries]` i32 output.
    pub inv: u64,
    /// One i64 output.
    pub valid: u64,
    /// `N * K`.
    pub entries: u32,
    /// Rows of `sorted_ids`.
    pub max_rows: u32,
}

/// The fused small permute (`permute_fused_*`) takes calls of at most this many
/// entries (`N*K`): each of its blocks routes them all in shared memory. Measured on
/// the H200 (docs/benchmarks.md): 12-26% faster than routing and scatter as two
/// launches up to 128 entries, even at 256, slower beyond (every block routes every
/// entry, and a block copies one row).
pub const FUSED_MAX_ENTRIES: u32 = 128;

/// Arguments of `permute_fused_*`: the routing of a small call and its row scatter in
/// one launch. Every block routes all `N*K` entries (block 0 also writes the index
/// outputs), then copies its units: a unit is one entry's destination row and a slice
/// of [`ROUTE_THREADS`] 16-byte vectors of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermuteFusedParams {
    /// The routing, as `route_place_*` takes it (one chunk).
    pub route: RouteParams,
    /// The scatter, as `permute_rows_v16` takes it.
    pub rows: PermuteRowsParams,
}

/// The parameters of `gather_ids`: `out[r] = src[index[r]]` for `r < rows`, or `-1`
/// where `index[r]` is not below `src_len`. Expert parallelism gives each permuted row
/// its global expert id this way (`src` = `topk_ids`, `index` = `permuted_idx`), so the
/// row can travel with the id of the expert it is for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherIdsParams {
    /// `[src_len]` i32.
    pub src: u64,
    /// `[rows]` i32.
    pub index: u64,
    /// `[rows]` i32 output.
    pub out: u64,
    /// Elements of `src`.
    pub src_len: u32,
    /// Elements of `index` and `out`.
    pub rows: u32,
}

// Kernel arguments are copied byte for byte into the launch; pin their layout.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<RoutingDims>() == 16 && align_of::<RoutingDims>() == 4);
    assert!(size_of::<RowLayout>() == 8 && align_of::<RowLayout>() == 4);
    assert!(size_of::<AlignDims>() == 8 && align_of::<AlignDims>() == 4);
    assert!(size_of::<RouteParams>() == 120 && align_of::<RouteParams>() == 8);
    assert!(size_of::<PermuteRowsParams>() == 72 && align_of::<PermuteRowsParams>() == 8);
    assert!(size_of::<UnpermuteParams>() == 80 && align_of::<UnpermuteParams>() == 8);
    assert!(size_of::<StatusBlock>() == STATUS_BYTES && align_of::<StatusBlock>() == 8);
    assert!(size_of::<RouterParams>() == 40 && align_of::<RouterParams>() == 8);
    assert!(size_of::<SiluMulParams>() == 24 && align_of::<SiluMulParams>() == 8);
    assert!(size_of::<GroupedRouterParams>() == 64 && align_of::<GroupedRouterParams>() == 8);
    assert!(size_of::<AddParams>() == 24 && align_of::<AddParams>() == 8);
    assert!(size_of::<GroupedGemmParams>() == 96 && align_of::<GroupedGemmParams>() == 8);
    assert!(size_of::<GemmReduceParams>() == 40 && align_of::<GemmReduceParams>() == 8);
    assert!(size_of::<AlignInverseParams>() == 40 && align_of::<AlignInverseParams>() == 8);
    assert!(size_of::<GatherIdsParams>() == 32 && align_of::<GatherIdsParams>() == 8);
    assert!(size_of::<PermuteFusedParams>() == 120 + 72 && align_of::<PermuteFusedParams>() == 8);
    assert!(FUSED_MAX_ENTRIES <= ROUTE_CHUNK);
    assert!(GEMM_THREADS == 128 && GEMM_BM == 64 && GEMM_BN == 128 && GEMM_BK == 64);
    assert!(GEMM_SHARED_BYTES == 73728);
    assert!(ROUTE_THREADS % 32 == 0 && ROUTE_CHUNK % ROUTE_THREADS == 0);
    // Per-warp counts are 16-bit: a warp's share of a chunk must fit.
    assert!(ROUTE_CHUNK / ROUTE_WARPS <= u16::MAX as u32);
};

/// Which parameter block a kernel takes (see [`crate::kernels::Kernel::params`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamsKind {
    /// [`RouteParams`].
    Route,
    /// [`PermuteRowsParams`].
    PermuteRows,
    /// [`UnpermuteParams`].
    Unpermute,
    /// [`RouterParams`].
    Router,
    /// [`SiluMulParams`].
    SiluMul,
    /// [`GroupedRouterParams`].
    GroupedRouter,
    /// [`AddParams`].
    Add,
    /// [`GroupedGemmParams`].
    GroupedGemm,
    /// [`GemmReduceParams`].
    GemmReduce,
    /// [`AlignInverseParams`].
    AlignInverse,
    /// [`GatherIdsParams`].
    GatherIds,
    /// [`PermuteFusedParams`].
    PermuteFused,
}

/// A parameter block that crosses to the GPU as a kernel's one argument, by value.
///
/// # Safety
/// Implemented only for the `#[repr(C)]` blocks of this module: plain integers with no
/// implicit padding, whose layout is the kernels' parameter (they are compiled from
/// this same definition), and whose [`Self::KIND`] names them.
pub unsafe trait KernelParams: Copy {
    /// The kernels this block is the argument of.
    const KIND: ParamsKind;
}

// SAFETY: `#[repr(C)]`, `Copy`, integers only, sizes pinned above with no implicit
// padding (`UnpermuteParams` names its padding); the kernels take this exact type.
unsafe impl KernelParams for RouteParams {
    const KIND: ParamsKind = ParamsKind::Route;
}
// SAFETY: as above.
unsafe impl KernelParams for PermuteRowsParams {
    const KIND: ParamsKind = ParamsKind::PermuteRows;
}
// SAFETY: as above.
unsafe impl KernelParams for UnpermuteParams {
    const KIND: ParamsKind = ParamsKind::Unpermute;
}
// SAFETY: as above.
unsafe impl KernelParams for RouterParams {
    const KIND: ParamsKind = ParamsKind::Router;
}
// SAFETY: as above.
unsafe impl KernelParams for SiluMulParams {
    const KIND: ParamsKind = ParamsKind::SiluMul;
}
// SAFETY: as above (`GroupedRouterParams` names its padding).
unsafe impl KernelParams for GroupedRouterParams {
    const KIND: ParamsKind = ParamsKind::GroupedRouter;
}
// SAFETY: as above.
unsafe impl KernelParams for AddParams {
    const KIND: ParamsKind = ParamsKind::Add;
}
// SAFETY: as above.
unsafe impl KernelParams for GroupedGemmParams {
    const KIND: ParamsKind = ParamsKind::GroupedGemm;
}
// SAFETY: as above.
unsafe impl KernelParams for GemmReduceParams {
    const KIND: ParamsKind = ParamsKind::GemmReduce;
}
// SAFETY: as above.
unsafe impl KernelParams for AlignInverseParams {
    const KIND: ParamsKind = ParamsKind::AlignInverse;
}
// SAFETY: as above.
unsafe impl KernelParams for GatherIdsParams {
    const KIND: ParamsKind = ParamsKind::GatherIds;
}
// SAFETY: as above (two pinned blocks, each a multiple of 8 bytes, so no padding).
unsafe impl KernelParams for PermuteFusedParams {
    const KIND: ParamsKind = ParamsKind::PermuteFused;
}
