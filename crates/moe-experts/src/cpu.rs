//! The expert backends on the CPU.
//!
//! All three compute the same function: permute (or align), each expert's MLP over its
//! rows, and the weighted combine. They differ in who owns the permuted activations,
//! which is what the permute scratch is shaped by:
//! - [`GroupedExperts`] (CUTLASS-style): the scratch holds only the index buffers; the
//!   backend owns the permuted activations.
//! - [`HummingExperts`]: the scratch owns `permuted_hidden_states`.
//! - [`IndexedExperts`] (Humming's indexed variant): no row is moved; `align` sorts the
//!   entries into blocks and each block's GEMM gathers its rows from `hidden_states`.

use half::bf16;
use moe_runtime::cpu::{self, PermuteDest, PermuteInput, PermuteOutput, UnpermuteInput};
use moe_runtime::size::{product, zeroed};
use moe_runtime::{DType, Device, Rows, RowsMut, ScratchConfig, TopkIds};
use ndarray::Array2;
use rayon::prelude::*;

use crate::mlp::{CpuWeights, widen_rows};
use crate::shared::{ScratchGuard, ScratchSource, SharedWorkspace};
use crate::{ExpertsError, MoeConfig, Result};

/// An expert backend on the CPU.
pub trait CpuExperts: Send + std::fmt::Debug {
    /// The backend's name, for reports.
    fn name(&self) -> &'static str;

    /// Takes the permute scratch from `workspace` from now on.
    fn use_workspace(&mut self, workspace: SharedWorkspace);

    /// `out [N, H] = sum over k of topk_weights[t,k] * expert(topk_ids[t,k])(hidden[t])`.
    ///
    /// `hidden`, `topk_weights` and `out` hold one row per token of `topk_ids`
    /// (`[N, H]`, `[N, K]`, `[N, H]`), and `weights` are of the backend's shape; a call
    /// that breaks any of these is an error, the same from every backend.
    fn apply(
        &mut self,
        weights: &CpuWeights,
        hidden: &[bf16],
        topk_ids: &[i32],
        topk_weights: &[f32],
        out: &mut [bf16],
    ) -> Result<()>;
}

/// Each expert's MLP over its group of `rows` `[valid, H]` (groups from `offsets`),
/// in parallel over experts: the grouped GEMMs.
fn grouped_mlp(weights: &CpuWeights, rows: &[bf16], offsets: &[i64]) -> Result<Vec<bf16>> {
    let hidden = weights.hidden;
    let groups: Vec<(usize, usize, usize)> = offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| (e, w[0] as usize, w[1] as usize))
        .collect();
    let outputs: Vec<(usize, Array2<f32>)> = groups
        .into_par_iter()
        .map(|(expert, first, end)| {
            let x = widen_rows(&rows[first * hidden..end * hidden], hidden);
            (first, weights.expert(expert, x.view()))
        })
        .collect();
    let valid = offsets.last().map_or(0, |&v| v as usize);
    let mut out = zeroed(
        "the expert outputs",
        product("expert outputs (valid rows * H)", &[valid, hidden])?,
    )?;
    for (first, y) in outputs {
        for (dst, &v) in out[first * hidden..].iter_mut().zip(y.iter()) {
            *dst = bf16::from_f32(v);
        }
    }
    Ok(out)
}

fn combine(
    expert_rows: &[bf16],
    hidden: usize,
    inv: &[i32],
    offsets: &[i64],
    topk_weights: &[f32],
    topk: usize,
    out: &mut [bf16],
) -> Result<()> {
    cpu::unpermute_into(
        &UnpermuteInput {
            permuted_hidden_states: expert_rows,
            hidden_size: hidden,
            inv_permuted_idx: inv,
            expert_first_token_offset: offsets,
            topk_weights,
            topk,
        },
        out,
    )?;
    Ok(())
}

/// The grouped backends' steps after permute: each expert's MLP over its group of
/// permuted rows, then the weighted combine into `out`.
fn experts_and_combine(
    weights: &CpuWeights,
    routed: &PermuteOutput<'_>,
    topk_weights: &[f32],
    topk: usize,
    out: &mut [bf16],
) -> Result<()> {
    let rows = routed.permuted_hidden_states.as_slice::<bf16>()?;
    let expert_rows = grouped_mlp(weights, rows, routed.expert_first_token_offset)?;
    combine(
        &expert_rows,
        weights.hidden,
        routed.inv_permuted_idx,
        routed.expert_first_token_offset,
        topk_weights,
        topk,
        out,
    )
}

/// What every CPU backend holds: where its scratch comes from, and the block's shape.
#[derive(Debug)]
struct Base {
    source: ScratchSource,
    topk: usize,
    hidden: usize,
    experts: usize,
}

impl Base {
    /// A backend's base: a CPU scratch of `L == E` experts for `max_num_tokens`,
    /// owning what `buffers` adds to the request.
    fn new(
        config: &MoeConfig,
        workspace: SharedWorkspace,
        max_num_tokens: usize,
        buffers: impl FnOnce(ScratchConfig) -> ScratchConfig,
    ) -> Self {
        let request = ScratchConfig::new(
            max_num_tokens,
            config.top_k,
            config.num_experts,
            config.num_experts,
            Device::Cpu,
        );
        Self {
            source: ScratchSource {
                workspace,
                request: buffers(request),
            },
            topk: config.top_k,
            hidden: config.hidden_size,
            experts: config.num_experts,
        }
    }

    /// The checks every backend runs before any work, so that all of them refuse the
    /// same calls with the same errors: `weights` are of the backend's shape,
    /// `topk_ids` holds whole tokens of `K`, and `hidden`, `topk_weights` and `out`
    /// hold one row each per token. Returns the checked `topk_ids`.
    fn check_call<'a>(
        &self,
        weights: &CpuWeights,
        hidden: &[bf16],
        topk_ids: &'a [i32],
        topk_weights: &[f32],
        out: &[bf16],
    ) -> Result<TopkIds<'a>> {
        weights.check(self.hidden, self.experts)?;
        let ids = TopkIds::new(topk_ids, self.topk)?;
        let tokens = ids.num_tokens();
        let rows = product("hidden_states elements (N * H)", &[tokens, self.hidden])?;
        let shapes = [
            ("hidden_states", hidden.len(), rows, "N*H"),
            ("topk_weights", topk_weights.len(), topk_ids.len(), "N*K"),
            ("output", out.len(), rows, "N*H"),
        ];
        for (tensor, len, expected, what) in shapes {
            if len != expected {
                return Err(ExpertsError::Shape {
                    tensor,
                    len,
                    expected: format!("{what} = {expected}, for the {tokens} tokens of topk_ids"),
                });
            }
        }
        Ok(ids)
    }
}

/// CUTLASS-style grouped experts: permute into the backend's own activation buffer,
/// grouped GEMMs over `expert_first_token_offset`, unpermute.
#[derive(Debug)]
pub struct GroupedExperts {
    base: Base,
    /// The permuted activations: owned here, not by the scratch.
    permuted: Vec<bf16>,
}

impl GroupedExperts {
    /// A backend for calls of up to `max_num_tokens` (larger calls grow the shared
    /// scratch while its workspace is unlocked). Nothing is allocated until the first
    /// call.
    pub fn new(config: &MoeConfig, workspace: SharedWorkspace, max_num_tokens: usize) -> Self {
        Self {
            base: Base::new(config, workspace, max_num_tokens, |request| request),
            permuted: Vec::new(),
        }
    }

    /// The permute scratch for a call of `num_tokens`, built on first use.
    pub fn get_permute_scratch(&self, num_tokens: usize) -> Result<ScratchGuard<'_>> {
        self.base.source.get(num_tokens)
    }
}

impl CpuExperts for GroupedExperts {
    fn name(&self) -> &'static str {
        "grouped"
    }

    fn use_workspace(&mut self, workspace: SharedWorkspace) {
        self.base.source.workspace = workspace;
    }

    fn apply(
        &mut self,
        weights: &CpuWeights,
        hidden: &[bf16],
        topk_ids: &[i32],
        topk_weights: &[f32],
        out: &mut [bf16],
    ) -> Result<()> {
        let ids = self
            .base
            .check_call(weights, hidden, topk_ids, topk_weights, out)?;
        let (h, k) = (self.base.hidden, self.base.topk);
        let len = product("permuted activations (N*K * H)", &[topk_ids.len(), h])?;
        if self.permuted.len() < len {
            // Released first: peak memory stays one buffer.
            self.permuted = Vec::new();
            self.permuted = zeroed("the grouped backend's permuted activations", len)?;
        }
        let mut scratch = self.base.source.get(ids.num_tokens())?;
        let dest = PermuteDest {
            hidden_states: RowsMut::new(&mut self.permuted[..len], h)?,
            scales: None,
        };
        let input = PermuteInput::new(Rows::new(hidden, h)?, ids);
        let routed = cpu::permute_into(&mut scratch, &input, dest)?;
        experts_and_combine(weights, &routed, topk_weights, k, out)
    }
}

/// Humming-style experts: the scratch owns `permuted_hidden_states` (built with the
/// hidden size and dtype); the grouped GEMMs read it there.
#[derive(Debug)]
pub struct HummingExperts {
    base: Base,
}

impl HummingExperts {
    /// A backend for calls of up to `max_num_tokens`, whose scratch owns bf16 rows of
    /// `H` (larger calls grow the shared scratch while its workspace is unlocked).
    /// Nothing is allocated until the first call.
    pub fn new(config: &MoeConfig, workspace: SharedWorkspace, max_num_tokens: usize) -> Self {
        let rows = |request: ScratchConfig| request.with_rows(config.hidden_size, DType::BF16);
        Self {
            base: Base::new(config, workspace, max_num_tokens, rows),
        }
    }

    /// The permute scratch for a call of `num_tokens`, built on first use.
    pub fn get_permute_scratch(&self, num_tokens: usize) -> Result<ScratchGuard<'_>> {
        self.base.source.get(num_tokens)
    }
}

impl CpuExperts for HummingExperts {
    fn name(&self) -> &'static str {
        "humming"
    }

    fn use_workspace(&mut self, workspace: SharedWorkspace) {
        self.base.source.workspace = workspace;
    }

    fn apply(
        &mut self,
        weights: &CpuWeights,
        hidden: &[bf16],
        topk_ids: &[i32],
        topk_weights: &[f32],
        out: &mut [bf16],
    ) -> Result<()> {
        let ids = self
            .base
            .check_call(weights, hidden, topk_ids, topk_weights, out)?;
        let (h, k) = (self.base.hidden, self.base.topk);
        let mut scratch = self.base.source.get(ids.num_tokens())?;
        let input = PermuteInput::new(Rows::new(hidden, h)?, ids);
        let routed = cpu::permute(&mut scratch, &input)?;
        experts_and_combine(weights, &routed, topk_weights, k, out)
    }
}

/// Humming's indexed variant: `align` sorts the entries into blocks of `block_size`
/// rows per expert, and each block's GEMM gathers its rows from `hidden_states` by
/// index: no row is moved before the GEMMs.
#[derive(Debug)]
pub struct IndexedExperts {
    base: Base,
}

impl IndexedExperts {
    /// A backend for calls of up to `max_num_tokens`, aligning to `block_size` rows
    /// (larger calls grow the shared scratch while its workspace is unlocked). Nothing
    /// is allocated until the first call.
    pub fn new(
        config: &MoeConfig,
        workspace: SharedWorkspace,
        max_num_tokens: usize,
        block_size: usize,
    ) -> Self {
        let align = |request: ScratchConfig| request.with_align_block_size(block_size);
        Self {
            base: Base::new(config, workspace, max_num_tokens, align),
        }
    }

    /// The permute scratch for a call of `num_tokens`, built on first use.
    pub fn get_permute_scratch(&self, num_tokens: usize) -> Result<ScratchGuard<'_>> {
        self.base.source.get(num_tokens)
    }
}

impl CpuExperts for IndexedExperts {
    fn name(&self) -> &'static str {
        "humming-indexed"
    }

    fn use_workspace(&mut self, workspace: SharedWorkspace) {
        self.base.source.workspace = workspace;
    }

    fn apply(
        &mut self,
        weights: &CpuWeights,
        hidden: &[bf16],
        topk_ids: &[i32],
        topk_weights: &[f32],
        out: &mut [bf16],
    ) -> Result<()> {
        let ids = self
            .base
            .check_call(weights, hidden, topk_ids, topk_weights, out)?;
        let (h, k) = (self.base.hidden, self.base.topk);
        let entries = topk_ids.len();
        let mut scratch = self.base.source.get(ids.num_tokens())?;
        let aligned = cpu::align(&mut scratch, &ids, None)?;
        let block = aligned.block_size;
        let padded = aligned.num_rows_post_padded;
        let sorted = &aligned.sorted_ids[..padded];
        // Each block: gather its kept rows from hidden_states, run its expert.
        let blocks: Vec<Vec<bf16>> = sorted
            .par_chunks(block)
            .zip(aligned.block_expert_ids.par_iter())
            .map(|(ids, &expert)| {
                let kept: Vec<usize> = ids
                    .iter()
                    .map(|&f| f as usize)
                    .take_while(|&f| f < entries)
                    .collect();
                let mut x = Array2::<f32>::zeros((kept.len(), h));
                for (mut row, &f) in x.rows_mut().into_iter().zip(&kept) {
                    let token = f / k;
                    for (dst, src) in row.iter_mut().zip(&hidden[token * h..(token + 1) * h]) {
                        *dst = src.to_f32();
                    }
                }
                let y = weights.expert(expert as usize, x.view());
                y.iter().map(|&v| bf16::from_f32(v)).collect()
            })
            .collect();
        // Expert rows by padded position; each entry's position for the combine.
        let mut expert_rows = zeroed(
            "the expert outputs",
            product("expert outputs (padded rows * H)", &[padded, h])?,
        )?;
        for (b, rows) in blocks.iter().enumerate() {
            expert_rows[b * block * h..][..rows.len()].copy_from_slice(rows);
        }
        let mut inv = vec![i32::MAX; entries];
        for (position, &f) in sorted.iter().enumerate() {
            if (f as usize) < entries {
                inv[f as usize] = position as i32;
            }
        }
        combine(
            &expert_rows,
            h,
            &inv,
            &[padded as i64],
            topk_weights,
            k,
            out,
        )
    }
}
