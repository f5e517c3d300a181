//! The MoE block on a CUDA device: the project's kernels for the router (softmax or
//! DeepSeek-V3's grouped one), permute, the expert GEMMs, unpermute and the shared
//! expert's add; cuBLAS for the router's and the shared expert's dense GEMMs.
//!
//! The expert GEMMs ([`ExpertGemm::Grouped`]) are the project's grouped tensor-core
//! kernels, which read each row tile's expert from `expert_first_token_offset` on the
//! device: nothing in a forward waits on the host, and the whole block can be
//! captured in a CUDA graph. [`ExpertGemm::Cublas`] is the earlier path: it copies the
//! offsets to the host (one wait) and issues one cuBLAS GEMM per expert, twice, and
//! the separate SiLU kernel; the default, [`ExpertGemm::Auto`], takes it for large
//! prefill calls of models with large experts, where it is faster, and for sizes the
//! grouped kernels refuse (H or I not a multiple of 8).

mod blas;
mod gemm;
mod kernels;
mod parts;

use std::sync::Arc;

use half::bf16;
use moe_kernels::{GEMM_ALIGN, GEMM_BM};
use moe_runtime::cuda::{
    self, CudaDevice, DeviceBuffer, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput,
    DeviceRows, DeviceRowsMut, DeviceTopkIds, DeviceUnpermuteInput, DeviceView, Stream,
};
use moe_runtime::size::product;
use moe_runtime::{DType, ScratchConfig};

pub use blas::{Blas, GemmOutput};
pub use gemm::{
    AlignedRows, GemmEpilogue, GroupedGemmOperands, GroupedGemmShape, MAX_SPLITS, RowTiles,
    SPLIT_MAX_ROWS, grouped_gemm, split_k, split_workspace_len,
};
pub use parts::{
    DeviceRouter, DeviceSharedExpert, ExpertActivations, ExpertWeights, SharedActivations,
    grouped_experts, stack_gate_up,
};

/// How [`CudaMoeBlock`] runs the expert GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertGemm {
    /// [`Self::Grouped`], except for calls whose experts get on average
    /// [`CUBLAS_ROWS_PER_EXPERT`] rows or more of an intermediate size of at least
    /// [`CUBLAS_MIN_INTERMEDIATE`]: there each expert's GEMMs are large and
    /// compute-bound, and cuBLAS's Hopper kernels beat the grouped `mma.sync` ones
    /// (measured on the H200, docs/benchmarks.md). The host knows `N` without waiting,
    /// so the choice costs nothing; such calls (prefill) are not the ones serving
    /// stacks capture in graphs.
    Auto,
    /// Two launches of the grouped kernels ([`grouped_gemm`]), the gate/up one with the
    /// SiLU in its epilogue; no host wait.
    Grouped,
    /// cuBLAS, a GEMM per expert with rows, after copying the offsets to the host.
    Cublas,
}

/// [`ExpertGemm::Auto`] runs cuBLAS from this many rows per expert on average...
pub const CUBLAS_ROWS_PER_EXPERT: usize = 128;
/// ...for intermediate sizes of at least this.
pub const CUBLAS_MIN_INTERMEDIATE: usize = 4096;

impl ExpertGemm {
    /// The path a call of `tokens` takes.
    fn resolve(self, config: &MoeConfig, tokens: usize) -> ExpertGemm {
        match self {
            ExpertGemm::Auto => {
                let rows_per_expert = tokens * config.top_k / config.num_experts.max(1);
                if rows_per_expert >= CUBLAS_ROWS_PER_EXPERT
                    && config.intermediate_size >= CUBLAS_MIN_INTERMEDIATE
                {
                    ExpertGemm::Cublas
                } else {
                    ExpertGemm::Grouped
                }
            }
            path => path,
        }
    }
}
pub use kernels::{
    add_bf16, align_inverse, copy_device, gather_ids, router_grouped, router_topk, silu_mul,
};

use crate::shared::{ScratchGuard, ScratchSource, SharedWorkspace};
use crate::{BlockOutput, ExpertsError, ExpertsKind, MoeConfig, MoeWeights, Result};

fn zeros<T: cuda::DeviceRepr + cuda::ValidAsZeroBits>(
    device: &CudaDevice,
    len: usize,
) -> Result<DeviceBuffer<T>> {
    Ok(DeviceBuffer::zeros(device, len.max(1))?)
}

/// The block's device activations, sized for a number of tokens.
#[derive(Debug)]
struct Activations {
    tokens: usize,
    hidden: DeviceBuffer<bf16>,
    logits: DeviceBuffer<f32>,
    topk_ids: DeviceBuffer<i32>,
    topk_weights: DeviceBuffer<f32>,
    /// The grouped backend's own permuted activations (unused by Humming's).
    permuted: DeviceBuffer<bf16>,
    gate_up: DeviceBuffer<bf16>,
    act: DeviceBuffer<bf16>,
    expert_out: DeviceBuffer<bf16>,
    /// The indexed backend's combine index `[N * K]` and valid count (one i64).
    inv: DeviceBuffer<i32>,
    valid: DeviceBuffer<i64>,
    /// The split grouped GEMMs' f32 partial sums (decode sizes only; see `split_k`).
    partials: DeviceBuffer<f32>,
    out: DeviceBuffer<bf16>,
    /// The shared expert's `[N, 2I_s]`, `[N, I_s]` and `[N, H]` (empty without one).
    shared_gate_up: DeviceBuffer<bf16>,
    shared_act: DeviceBuffer<bf16>,
    shared_out: DeviceBuffer<bf16>,
}

impl Activations {
    fn new(
        device: &CudaDevice,
        config: &MoeConfig,
        tokens: usize,
        kind: ExpertsKind,
    ) -> Result<Self> {
        let grouped = kind == ExpertsKind::Grouped;
        let indexed = matches!(kind, ExpertsKind::HummingIndexed { .. });
        let (h, i, e, k) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.top_k,
        );
        // `tokens` may be a caller's max_num_tokens with no data behind it: every
        // length is checked.
        let len = |quantity, factors: &[usize]| product(quantity, factors);
        let entries = len("activation entries (N * K)", &[tokens, k])?;
        // The expert GEMMs' rows: permute's `N * K`, or align's order padded per expert
        // to the GEMM's 64-row tiles (at most one partial tile an expert with rows).
        let gemm_rows = if indexed {
            let padding = len("align padding", &[e.min(entries), GEMM_BM as usize - 1])?;
            entries
                .checked_add(padding)
                .ok_or_else(|| moe_runtime::MoeError::SizeOverflow {
                    quantity: "align's padded rows",
                    factors: vec![entries, e, GEMM_BM as usize],
                })?
        } else {
            entries
        };
        let rows = len("permuted activations (N * K * H)", &[entries, h])?;
        let gemm_out = len("expert outputs (rows * H)", &[gemm_rows, h])?;
        let (s, shared) = (
            config.shared_intermediate_size,
            config.shared_intermediate_size > 0,
        );
        let shared_rows = if shared { tokens } else { 0 };
        Ok(Self {
            tokens,
            hidden: zeros(device, len("hidden states (N * H)", &[tokens, h])?)?,
            logits: zeros(device, len("router logits (N * E)", &[tokens, e])?)?,
            topk_ids: zeros(device, entries)?,
            topk_weights: zeros(device, entries)?,
            permuted: zeros(device, if grouped { rows } else { 0 })?,
            gate_up: zeros(
                device,
                len("gate/up activations (N * K * 2I)", &[entries, 2, i])?,
            )?,
            act: zeros(device, len("activations (N * K * I)", &[gemm_rows, i])?)?,
            expert_out: zeros(device, gemm_out)?,
            inv: zeros(device, if indexed { entries } else { 0 })?,
            valid: zeros(device, 1)?,
            partials: zeros(
                device,
                len(
                    "split GEMM partial sums",
                    &[MAX_SPLITS, entries.min(SPLIT_MAX_ROWS), (2 * i).max(h)],
                )?,
            )?,
            out: zeros(device, len("block output (N * H)", &[tokens, h])?)?,
            shared_gate_up: zeros(
                device,
                len(
                    "shared gate/up activations (N * 2I_s)",
                    &[shared_rows, 2, s],
                )?,
            )?,
            shared_act: zeros(
                device,
                len("shared activations (N * I_s)", &[shared_rows, s])?,
            )?,
            shared_out: zeros(
                device,
                len("shared expert output (N * H)", &[shared_rows, h])?,
            )?,
        })
    }
}

/// One MoE layer on a CUDA device, with the grouped (CUTLASS-style) or Humming-style
/// expert backend.
#[derive(Debug)]
pub struct CudaMoeBlock {
    config: MoeConfig,
    kind: ExpertsKind,
    blas: Blas,
    router: DeviceRouter,
    /// `[E, 2I, H]`: each expert's gate rows, then its up rows: one GEMM gives both.
    gate_up: DeviceBuffer<bf16>,
    /// `[E, H, I]`.
    down: DeviceBuffer<bf16>,
    shared: Option<DeviceSharedExpert>,
    source: ScratchSource,
    activations: Option<Activations>,
    expert_gemm: ExpertGemm,
    /// The GPU's SMs, for `split_k`.
    multiprocessors: usize,
}

impl CudaMoeBlock {
    /// Uploads `weights` to `device`. The permute scratch comes from `workspace` on
    /// the first call (which must be a workspace on the same device:
    /// [`SharedWorkspace::on_cuda_device`]).
    pub fn new(
        config: MoeConfig,
        weights: &MoeWeights,
        kind: ExpertsKind,
        device: Arc<CudaDevice>,
        workspace: SharedWorkspace,
        max_num_tokens: usize,
    ) -> Result<Self> {
        weights.check(&config)?;
        let same_device = workspace
            .lock()
            .cuda_device()
            .is_some_and(|d| Arc::ptr_eq(d, &device));
        if !same_device {
            return Err(ExpertsError::Config(
                "a CUDA block needs a workspace made by SharedWorkspace::on_cuda_device with its own device".into(),
            ));
        }
        let request = ScratchConfig::new(
            max_num_tokens,
            config.top_k,
            config.num_experts,
            config.num_experts,
            device.device(),
        );
        let request = match kind {
            ExpertsKind::Grouped => request,
            ExpertsKind::Humming => request.with_rows(config.hidden_size, DType::BF16),
            ExpertsKind::HummingIndexed { block_size } => {
                // The gather GEMM's row tiles are align's blocks.
                let align = GEMM_ALIGN as usize;
                if block_size != GEMM_BM as usize
                    || config.hidden_size % align != 0
                    || config.intermediate_size % align != 0
                {
                    return Err(ExpertsError::Unsupported {
                        backend: "humming-indexed",
                        device: device.device(),
                        reason: "on the GPU it runs align with a block size of 64 (the grouped GEMM's row tile) and needs hidden and intermediate sizes that are multiples of 8",
                    });
                }
                request.with_align_block_size(block_size)
            }
        };
        let (h, i, e) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
        );
        let all: Vec<usize> = (0..e).collect();
        let gate_up = stack_gate_up(weights, &all);
        let multiprocessors = multiprocessors(&device)?;
        Ok(Self {
            shared: DeviceSharedExpert::new(&device, weights)?,
            router: DeviceRouter::new(&device, weights)?,
            gate_up: DeviceBuffer::from_host(&device, &gate_up)?,
            down: DeviceBuffer::from_host(&device, &weights.down_proj)?,
            blas: Blas::new(device)?,
            source: ScratchSource { workspace, request },
            activations: None,
            multiprocessors,
            expert_gemm: if h % GEMM_ALIGN as usize == 0 && i % GEMM_ALIGN as usize == 0 {
                ExpertGemm::Auto
            } else {
                ExpertGemm::Cublas
            },
            config,
            kind,
        })
    }

    /// How the expert GEMMs run: [`ExpertGemm::Auto`] unless the hidden or
    /// intermediate size is not a multiple of 8 ([`ExpertGemm::Cublas`] then).
    pub fn expert_gemm(&self) -> ExpertGemm {
        self.expert_gemm
    }

    /// Chooses how the expert GEMMs run; [`ExpertGemm::Grouped`] and
    /// [`ExpertGemm::Auto`] are refused for sizes the grouped kernels cannot take.
    pub fn set_expert_gemm(&mut self, gemm: ExpertGemm) -> Result<()> {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let align = GEMM_ALIGN as usize;
        if gemm == ExpertGemm::Cublas && matches!(self.kind, ExpertsKind::HummingIndexed { .. }) {
            return Err(ExpertsError::Config(
                "the indexed backend gathers its rows in the grouped GEMM; cuBLAS cannot".into(),
            ));
        }
        if gemm != ExpertGemm::Cublas && (h % align != 0 || i % align != 0) {
            return Err(ExpertsError::Config(format!(
                "the grouped expert GEMMs need the hidden ({h}) and intermediate ({i}) sizes \
                 to be multiples of {align}"
            )));
        }
        self.expert_gemm = gemm;
        Ok(())
    }

    /// The block's sizes and routing settings.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The device the block's weights and activations are on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        self.blas.device()
    }

    /// The permute scratch for a call of `num_tokens`, built on first use.
    pub fn get_permute_scratch(&self, num_tokens: usize) -> Result<ScratchGuard<'_>> {
        self.source.get(num_tokens)
    }

    /// Takes the permute scratch from `workspace` from now on (for example a fresh
    /// one per call, to measure what allocating costs).
    pub fn use_workspace(&mut self, workspace: SharedWorkspace) -> Result<()> {
        let same_device = workspace
            .lock()
            .cuda_device()
            .is_some_and(|d| Arc::ptr_eq(d, self.blas.device()));
        if !same_device {
            return Err(ExpertsError::Config(
                "the workspace is not on this block's device".into(),
            ));
        }
        self.source.workspace = workspace;
        Ok(())
    }

    /// Runs the block on host `hidden_states` `[N, H]` on `stream`: uploads them,
    /// queues the block, and copies the output and the routing back.
    pub fn forward(&mut self, stream: &Stream<'_>, hidden_states: &[bf16]) -> Result<BlockOutput> {
        let (h, k) = (self.config.hidden_size, self.config.top_k);
        let tokens = self.tokens_of(hidden_states.len())?;
        self.reserve(tokens)?;
        let activations = self.activations.as_mut().expect("reserved above");
        activations.hidden.copy_from_host(stream, hidden_states)?;
        self.forward_reserved(stream, tokens)?;
        let activations = self.activations.as_ref().expect("reserved above");
        Ok(BlockOutput {
            hidden_states: activations.out.view().prefix(tokens * h).to_host(stream)?,
            topk_ids: activations
                .topk_ids
                .view()
                .prefix(tokens * k)
                .to_host(stream)?,
            topk_weights: activations
                .topk_weights
                .view()
                .prefix(tokens * k)
                .to_host(stream)?,
        })
    }

    /// Runs the block on hidden states already on the device, on `stream`, leaving
    /// the output in the block's activations (read it with [`Self::output`]): what a
    /// serving stack whose activations live on the GPU does. The input is copied once
    /// on the device.
    pub fn forward_device(
        &mut self,
        stream: &Stream<'_>,
        hidden_states: DeviceView<'_, bf16>,
    ) -> Result<()> {
        let tokens = self.tokens_of(hidden_states.len())?;
        self.reserve(tokens)?;
        let activations = self.activations.as_mut().expect("reserved above");
        copy_device(
            stream,
            hidden_states,
            activations
                .hidden
                .view_mut()
                .prefix(tokens * self.config.hidden_size),
        )?;
        self.forward_reserved(stream, tokens)
    }

    /// The output `[N, H]` of the last [`Self::forward_device`] call of `tokens` tokens.
    pub fn output(&self, tokens: usize) -> Option<DeviceView<'_, bf16>> {
        let activations = self.activations.as_ref()?;
        (tokens <= activations.tokens).then(|| {
            activations
                .out
                .view()
                .prefix(tokens * self.config.hidden_size)
        })
    }

    /// Tokens in `len` elements of hidden states: whole rows of `H`.
    fn tokens_of(&self, len: usize) -> Result<usize> {
        let h = self.config.hidden_size;
        if len % h != 0 {
            return Err(ExpertsError::Shape {
                tensor: "hidden_states",
                len,
                expected: format!("whole rows of hidden_size {h}"),
            });
        }
        Ok(len / h)
    }

    /// Makes sure the activations hold `tokens` tokens (allocating on first use and
    /// when a call is larger than any before).
    fn reserve(&mut self, tokens: usize) -> Result<()> {
        if self.activations.as_ref().is_none_or(|a| a.tokens < tokens) {
            let size = tokens.max(self.source.request.max_num_tokens);
            self.activations = None;
            let activations = Activations::new(self.blas.device(), &self.config, size, self.kind)?;
            self.activations = Some(activations);
        }
        Ok(())
    }

    /// The block on the first `tokens` rows already in `activations.hidden`.
    fn forward_reserved(&mut self, stream: &Stream<'_>, tokens: usize) -> Result<()> {
        let (h, i, e, k) = (
            self.config.hidden_size,
            self.config.intermediate_size,
            self.config.num_experts,
            self.config.top_k,
        );
        let entries = tokens * k;
        let activations = self.activations.as_mut().expect("reserved by the caller");
        let hidden = activations.hidden.view().prefix(tokens * h);

        // Router: logits = hidden * router^T in f32, then softmax / top-k on the device.
        self.router.route(
            &mut self.blas,
            stream,
            &self.config,
            hidden,
            &mut activations.logits,
            activations.topk_ids.view_mut().prefix(entries),
            activations.topk_weights.view_mut().prefix(entries),
        )?;

        let mut scratch = self.source.get(tokens)?;
        if let ExpertsKind::HummingIndexed { .. } = self.kind {
            // Humming's indexed backend: align sorts the entries (no row moves), the
            // gate/up GEMM gathers each row from the hidden states by its entry, the
            // down GEMM runs in align's order, and unpermute combines through the
            // inverse of `sorted_ids`.
            let ids = DeviceTopkIds::new(
                DeviceExpertIds::I32(activations.topk_ids.view().prefix(entries)),
                k,
            )?;
            let aligned = cuda::align(&mut scratch, stream, &ids, None)?;
            let len = aligned.sorted_ids.len();
            let tiles = |gather| {
                RowTiles::Aligned(AlignedRows {
                    block_expert_ids: aligned.block_expert_ids,
                    num_rows_post_padded: aligned.num_rows_post_padded,
                    num_experts: e,
                    gather,
                })
            };
            grouped_gemm(
                stream,
                GemmEpilogue::SiluMul,
                GroupedGemmShape {
                    max_rows: len,
                    n: i,
                    k: h,
                    splits: 1,
                },
                GroupedGemmOperands {
                    a: hidden,
                    b: self.gate_up.view(),
                    tiles: tiles(Some((aligned.sorted_ids, k))),
                    c: activations.act.view_mut().prefix(len * i),
                    partials: None,
                },
            )?;
            grouped_gemm(
                stream,
                GemmEpilogue::Plain,
                GroupedGemmShape {
                    max_rows: len,
                    n: h,
                    k: i,
                    splits: 1,
                },
                GroupedGemmOperands {
                    a: activations.act.view().prefix(len * i),
                    b: self.down.view(),
                    tiles: tiles(None),
                    c: activations.expert_out.view_mut().prefix(len * h),
                    partials: None,
                },
            )?;
            align_inverse(
                stream,
                aligned.sorted_ids,
                aligned.num_rows_post_padded,
                activations.inv.view_mut().prefix(entries),
                activations.valid.view_mut(),
            )?;
            let combine = DeviceUnpermuteInput {
                permuted_hidden_states: DeviceRows::new(
                    activations.expert_out.view().prefix(len * h),
                    h,
                )?,
                inv_permuted_idx: activations.inv.view().prefix(entries),
                expert_first_token_offset: activations.valid.view(),
                topk_weights: activations.topk_weights.view().prefix(entries),
                topk: k,
                status: aligned.status,
            };
            let out = DeviceRowsMut::new(activations.out.view_mut().prefix(tokens * h), h)?;
            cuda::unpermute_into(stream, &combine, out)?;
        } else {
            // Permute, into the backend's own buffer or the scratch's.
            let input = DevicePermuteInput::new(
                DeviceRows::new(hidden, h)?,
                DeviceTopkIds::new(
                    DeviceExpertIds::I32(activations.topk_ids.view().prefix(entries)),
                    k,
                )?,
            );
            let routed = match self.kind {
                ExpertsKind::Grouped => {
                    let dest = DevicePermuteDest {
                        hidden_states: DeviceRowsMut::new(
                            activations.permuted.view_mut().prefix(entries * h),
                            h,
                        )?,
                        scales: None,
                    };
                    cuda::permute_into(&mut scratch, stream, &input, dest)?
                }
                _ => cuda::permute(&mut scratch, stream, &input)?,
            };
            let rows = routed.permuted_hidden_states.typed::<bf16>()?;

            match self.expert_gemm.resolve(&self.config, tokens) {
                ExpertGemm::Grouped | ExpertGemm::Auto => grouped_experts(
                    stream,
                    self.multiprocessors,
                    (h, i),
                    rows.prefix(entries * h),
                    routed.expert_first_token_offset,
                    ExpertWeights {
                        gate_up: self.gate_up.view(),
                        down: self.down.view(),
                    },
                    ExpertActivations {
                        act: &mut activations.act,
                        out: activations.expert_out.view_mut().prefix(entries * h),
                        partials: &mut activations.partials,
                    },
                )?,
                ExpertGemm::Cublas => {
                    // The one host wait of this path: each expert's row count.
                    let offsets = routed.expert_first_token_offset.to_host(stream)?;
                    let weights = (self.gate_up.view(), self.down.view());
                    let buffers = (
                        &mut activations.gate_up,
                        &mut activations.act,
                        &mut activations.expert_out,
                    );
                    cublas_experts(
                        &mut self.blas,
                        stream,
                        &offsets,
                        rows,
                        weights,
                        buffers,
                        (h, i),
                    )?;
                }
            }

            // The weighted combine.
            let combine = DeviceUnpermuteInput {
                permuted_hidden_states: DeviceRows::new(
                    activations.expert_out.view().prefix(entries * h),
                    h,
                )?,
                inv_permuted_idx: routed.inv_permuted_idx,
                expert_first_token_offset: routed.expert_first_token_offset,
                topk_weights: activations.topk_weights.view().prefix(entries),
                topk: k,
                status: routed.status,
            };
            let out = DeviceRowsMut::new(activations.out.view_mut().prefix(tokens * h), h)?;
            cuda::unpermute_into(stream, &combine, out)?;
        }
        drop(scratch);
        let activations = self.activations.as_mut().expect("reserved by the caller");

        // The shared expert, on every token, added as two bf16 tensors add.
        if let Some(shared) = &self.shared {
            shared.add_into(
                &mut self.blas,
                stream,
                (activations.hidden.view().prefix(tokens * h), h),
                SharedActivations {
                    gate_up: &mut activations.shared_gate_up,
                    act: &mut activations.shared_act,
                    out: &mut activations.shared_out,
                },
                activations.out.view_mut().prefix(tokens * h),
            )?;
        }
        Ok(())
    }
}

/// The expert GEMMs on cuBLAS: for each expert with rows (`offsets`, read back from
/// the device), its gate/up GEMM, then the SiLU kernel over every valid row, then each
/// expert's down GEMM.
fn cublas_experts(
    blas: &mut Blas,
    stream: &Stream<'_>,
    offsets: &[i64],
    rows: DeviceView<'_, bf16>,
    (gate_up_w, down_w): (DeviceView<'_, bf16>, DeviceView<'_, bf16>),
    (gate_up, act, expert_out): (
        &mut DeviceBuffer<bf16>,
        &mut DeviceBuffer<bf16>,
        &mut DeviceBuffer<bf16>,
    ),
    (h, i): (usize, usize),
) -> Result<()> {
    let valid = offsets.last().map_or(0, |&v| v as usize);
    for (expert, bounds) in offsets.windows(2).enumerate() {
        let (first, end) = (bounds[0] as usize, bounds[1] as usize);
        if end > first {
            blas.matmul_nt(
                stream,
                (end - first, 2 * i, h),
                rows.range("permuted rows", first * h, (end - first) * h)?,
                gate_up_w.range("gate_up weights", expert * 2 * i * h, 2 * i * h)?,
                gate_up
                    .view_mut()
                    .range("gate_up", first * 2 * i, (end - first) * 2 * i)?,
            )?;
        }
    }
    silu_mul(
        stream,
        gate_up.view().prefix(valid * 2 * i),
        valid,
        i,
        act.view_mut().prefix(valid * i),
    )?;
    for (expert, bounds) in offsets.windows(2).enumerate() {
        let (first, end) = (bounds[0] as usize, bounds[1] as usize);
        if end > first {
            blas.matmul_nt(
                stream,
                (end - first, h, i),
                act.view().range("act", first * i, (end - first) * i)?,
                down_w.range("down weights", expert * h * i, h * i)?,
                expert_out
                    .view_mut()
                    .range("expert_out", first * h, (end - first) * h)?,
            )?;
        }
    }
    Ok(())
}

/// The GPU's multiprocessor count, for [`split_k`].
pub fn multiprocessors(device: &CudaDevice) -> Result<usize> {
    let count = device
        .context()
        .attribute(
            cuda::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|source| moe_runtime::MoeError::Driver {
            action: "read the GPU's multiprocessor count",
            source,
        })?;
    Ok(count as usize)
}
