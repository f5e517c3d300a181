//! The pieces of the block around permute that more than one block shape runs: the
//! router, the shared expert and the grouped expert GEMMs. [`super::CudaMoeBlock`]
//! composes them on one GPU; an expert-parallel block (`moe-ep`) runs the router and
//! the shared expert on its own tokens and the grouped GEMMs on the rows it received.

use half::bf16;
use moe_runtime::cuda::{CudaDevice, DeviceBuffer, DeviceView, DeviceViewMut, Stream};

use super::{
    Blas, GemmEpilogue, GroupedGemmOperands, GroupedGemmShape, RowTiles, add_bf16, grouped_gemm,
    router_grouped, router_topk, silu_mul, split_k,
};
use crate::{ExpertsError, MoeConfig, MoeWeights, Result, Routing};

/// The router's weights on the device: `[E, H]` and DeepSeek-V3's correction bias.
#[derive(Debug)]
pub struct DeviceRouter {
    weights: DeviceBuffer<bf16>,
    bias: Option<DeviceBuffer<f32>>,
}

impl DeviceRouter {
    /// Uploads the router of `weights` to `device`.
    pub fn new(device: &CudaDevice, weights: &MoeWeights) -> Result<Self> {
        let bias = match &weights.router_bias {
            Some(bias) => Some(DeviceBuffer::from_host(device, bias)?),
            None => None,
        };
        Ok(Self {
            weights: DeviceBuffer::from_host(device, &weights.router)?,
            bias,
        })
    }

    /// `logits = hidden * router^T` in f32 (cuBLAS), then the top-k of `config`'s
    /// routing into `topk_ids` and `topk_weights` (`[tokens * K]`), on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        blas: &mut Blas,
        stream: &Stream<'_>,
        config: &MoeConfig,
        hidden: DeviceView<'_, bf16>,
        logits: &mut DeviceBuffer<f32>,
        topk_ids: DeviceViewMut<'_, i32>,
        topk_weights: DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        let (h, e, k) = (config.hidden_size, config.num_experts, config.top_k);
        let tokens = hidden.len() / h;
        blas.matmul_nt(
            stream,
            (tokens, e, h),
            hidden,
            self.weights.view(),
            logits.view_mut().prefix(tokens * e),
        )?;
        let logits = logits.view().prefix(tokens * e);
        let norm = config.norm_topk_prob;
        let topk_ids = topk_ids.prefix(tokens * k);
        let topk_weights = topk_weights.prefix(tokens * k);
        match (&config.routing, &self.bias) {
            (Routing::Softmax, _) => {
                router_topk(stream, logits, e, k, norm, topk_ids, topk_weights)
            }
            (Routing::Grouped(grouped), Some(bias)) => router_grouped(
                stream,
                logits,
                bias.view(),
                e,
                k,
                grouped,
                norm,
                topk_ids,
                topk_weights,
            ),
            (Routing::Grouped(_), None) => Err(ExpertsError::Config(
                "grouped routing needs e_score_correction_bias".into(),
            )),
        }
    }
}

/// A shared expert's weights on the device: `[2I_s, H]` (gate rows, then up rows) and
/// `[H, I_s]`.
#[derive(Debug)]
pub struct DeviceSharedExpert {
    gate_up: DeviceBuffer<bf16>,
    down: DeviceBuffer<bf16>,
    intermediate_size: usize,
}

/// The activations of [`DeviceSharedExpert::add_into`], each for at least the call's
/// tokens.
#[derive(Debug)]
pub struct SharedActivations<'a> {
    /// `[N, 2I_s]`.
    pub gate_up: &'a mut DeviceBuffer<bf16>,
    /// `[N, I_s]`.
    pub act: &'a mut DeviceBuffer<bf16>,
    /// `[N, H]`.
    pub out: &'a mut DeviceBuffer<bf16>,
}

impl DeviceSharedExpert {
    /// Uploads the shared expert of `weights` (`None` when it has none).
    pub fn new(device: &CudaDevice, weights: &MoeWeights) -> Result<Option<Self>> {
        let Some(shared) = &weights.shared else {
            return Ok(None);
        };
        let gate_up = [&shared.gate_proj[..], &shared.up_proj[..]].concat();
        Ok(Some(Self {
            gate_up: DeviceBuffer::from_host(device, &gate_up)?,
            down: DeviceBuffer::from_host(device, &shared.down_proj)?,
            intermediate_size: shared.intermediate_size,
        }))
    }

    /// `out += down(SiLU(gate(hidden)) * up(hidden))` for the rows of `hidden`
    /// `[N, H]`, added as two bf16 tensors add, on `stream`.
    pub fn add_into(
        &self,
        blas: &mut Blas,
        stream: &Stream<'_>,
        (hidden, hidden_size): (DeviceView<'_, bf16>, usize),
        activations: SharedActivations<'_>,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        let (h, s) = (hidden_size, self.intermediate_size);
        let tokens = hidden.len() / h.max(1);
        let SharedActivations {
            gate_up,
            act,
            out: expert_out,
        } = activations;
        blas.matmul_nt(
            stream,
            (tokens, 2 * s, h),
            hidden,
            self.gate_up.view(),
            gate_up.view_mut().prefix(tokens * 2 * s),
        )?;
        silu_mul(
            stream,
            gate_up.view().prefix(tokens * 2 * s),
            tokens,
            s,
            act.view_mut().prefix(tokens * s),
        )?;
        blas.matmul_nt(
            stream,
            (tokens, h, s),
            act.view().prefix(tokens * s),
            self.down.view(),
            expert_out.view_mut().prefix(tokens * h),
        )?;
        add_bf16(stream, expert_out.view().prefix(tokens * h), out)
    }
}

/// The expert weights the grouped GEMMs read: `[E, 2I, H]` (each expert's gate rows,
/// then its up rows) and `[E, H, I]`.
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a> {
    /// `[E, 2I, H]`.
    pub gate_up: DeviceView<'a, bf16>,
    /// `[E, H, I]`.
    pub down: DeviceView<'a, bf16>,
}

/// Each expert's `[E, 2I, H]` gate/up weights from the `[E, I, H]` gate and up
/// projections of `weights`, for the experts `experts` (in that order).
pub fn stack_gate_up(weights: &MoeWeights, experts: &[usize]) -> Vec<bf16> {
    let (h, i) = (weights.hidden_size, weights.intermediate_size);
    let mut gate_up = Vec::with_capacity(experts.len() * 2 * i * h);
    for &expert in experts {
        gate_up.extend_from_slice(&weights.gate_proj[expert * i * h..][..i * h]);
        gate_up.extend_from_slice(&weights.up_proj[expert * i * h..][..i * h]);
    }
    gate_up
}

/// The activations [`grouped_experts`] writes between and after its two GEMMs.
#[derive(Debug)]
pub struct ExpertActivations<'a> {
    /// At least `[rows, I]`: `SiLU(gate) * up`.
    pub act: &'a mut DeviceBuffer<bf16>,
    /// `[rows, H]`: the expert outputs, in the rows' order.
    pub out: DeviceViewMut<'a, bf16>,
    /// The split GEMMs' f32 partial sums (see [`split_k`]).
    pub partials: &'a mut DeviceBuffer<f32>,
}

/// Both expert GEMMs on `rows` `[R, H]` grouped by expert as `offsets` `[E + 1]` says
/// (permute's `expert_first_token_offset`, read on the device): the gate/up GEMM with
/// the SiLU in its epilogue, then the down GEMM, split along K at decode sizes for
/// `multiprocessors` SMs. On `stream`; no host wait.
pub fn grouped_experts(
    stream: &Stream<'_>,
    multiprocessors: usize,
    (h, i): (usize, usize),
    rows: DeviceView<'_, bf16>,
    offsets: DeviceView<'_, i64>,
    weights: ExpertWeights<'_>,
    activations: ExpertActivations<'_>,
) -> Result<()> {
    let entries = rows.len() / h.max(1);
    let experts = offsets.len().saturating_sub(1);
    let ExpertActivations { act, out, partials } = activations;
    grouped_gemm(
        stream,
        GemmEpilogue::SiluMul,
        GroupedGemmShape {
            max_rows: entries,
            n: i,
            k: h,
            splits: split_k(
                GemmEpilogue::SiluMul,
                (entries, i, h),
                experts,
                multiprocessors,
            ),
        },
        GroupedGemmOperands {
            a: rows,
            b: weights.gate_up,
            tiles: RowTiles::Offsets(offsets),
            c: act.view_mut().prefix(entries * i),
            partials: Some(partials.view_mut()),
        },
    )?;
    grouped_gemm(
        stream,
        GemmEpilogue::Plain,
        GroupedGemmShape {
            max_rows: entries,
            n: h,
            k: i,
            splits: split_k(
                GemmEpilogue::Plain,
                (entries, h, i),
                experts,
                multiprocessors,
            ),
        },
        GroupedGemmOperands {
            a: act.view().prefix(entries * i),
            b: weights.down,
            tiles: RowTiles::Offsets(offsets),
            c: out.prefix(entries * h),
            partials: Some(partials.view_mut()),
        },
    )
}
