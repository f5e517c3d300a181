//! An MoE block for candle models: candle's matmuls for the router and the experts,
//! moe-permute's permute and unpermute around them.

use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Error, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::{Scratch, permute, unpermute};

/// One permute scratch for the blocks of every layer of a model: built by the first
/// call, rebuilt only for a call larger than any before.
#[derive(Clone, Debug, Default)]
pub struct SharedScratch(Arc<Mutex<Option<Scratch>>>);

impl SharedScratch {
    /// An empty one: the first call builds the scratch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on a scratch for `tokens` tokens choosing `topk` of `experts` on
    /// `device`, built on first use (`get_permute_scratch()`).
    fn with<R>(
        &self,
        device: &candle_core::Device,
        (tokens, topk, experts): (usize, usize, usize),
        f: impl FnOnce(&mut Scratch) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| Error::msg("a block panicked while it held the shared scratch"))?;
        let fits = slot.as_ref().is_some_and(|s| {
            let c = s.config();
            s.device().same_device(device)
                && c.max_num_tokens >= tokens
                && c.topk == topk
                && c.num_experts == experts
        });
        if !fits {
            *slot = None;
            *slot = Some(Scratch::new(device, tokens.max(1), topk, experts, None)?);
        }
        f(slot.as_mut().expect("built above"))
    }
}

/// One expert: `w2(SiLU(w1 x) * w3 x)`.
#[derive(Clone, Debug)]
struct Expert {
    /// `[I, H]`, the gate projection.
    w1: Tensor,
    /// `[I, H]`, the up projection.
    w3: Tensor,
    /// `[H, I]`, the down projection.
    w2: Tensor,
}

impl Expert {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&xs.matmul(&self.w1.t()?)?)?;
        let up = xs.matmul(&self.w3.t()?)?;
        (gate * up)?.matmul(&self.w2.t()?)
    }
}

/// A sparse MoE block: softmax router, top-k, the experts' SwiGLU MLPs over each
/// expert's contiguous rows, the weighted combine. Loads from the tensor names of
/// candle-transformers' Mixtral ([`Self::mixtral`]) and Qwen3-MoE
/// ([`Self::qwen3_moe`]) blocks and computes what they compute, so a model swaps one
/// type.
#[derive(Clone, Debug)]
pub struct MoeBlock {
    /// `[E, H]`.
    gate: Tensor,
    experts: Vec<Expert>,
    top_k: usize,
    norm_topk_prob: bool,
    scratch: SharedScratch,
}

impl MoeBlock {
    /// Mixtral's `block_sparse_moe` (`vb` at `model.layers.{i}.block_sparse_moe`):
    /// `gate.weight`, `experts.{e}.w1/w3/w2.weight`; the top-k weights always
    /// renormalised.
    pub fn mixtral(
        hidden_size: usize,
        intermediate_size: usize,
        num_experts: usize,
        top_k: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Self::load(
            (hidden_size, intermediate_size, num_experts, top_k, true),
            ["w1", "w3", "w2"],
            vb,
        )
    }

    /// Qwen3-MoE's `mlp` (`vb` at `model.layers.{i}.mlp`): `gate.weight`,
    /// `experts.{e}.gate_proj/up_proj/down_proj.weight`; renormalised when
    /// `norm_topk_prob`.
    pub fn qwen3_moe(
        hidden_size: usize,
        moe_intermediate_size: usize,
        num_experts: usize,
        top_k: usize,
        norm_topk_prob: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Self::load(
            (
                hidden_size,
                moe_intermediate_size,
                num_experts,
                top_k,
                norm_topk_prob,
            ),
            ["gate_proj", "up_proj", "down_proj"],
            vb,
        )
    }

    fn load(
        (h, i, e, top_k, norm_topk_prob): (usize, usize, usize, usize, bool),
        [gate, up, down]: [&str; 3],
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if top_k == 0 || top_k > e {
            return Err(Error::msg(format!(
                "top_k {top_k} must be in 1..={e} (num_experts)"
            )));
        }
        let experts_vb = vb.pp("experts");
        let experts = (0..e)
            .map(|x| {
                let vb = experts_vb.pp(x);
                Ok(Expert {
                    w1: vb.get((i, h), &format!("{gate}.weight"))?,
                    w3: vb.get((i, h), &format!("{up}.weight"))?,
                    w2: vb.get((h, i), &format!("{down}.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate: vb.get((e, h), "gate.weight")?,
            experts,
            top_k,
            norm_topk_prob,
            scratch: SharedScratch::new(),
        })
    }

    /// Takes the permute scratch from `scratch` (one for all layers of a model).
    pub fn with_scratch(mut self, scratch: SharedScratch) -> Self {
        self.scratch = scratch;
        self
    }

    /// Each token's `K` experts and weights (`[N, K]` u32 and f32 tensors) from its
    /// router logits: softmax in the activations' dtype, as candle-transformers'
    /// blocks compute it, the `K` most probable (ties to the lower id), renormalised
    /// when asked; and the experts' first rows, counted from the same ids on the host.
    ///
    /// The top-k runs on the host, as in candle-transformers' blocks (one wait for the
    /// device per layer): the host then knows each expert's row count without reading
    /// permute's offsets back, which the per-expert GEMMs need.
    fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = xs.matmul(&self.gate.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let k = self.top_k;
        let mut ids = Vec::with_capacity(probs.len() * k);
        let mut weights = Vec::with_capacity(probs.len() * k);
        let mut first_rows = vec![0usize; self.experts.len() + 1];
        let mut order: Vec<u32> = Vec::new();
        for p in &probs {
            order.clear();
            order.extend(0..p.len() as u32);
            // A stable sort: equal probabilities keep the lower id first.
            order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
            let chosen = &order[..k];
            let total: f32 = chosen.iter().map(|&x| p[x as usize]).sum();
            ids.extend_from_slice(chosen);
            weights.extend(chosen.iter().map(|&x| {
                let w = p[x as usize];
                if self.norm_topk_prob { w / total } else { w }
            }));
            for &x in chosen {
                first_rows[x as usize + 1] += 1;
            }
        }
        for e in 0..self.experts.len() {
            first_rows[e + 1] += first_rows[e];
        }
        let n = probs.len();
        Ok(Routing {
            ids: Tensor::from_vec(ids, (n, k), xs.device())?,
            weights: Tensor::from_vec(weights, (n, k), xs.device())?,
            first_rows,
        })
    }
}

/// A layer's routing: what permute and unpermute take, and what the host knows.
struct Routing {
    /// `[N, K]` u32.
    ids: Tensor,
    /// `[N, K]` f32.
    weights: Tensor,
    /// `[E + 1]`: expert `e`'s permuted rows are `first_rows[e]..first_rows[e + 1]`,
    /// as permute's `expert_first_token_offset` says on the device.
    first_rows: Vec<usize>,
}

impl Module for MoeBlock {
    /// `xs` `[..., H]` (a model's `[B, S, H]`) to the same shape.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let shape = xs.shape().clone();
        let h = xs.dim(D::Minus1)?;
        let xs = xs.reshape(((), h))?;
        let n = xs.dim(0)?;
        let routing = self.route(&xs)?;
        let key = (n, self.top_k, self.experts.len());
        self.scratch
            .with(xs.device(), key, |scratch| {
                let permuted = permute(scratch, &xs, &routing.ids)?;
                let mut outputs = Vec::with_capacity(self.experts.len());
                for (expert, bounds) in self.experts.iter().zip(routing.first_rows.windows(2)) {
                    let (first, end) = (bounds[0], bounds[1]);
                    if end > first {
                        let rows = permuted
                            .permuted_hidden_states
                            .narrow(0, first, end - first)?;
                        outputs.push(expert.forward(&rows)?);
                    }
                }
                let expert_out = if outputs.is_empty() {
                    Tensor::zeros((0, h), xs.dtype(), xs.device())?
                } else {
                    Tensor::cat(&outputs, 0)?
                };
                unpermute(
                    scratch,
                    &expert_out,
                    &permuted.inv_permuted_idx,
                    &permuted.expert_first_token_offset,
                    &routing.weights,
                )
            })?
            .reshape(shape)
    }
}
