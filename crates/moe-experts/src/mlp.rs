//! One expert's MLP on the CPU: `down(SiLU(gate(x)) * up(x))`, bf16 in and out, f32
//! accumulation, rounded to bf16 at the same points as the GPU path (each GEMM's
//! output and the activation).

use half::bf16;
use ndarray::{Array2, ArrayView2};

use crate::weights::check_lens;
use crate::{ExpertsError, MoeWeights, Result};

/// The weights widened to f32 once, so each GEMM runs in f32 (ndarray's
/// matrixmultiply) on bf16 values.
#[derive(Debug)]
pub struct CpuWeights {
    pub(crate) hidden: usize,
    pub(crate) intermediate: usize,
    pub(crate) experts: usize,
    router: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    pub(crate) router_bias: Option<Vec<f32>>,
    /// The shared expert: `I_s` and its gate, up and down projections.
    shared: Option<(usize, [Vec<f32>; 3])>,
}

fn widen(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// Rounds every element to bf16 (kept as f32), as a bf16 tensor would hold it.
pub(crate) fn round_bf16(values: &mut Array2<f32>) {
    values.mapv_inplace(|v| bf16::from_f32(v).to_f32());
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl CpuWeights {
    /// `weights` widened to f32 (a copy; not checked: the backends check the copy
    /// before every call).
    pub fn new(weights: &MoeWeights) -> Self {
        Self {
            hidden: weights.hidden_size,
            intermediate: weights.intermediate_size,
            experts: weights.num_experts,
            router: widen(&weights.router),
            gate: widen(&weights.gate_proj),
            up: widen(&weights.up_proj),
            down: widen(&weights.down_proj),
            router_bias: weights.router_bias.clone(),
            shared: weights.shared.as_ref().map(|s| {
                let projections = [&s.gate_proj, &s.up_proj, &s.down_proj].map(|p| widen(p));
                (s.intermediate_size, projections)
            }),
        }
    }

    /// Checks that these are the weights of a layer of `hidden` and `experts` (a
    /// backend's shape) and hold every value their sizes imply: [`Self::new`] takes any
    /// [`MoeWeights`], checked or not.
    pub(crate) fn check(&self, hidden: usize, experts: usize) -> Result<()> {
        let dims = (self.hidden, self.experts);
        if dims != (hidden, experts) {
            return Err(ExpertsError::Config(format!(
                "weights are (H, E) = {dims:?}, the backend is {:?}",
                (hidden, experts)
            )));
        }
        check_lens(
            self.hidden,
            self.intermediate,
            self.experts,
            [
                self.router.len(),
                self.gate.len(),
                self.up.len(),
                self.down.len(),
            ],
        )
    }

    fn matrix<'a>(
        &self,
        all: &'a [f32],
        expert: usize,
        rows: usize,
        cols: usize,
    ) -> ArrayView2<'a, f32> {
        let size = rows * cols;
        ArrayView2::from_shape((rows, cols), &all[expert * size..(expert + 1) * size])
            .expect("sized by the weights' own dimensions")
    }

    /// Router logits `[N, E]` in f32 for `x` `[N, H]`.
    pub(crate) fn router_logits(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let router = self.matrix(&self.router, 0, self.experts, self.hidden);
        x.dot(&router.t())
    }

    /// Expert `expert`'s MLP on the rows of `x` `[m, H]`: `[m, H]`, bf16-rounded.
    pub(crate) fn expert(&self, expert: usize, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let (h, i) = (self.hidden, self.intermediate);
        mlp(
            x,
            self.matrix(&self.gate, expert, i, h),
            self.matrix(&self.up, expert, i, h),
            self.matrix(&self.down, expert, h, i),
        )
    }

    /// The shared expert's MLP on `x` `[N, H]`, where the layer has one.
    pub(crate) fn shared_expert(&self, x: ArrayView2<'_, f32>) -> Option<Array2<f32>> {
        let (i, [gate, up, down]) = self.shared.as_ref()?;
        let (h, i) = (self.hidden, *i);
        // One matrix each: the shared expert is "expert 0" of its own tensors.
        Some(mlp(
            x,
            self.matrix(gate, 0, i, h),
            self.matrix(up, 0, i, h),
            self.matrix(down, 0, h, i),
        ))
    }
}

/// `down(SiLU(gate(x)) * up(x))` on the rows of `x` `[m, H]`: `[m, H]`, rounded to
/// bf16 after each GEMM and the activation, as the GPU path and a bf16 model are.
fn mlp(
    x: ArrayView2<'_, f32>,
    gate: ArrayView2<'_, f32>,
    up: ArrayView2<'_, f32>,
    down: ArrayView2<'_, f32>,
) -> Array2<f32> {
    let mut gate = x.dot(&gate.t());
    let mut up = x.dot(&up.t());
    round_bf16(&mut gate);
    round_bf16(&mut up);
    let mut act = gate;
    act.zip_mut_with(&up, |g, &u| *g = bf16::from_f32(silu(*g) * u).to_f32());
    let mut out = act.dot(&down.t());
    round_bf16(&mut out);
    out
}

/// `rows` of bf16 values `[m, H]` as an f32 matrix.
pub(crate) fn widen_rows(rows: &[bf16], hidden: usize) -> Array2<f32> {
    Array2::from_shape_vec((rows.len() / hidden, hidden), widen(rows))
        .expect("whole rows of the hidden size")
}
