//! The MoE block: router, experts, weighted combine.

use half::bf16;

use crate::cpu::{CpuExperts, GroupedExperts, HummingExperts, IndexedExperts};
use crate::mlp::{CpuWeights, widen_rows};
use crate::router::{Routing, route, route_grouped};
use crate::shared::SharedWorkspace;
use crate::{ExpertsError, MoeConfig, MoeWeights, Result};

/// Which expert backend a block runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertsKind {
    /// CUTLASS-style grouped GEMMs; the backend owns the permuted activations.
    Grouped,
    /// Humming-style: the permute scratch owns the permuted activations.
    Humming,
    /// Humming's indexed variant: align, and GEMMs that gather rows by index.
    HummingIndexed {
        /// Rows per block: each expert's group is padded to a multiple of it.
        block_size: usize,
    },
}

/// What one block call returns: the output and the routing that produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockOutput {
    /// `[N, H]`.
    pub hidden_states: Vec<bf16>,
    /// `[N, K]`.
    pub topk_ids: Vec<i32>,
    /// `[N, K]`.
    pub topk_weights: Vec<f32>,
}

/// One MoE layer on the CPU.
#[derive(Debug)]
pub struct CpuMoeBlock {
    config: MoeConfig,
    weights: CpuWeights,
    experts: Box<dyn CpuExperts>,
}

impl CpuMoeBlock {
    /// A block of `weights` running `kind`, its permute scratch taken from `workspace`
    /// on first use (sized for `max_num_tokens`, grown if a call is larger while the
    /// workspace is unlocked).
    pub fn new(
        config: MoeConfig,
        weights: &MoeWeights,
        kind: ExpertsKind,
        workspace: SharedWorkspace,
        max_num_tokens: usize,
    ) -> Result<Self> {
        weights.check(&config)?;
        let experts: Box<dyn CpuExperts> = match kind {
            ExpertsKind::Grouped => {
                Box::new(GroupedExperts::new(&config, workspace, max_num_tokens))
            }
            ExpertsKind::Humming => {
                Box::new(HummingExperts::new(&config, workspace, max_num_tokens))
            }
            ExpertsKind::HummingIndexed { block_size } => Box::new(IndexedExperts::new(
                &config,
                workspace,
                max_num_tokens,
                block_size,
            )),
        };
        Ok(Self {
            weights: CpuWeights::new(weights),
            config,
            experts,
        })
    }

    /// The block's sizes and routing settings.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The expert backend's name ([`CpuExperts::name`](crate::cpu::CpuExperts::name)).
    pub fn backend(&self) -> &'static str {
        self.experts.name()
    }

    /// Takes the permute scratch from `workspace` from now on (for example a fresh one
    /// per call, to measure what allocating costs).
    pub fn use_workspace(&mut self, workspace: SharedWorkspace) {
        self.experts.use_workspace(workspace);
    }

    /// Runs the block on `hidden_states` `[N, H]`.
    pub fn forward(&mut self, hidden_states: &[bf16]) -> Result<BlockOutput> {
        let (h, k, e) = (
            self.config.hidden_size,
            self.config.top_k,
            self.config.num_experts,
        );
        if hidden_states.len() % h != 0 {
            return Err(ExpertsError::Shape {
                tensor: "hidden_states",
                len: hidden_states.len(),
                expected: format!("whole rows of hidden_size {h}"),
            });
        }
        let tokens = hidden_states.len() / h;
        // The router's `[N, E]` logits (and `[N, K]` routing, K <= E) are larger than
        // the input when E > H: their size is checked first.
        moe_runtime::size::product("router logits (N * E)", &[tokens, e])?;
        // Widened once: the router and the shared expert read the same rows.
        let rows = widen_rows(hidden_states, h);
        let logits = self.weights.router_logits(rows.view());
        let mut topk_ids = vec![0i32; tokens * k];
        let mut topk_weights = vec![0f32; tokens * k];
        let logits = logits.as_standard_layout();
        let logits = logits.as_slice().expect("standard layout");
        let norm = self.config.norm_topk_prob;
        match &self.config.routing {
            Routing::Softmax => route(logits, e, k, norm, &mut topk_ids, &mut topk_weights)?,
            Routing::Grouped(grouped) => {
                // Present: `MoeWeights::check` requires it for this routing.
                let bias = self.weights.router_bias.as_deref().unwrap_or_default();
                route_grouped(
                    logits,
                    bias,
                    e,
                    k,
                    grouped,
                    norm,
                    &mut topk_ids,
                    &mut topk_weights,
                )?
            }
        }
        let mut out = vec![bf16::ZERO; tokens * h];
        self.experts.apply(
            &self.weights,
            hidden_states,
            &topk_ids,
            &topk_weights,
            &mut out,
        )?;
        // The shared expert's output added to the routed one, as two bf16 tensors add.
        if let Some(shared) = self.weights.shared_expert(rows.view()) {
            for (out, &s) in out.iter_mut().zip(shared.iter()) {
                *out = bf16::from_f32(out.to_f32() + s);
            }
        }
        Ok(BlockOutput {
            hidden_states: out,
            topk_ids,
            topk_weights,
        })
    }
}
