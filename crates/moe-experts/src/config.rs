//! The shape and routing settings of one MoE block.

use crate::{ExpertsError, Result, Routing};

/// What a MoE block is: sizes and the router's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// `H`.
    pub hidden_size: usize,
    /// `I`, each expert's intermediate size.
    pub intermediate_size: usize,
    /// `E`.
    pub num_experts: usize,
    /// `K`, experts per token.
    pub top_k: usize,
    /// Renormalise the `K` chosen probabilities to sum to 1 (Mixtral always does;
    /// Qwen3-MoE and DeepSeek-V3 take it from `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// How logits become experts and weights.
    pub routing: Routing,
    /// The intermediate size of the shared expert, the MLP every token also goes
    /// through (DeepSeek-V3's `moe_intermediate_size * n_shared_experts`); 0 for none.
    pub shared_intermediate_size: usize,
}

impl MoeConfig {
    /// Checks that a block can run: `H`, `I` and `E` at least 1, `K` in `1..=E`
    /// ([`ExpertsError::Config`] names the first that is not).
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(ExpertsError::Config(what.to_string()));
        if self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("hidden_size and intermediate_size must be at least 1");
        }
        if self.num_experts == 0 {
            return bad("num_experts must be at least 1");
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad("top_k must be in 1..=num_experts");
        }
        if let Routing::Grouped(grouped) = &self.routing {
            grouped.check(self.num_experts, self.top_k)?;
        }
        Ok(())
    }
}
