//! The MoE block with its experts spread over ranks: each rank routes its own tokens
//! (the router is replicated), the exchange sends their entries to the experts' ranks
//! and back, and each rank adds the shared expert for its own tokens.

use std::path::Path;
use std::sync::Arc;

use half::bf16;
use moe_experts::cuda::{
    Blas, DeviceRouter, DeviceSharedExpert, ExpertActivations, ExpertWeights, MAX_SPLITS,
    SPLIT_MAX_ROWS, SharedActivations, grouped_experts, multiprocessors, stack_gate_up,
};
use moe_experts::{BlockOutput, MoeConfig, MoeWeights, Routing};
use moe_kernels::GEMM_ALIGN;
use moe_runtime::cuda::{
    CudaDevice, DeviceBuffer, DeviceRows, DeviceScales, DeviceView, DeviceViewMut, Stream,
};
use moe_runtime::size::product;

use crate::exchange::{
    EpExchange, ExchangeInput, ExchangeMode, ExchangeShape, LocalExperts, zeros,
};
use crate::nccl::Communicator;
use crate::placement::ExpertPlacement;
use crate::{EpError, Result};

/// A rank's experts on the project's grouped GEMMs.
#[derive(Debug)]
struct GroupedLocalExperts {
    /// `[L, 2I, H]` and `[L, H, I]`, by local id.
    gate_up: DeviceBuffer<bf16>,
    down: DeviceBuffer<bf16>,
    act: DeviceBuffer<bf16>,
    partials: DeviceBuffer<f32>,
    multiprocessors: usize,
    hidden_size: usize,
    intermediate_size: usize,
}

impl LocalExperts for GroupedLocalExperts {
    fn run(
        &mut self,
        stream: &Stream<'_>,
        rows: DeviceRows<'_>,
        _: Option<DeviceScales<'_>>,
        offsets: DeviceView<'_, i64>,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        Ok(grouped_experts(
            stream,
            self.multiprocessors,
            (self.hidden_size, self.intermediate_size),
            rows.typed::<bf16>()?,
            offsets,
            ExpertWeights {
                gate_up: self.gate_up.view(),
                down: self.down.view(),
            },
            ExpertActivations {
                act: &mut self.act,
                out,
                partials: &mut self.partials,
            },
        )?)
    }
}

/// The block's own activations, for `max_num_tokens` tokens.
#[derive(Debug)]
struct Activations {
    hidden: DeviceBuffer<bf16>,
    logits: DeviceBuffer<f32>,
    topk_ids: DeviceBuffer<i32>,
    topk_weights: DeviceBuffer<f32>,
    out: DeviceBuffer<bf16>,
    shared_gate_up: DeviceBuffer<bf16>,
    shared_act: DeviceBuffer<bf16>,
    shared_out: DeviceBuffer<bf16>,
}

/// What every rank must agree on, gathered from all at setup.
const AGREED: [&str; 10] = [
    "the hidden size",
    "the intermediate size",
    "the number of experts",
    "top-k",
    "the routing",
    "norm_topk_prob",
    "the shared expert's size",
    "max_num_tokens",
    "the exchange mode",
    "the expert map's length",
];

/// One MoE layer on this rank of an expert-parallel group.
#[derive(Debug)]
pub struct EpMoeBlock {
    config: MoeConfig,
    exchange: EpExchange,
    blas: Blas,
    router: DeviceRouter,
    shared: Option<DeviceSharedExpert>,
    experts: GroupedLocalExperts,
    activations: Activations,
    max_num_tokens: usize,
}

/// FNV-1a of a setting's text: ranks compare settings without sending text.
fn fingerprint(text: &str) -> i64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    }) as i64
}

/// All ranks' `values` (the same length on every rank), gathered on every rank and
/// read on the host (setup only).
fn gather_on_host<T>(comm: &Communicator, stream: &Stream<'_>, values: &[T]) -> Result<Vec<T>>
where
    T: crate::nccl::NcclElement + moe_runtime::cuda::ValidAsZeroBits + Default + Clone,
{
    let device = comm.device();
    let mine = DeviceBuffer::from_host(device, values)?;
    let mut all = DeviceBuffer::<T>::zeros(device, values.len() * comm.world())?;
    comm.all_gather(stream, mine.view(), all.view_mut())?;
    Ok(all.view().to_host(stream)?)
}

impl EpMoeBlock {
    /// This rank's block: `weights` is the whole layer (as every rank loads it from
    /// the same checkpoint); the rank uploads the router, the shared expert and the
    /// experts `expert_map` gives it (`[E]`: local id, or -1). The layers of a model
    /// share one communicator. Collective: every rank of `comm` calls it (the same
    /// blocks in the same order), and every rank returns the same error when the ranks
    /// disagree on the model or the placement, or when any rank's own setup fails.
    pub fn new(
        comm: Arc<Communicator>,
        config: MoeConfig,
        weights: &MoeWeights,
        expert_map: &[i32],
        mode: ExchangeMode,
        max_num_tokens: usize,
    ) -> Result<Self> {
        let local = Self::check_locally(&config, weights, expert_map);
        let placement = Self::agree(&comm, &config, expert_map, mode, max_num_tokens, local)?;
        // What can still fail is this rank's own (memory, the driver): every rank says
        // whether it got its block, so none goes on to a call another will never join.
        let built = Self::build(
            comm.clone(),
            config,
            weights,
            placement,
            mode,
            max_num_tokens,
        );
        let device = comm.device();
        let cu_stream = device.new_stream()?;
        let stream = device.stream(&cu_stream)?;
        let flags = gather_on_host(&comm, &stream, &[i32::from(built.is_err())])?;
        match (built, flags.iter().position(|&flag| flag != 0)) {
            (Ok(block), None) => Ok(block),
            (Err(error), _) => Err(error),
            (Ok(_), Some(rank)) => Err(EpError::PeerFailed {
                rank,
                what: "building its block",
            }),
        }
    }

    /// The block of an agreed setup: uploads and allocations, this rank alone.
    fn build(
        comm: Arc<Communicator>,
        config: MoeConfig,
        weights: &MoeWeights,
        placement: ExpertPlacement,
        mode: ExchangeMode,
        max_num_tokens: usize,
    ) -> Result<Self> {
        let device = comm.device().clone();
        let world = comm.world();

        let (h, i, e, k) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.top_k,
        );
        let local_experts = placement.local_experts(comm.rank());
        let down: Vec<bf16> = local_experts
            .iter()
            .flat_map(|&expert| &weights.down_proj[expert * h * i..][..h * i])
            .copied()
            .collect();
        let shape = ExchangeShape::bf16(e, k, h, max_num_tokens);
        let rows = product("rows received (W * M * K)", &[world, max_num_tokens, k])?;
        let shared_rows = if weights.shared.is_some() {
            max_num_tokens
        } else {
            0
        };
        let s = config.shared_intermediate_size;
        let entries = product("entries (M * K)", &[max_num_tokens, k])?;
        let activations = Activations {
            hidden: zeros(&device, product("hidden states", &[max_num_tokens, h])?)?,
            logits: zeros(&device, product("router logits", &[max_num_tokens, e])?)?,
            topk_ids: zeros(&device, entries)?,
            topk_weights: zeros(&device, entries)?,
            out: zeros(&device, product("block output", &[max_num_tokens, h])?)?,
            shared_gate_up: zeros(&device, product("shared gate/up", &[shared_rows, 2, s])?)?,
            shared_act: zeros(&device, product("shared activations", &[shared_rows, s])?)?,
            shared_out: zeros(&device, product("shared output", &[shared_rows, h])?)?,
        };
        let experts = GroupedLocalExperts {
            gate_up: DeviceBuffer::from_host(&device, &stack_gate_up(weights, &local_experts))?,
            down: DeviceBuffer::from_host(&device, &down)?,
            act: zeros(
                &device,
                product("expert activations (W * M * K * I)", &[rows, i])?,
            )?,
            partials: zeros(
                &device,
                product(
                    "split GEMM partial sums",
                    &[MAX_SPLITS, rows.min(SPLIT_MAX_ROWS), (2 * i).max(h)],
                )?,
            )?,
            multiprocessors: multiprocessors(&device)?,
            hidden_size: h,
            intermediate_size: i,
        };
        Ok(Self {
            blas: Blas::new(device.clone())?,
            router: DeviceRouter::new(&device, weights)?,
            shared: DeviceSharedExpert::new(&device, weights)?,
            exchange: EpExchange::new(comm, placement, shape, mode)?,
            experts,
            activations,
            max_num_tokens,
            config,
        })
    }

    /// This rank's block from a checkpoint: the layer under `prefix` (as
    /// [`MoeWeights::load`] finds it), of whose experts this rank reads only the ones
    /// `expert_map` gives it ([`MoeWeights::load_experts`]). Collective like
    /// [`Self::new`]: a rank that cannot read the checkpoint still takes part in the
    /// setup, so every rank returns an error.
    pub fn load(
        comm: Arc<Communicator>,
        checkpoint: &Path,
        prefix: &str,
        config: MoeConfig,
        expert_map: &[i32],
        mode: ExchangeMode,
        max_num_tokens: usize,
    ) -> Result<Self> {
        let experts: Vec<usize> = (0..expert_map.len())
            .filter(|&e| expert_map[e] >= 0)
            .collect();
        match MoeWeights::load_experts(checkpoint, prefix, &experts) {
            Ok((weights, _)) => Self::new(comm, config, &weights, expert_map, mode, max_num_tokens),
            Err(error) => {
                let failed = Self::agree(
                    &comm,
                    &config,
                    expert_map,
                    mode,
                    max_num_tokens,
                    Err(error.into()),
                );
                Err(failed
                    .err()
                    .unwrap_or_else(|| EpError::Shape("the checkpoint could not be read".into())))
            }
        }
    }

    /// The setup every rank runs alike: gathers each rank's settings and whether its
    /// own checks (`local`) passed, compares them, gathers the expert maps, and
    /// returns the placement, or the same error on every rank.
    fn agree(
        comm: &Communicator,
        config: &MoeConfig,
        expert_map: &[i32],
        mode: ExchangeMode,
        max_num_tokens: usize,
        local: Result<()>,
    ) -> Result<ExpertPlacement> {
        let device = comm.device();
        let cu_stream = device.new_stream()?;
        let stream = device.stream(&cu_stream)?;
        let routing = match &config.routing {
            Routing::Softmax => "softmax".to_string(),
            Routing::Grouped(grouped) => format!("{grouped:?}"),
        };
        let header: Vec<i64> = [
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.top_k,
        ]
        .iter()
        .map(|&v| v as i64)
        .chain([
            fingerprint(&routing),
            i64::from(config.norm_topk_prob),
            config.shared_intermediate_size as i64,
            max_num_tokens as i64,
            fingerprint(mode.name()),
            expert_map.len() as i64,
            i64::from(local.is_err()),
        ])
        .collect();
        let world = comm.world();
        let headers = gather_on_host(comm, &stream, &header)?;
        let headers: Vec<&[i64]> = headers.chunks(header.len()).collect();
        if let Some(rank) = headers.iter().position(|h| h[AGREED.len()] != 0) {
            local?;
            return Err(EpError::PeerFailed {
                rank,
                what: "its setup",
            });
        }
        local?;
        for (field, what) in AGREED.iter().enumerate() {
            if headers.iter().any(|h| h[field] != headers[0][field]) {
                let values = (0..world)
                    .map(|r| format!("rank {r}: {}", headers[r][field]))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(EpError::RanksDisagree { what, values });
            }
        }
        let maps = gather_on_host(comm, &stream, expert_map)?;
        let maps: Vec<Vec<i32>> = maps.chunks(expert_map.len()).map(<[i32]>::to_vec).collect();
        ExpertPlacement::from_expert_maps(&maps)
    }

    /// What this rank can check alone before setup.
    fn check_locally(config: &MoeConfig, weights: &MoeWeights, expert_map: &[i32]) -> Result<()> {
        config.check()?;
        weights.check(config)?;
        if expert_map.len() != config.num_experts {
            return Err(EpError::Placement(format!(
                "the expert map has {} entries for {} experts",
                expert_map.len(),
                config.num_experts
            )));
        }
        let align = GEMM_ALIGN as usize;
        if config.hidden_size % align != 0 || config.intermediate_size % align != 0 {
            return Err(EpError::Shape(format!(
                "the expert-parallel block runs the grouped GEMMs, which need the hidden ({}) \
                 and intermediate ({}) sizes to be multiples of {align}",
                config.hidden_size, config.intermediate_size
            )));
        }
        Ok(())
    }

    /// The block's sizes and routing.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The exchange (its communicator, placement and mode).
    pub fn exchange(&self) -> &EpExchange {
        &self.exchange
    }

    /// The device the block runs on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        self.exchange.comm().device()
    }

    /// Runs the block on this rank's `hidden_states` `[N, H]` (on the device) on
    /// `stream`; the output stays on the device ([`Self::output`]). Every rank calls
    /// it, each with its own tokens (zero is allowed). A call with more than
    /// `max_num_tokens` tokens still takes part in the exchange, with none, then
    /// returns its error ([`EpExchange::take_part_and_fail`]).
    pub fn forward_device(
        &mut self,
        stream: &Stream<'_>,
        hidden_states: DeviceView<'_, bf16>,
    ) -> Result<()> {
        let (h, k) = (self.config.hidden_size, self.config.top_k);
        let len = hidden_states.len();
        let checked = if len % h != 0 {
            Err(EpError::Shape(format!(
                "hidden_states has {len} elements, not whole rows of {h}"
            )))
        } else if len / h > self.max_num_tokens {
            Err(EpError::Shape(format!(
                "{} tokens, more than the {} (max_num_tokens) the block was built for",
                len / h,
                self.max_num_tokens
            )))
        } else {
            Ok(len / h)
        };
        let tokens = match checked {
            Ok(tokens) => tokens,
            Err(error) => {
                return self
                    .exchange
                    .take_part_and_fail(stream, &mut self.experts, error);
            }
        };
        let a = &mut self.activations;
        hidden_states
            .prefix(tokens * h)
            .copy_into(a.hidden.view_mut().prefix(tokens * h), stream)?;
        let hidden = a.hidden.view().prefix(tokens * h);
        self.router.route(
            &mut self.blas,
            stream,
            &self.config,
            hidden,
            &mut a.logits,
            a.topk_ids.view_mut().prefix(tokens * k),
            a.topk_weights.view_mut().prefix(tokens * k),
        )?;
        self.exchange.forward(
            stream,
            ExchangeInput {
                hidden_states: DeviceRows::new(hidden, h)?,
                scales: None,
                topk_ids: a.topk_ids.view().prefix(tokens * k),
                topk_weights: a.topk_weights.view().prefix(tokens * k),
            },
            &mut self.experts,
            a.out.view_mut().prefix(tokens * h),
        )?;
        if let Some(shared) = &self.shared {
            shared.add_into(
                &mut self.blas,
                stream,
                (hidden, h),
                SharedActivations {
                    gate_up: &mut a.shared_gate_up,
                    act: &mut a.shared_act,
                    out: &mut a.shared_out,
                },
                a.out.view_mut().prefix(tokens * h),
            )?;
        }
        Ok(())
    }

    /// The output `[N, H]` of the last [`Self::forward_device`] call of `tokens`.
    pub fn output(&self, tokens: usize) -> Option<DeviceView<'_, bf16>> {
        (tokens <= self.max_num_tokens).then(|| {
            self.activations
                .out
                .view()
                .prefix(tokens * self.config.hidden_size)
        })
    }

    /// [`Self::forward_device`] on host rows: uploads them, runs the block, and copies
    /// the output and this rank's routing back (waits for the stream).
    pub fn forward(&mut self, stream: &Stream<'_>, hidden_states: &[bf16]) -> Result<BlockOutput> {
        let (h, k) = (self.config.hidden_size, self.config.top_k);
        let device = self.device().clone();
        let upload = if hidden_states.is_empty() {
            DeviceBuffer::zeros(&device, 1)?
        } else {
            DeviceBuffer::from_host(&device, hidden_states)?
        };
        self.forward_device(stream, upload.view().prefix(hidden_states.len()))?;
        let tokens = hidden_states.len() / h;
        let a = &self.activations;
        Ok(BlockOutput {
            hidden_states: a.out.view().prefix(tokens * h).to_host(stream)?,
            topk_ids: a.topk_ids.view().prefix(tokens * k).to_host(stream)?,
            topk_weights: a.topk_weights.view().prefix(tokens * k).to_host(stream)?,
        })
    }
}
