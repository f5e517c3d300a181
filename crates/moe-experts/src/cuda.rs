//! The MoE block on a CUDA device: cuBLAS for the GEMMs, the project's kernels for
//! everything else.
//!
//! One step waits on the host: the grouped GEMMs need each expert's row count to
//! issue one cuBLAS GEMM per expert, so `expert_first_token_offset` (`L + 1` values) is
//! copied back after permute. Everything else is queued on the device's stream. A
//! grouped GEMM that reads the offsets on the device (a kernel of the project's own,
//! or cuBLASLt's grouped GEMM with device-side sizes) would remove that wait; until
//! then a whole block cannot be captured in a CUDA graph, while its permute and
//! unpermute can.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use moe_runtime::cuda::{
    self, Blas, CudaDevice, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput, DeviceRows,
    DeviceRowsMut, DeviceTopkIds, DeviceUnpermuteInput, DeviceView, DeviceViewMut,
};
use moe_runtime::{DType, MoeError, ScratchConfig};

use crate::shared::{ScratchGuard, ScratchSource, SharedWorkspace};
use crate::{BlockOutput, ExpertsError, ExpertsKind, MoeConfig, MoeWeights, Result};

fn driver(action: &'static str) -> impl Fn(cudarc::driver::DriverError) -> ExpertsError {
    move |error| {
        ExpertsError::Runtime(MoeError::Driver {
            action,
            error: error.to_string(),
        })
    }
}

fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        return stream
            .alloc_zeros(1)
            .map_err(driver("allocate device memory"));
    }
    stream
        .clone_htod(host)
        .map_err(driver("copy weights to the device"))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    stream
        .alloc_zeros(len.max(1))
        .map_err(driver("allocate the block's activations"))
}

/// The block's device activations, sized for a number of tokens.
#[derive(Debug)]
struct Activations {
    tokens: usize,
    hidden: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    topk_ids: CudaSlice<i32>,
    topk_weights: CudaSlice<f32>,
    /// The grouped backend's own permuted activations (unused by Humming's).
    permuted: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    expert_out: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
}

impl Activations {
    fn new(
        stream: &Arc<CudaStream>,
        config: &MoeConfig,
        tokens: usize,
        grouped: bool,
    ) -> Result<Self> {
        let (h, i, e, k) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.top_k,
        );
        let entries = tokens * k;
        Ok(Self {
            tokens,
            hidden: zeros(stream, tokens * h)?,
            logits: zeros(stream, tokens * e)?,
            topk_ids: zeros(stream, entries)?,
            topk_weights: zeros(stream, entries)?,
            permuted: zeros(stream, if grouped { entries * h } else { 0 })?,
            gate_up: zeros(stream, entries * 2 * i)?,
            act: zeros(stream, entries * i)?,
            expert_out: zeros(stream, entries * h)?,
            out: zeros(stream, tokens * h)?,
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
    router: CudaSlice<bf16>,
    /// `[E, 2I, H]`: each expert's gate rows, then its up rows: one GEMM gives both.
    gate_up: CudaSlice<bf16>,
    /// `[E, H, I]`.
    down: CudaSlice<bf16>,
    source: ScratchSource,
    activations: Option<Activations>,
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
            ExpertsKind::HummingIndexed { .. } => {
                return Err(ExpertsError::Unsupported {
                    backend: "humming-indexed",
                    device: device.device(),
                    reason: "its GEMMs gather rows by index, which cuBLAS cannot do, and the project has no gather GEMM kernel yet",
                });
            }
        };
        let (h, i, e) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
        );
        let mut gate_up = Vec::with_capacity(e * 2 * i * h);
        for expert in 0..e {
            gate_up.extend_from_slice(&weights.gate_proj[expert * i * h..][..i * h]);
            gate_up.extend_from_slice(&weights.up_proj[expert * i * h..][..i * h]);
        }
        let stream = device.stream().clone();
        Ok(Self {
            router: upload(&stream, &weights.router)?,
            gate_up: upload(&stream, &gate_up)?,
            down: upload(&stream, &weights.down_proj)?,
            blas: Blas::new(device)?,
            source: ScratchSource { workspace, request },
            activations: None,
            config,
            kind,
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

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

    /// Runs the block on host `hidden_states` `[N, H]`: uploads them, queues the
    /// block, and copies the output and the routing back.
    pub fn forward(&mut self, hidden_states: &[bf16]) -> Result<BlockOutput> {
        let (h, k) = (self.config.hidden_size, self.config.top_k);
        if hidden_states.len() % h != 0 {
            return Err(ExpertsError::Shape {
                tensor: "hidden_states",
                len: hidden_states.len(),
                expected: format!("whole rows of hidden_size {h}"),
            });
        }
        let tokens = hidden_states.len() / h;
        let stream = self.device().stream().clone();
        self.reserve(tokens)?;
        if tokens > 0 {
            let activations = self.activations.as_mut().expect("reserved above");
            let mut view = activations.hidden.slice_mut(0..tokens * h);
            stream
                .memcpy_htod(hidden_states, &mut view)
                .map_err(driver("copy hidden states to the device"))?;
        }
        self.forward_reserved(tokens)?;
        let activations = self.activations.as_ref().expect("reserved above");
        let hidden_states = DeviceView::new(&activations.out)
            .prefix(tokens * h)
            .to_host(&stream)?;
        let topk_ids = DeviceView::new(&activations.topk_ids)
            .prefix(tokens * k)
            .to_host(&stream)?;
        let topk_weights = DeviceView::new(&activations.topk_weights)
            .prefix(tokens * k)
            .to_host(&stream)?;
        Ok(BlockOutput {
            hidden_states,
            topk_ids,
            topk_weights,
        })
    }

    /// Runs the block on hidden states already on the device, leaving the output in
    /// the block's activations (read it with [`Self::output`]): what a serving stack
    /// whose activations live on the GPU does. The input is copied once on the device.
    pub fn forward_device(&mut self, hidden_states: DeviceView<'_, bf16>) -> Result<()> {
        let h = self.config.hidden_size;
        if hidden_states.len() % h != 0 {
            return Err(ExpertsError::Shape {
                tensor: "hidden_states",
                len: hidden_states.len(),
                expected: format!("whole rows of hidden_size {h}"),
            });
        }
        let tokens = hidden_states.len() / h;
        self.reserve(tokens)?;
        let activations = self.activations.as_mut().expect("reserved above");
        if tokens > 0 {
            cuda::copy_device(
                self.blas.device(),
                hidden_states,
                DeviceViewMut::new(&mut activations.hidden).prefix(tokens * h),
            )?;
        }
        self.forward_reserved(tokens)
    }

    /// The output `[N, H]` of the last [`Self::forward_device`] call of `tokens` tokens.
    pub fn output(&self, tokens: usize) -> Option<DeviceView<'_, bf16>> {
        let activations = self.activations.as_ref()?;
        (tokens <= activations.tokens)
            .then(|| DeviceView::new(&activations.out).prefix(tokens * self.config.hidden_size))
    }

    /// Makes sure the activations hold `tokens` tokens (allocating on first use and
    /// when a call is larger than any before).
    fn reserve(&mut self, tokens: usize) -> Result<()> {
        if self.activations.as_ref().is_none_or(|a| a.tokens < tokens) {
            let size = tokens.max(self.source.request.max_num_tokens);
            let grouped = self.kind == ExpertsKind::Grouped;
            let stream = self.device().stream().clone();
            self.activations = None;
            self.activations = Some(Activations::new(&stream, &self.config, size, grouped)?);
        }
        Ok(())
    }

    /// The block on the first `tokens` rows already in `activations.hidden`.
    fn forward_reserved(&mut self, tokens: usize) -> Result<()> {
        let (h, i, e, k) = (
            self.config.hidden_size,
            self.config.intermediate_size,
            self.config.num_experts,
            self.config.top_k,
        );
        let device = self.blas.device().clone();
        let stream = device.stream().clone();
        let entries = tokens * k;
        let activations = self.activations.as_mut().expect("reserved by the caller");
        let hidden = DeviceView::new(&activations.hidden).prefix(tokens * h);

        // Router: logits = hidden * router^T in f32, then softmax / top-k on the device.
        self.blas.matmul_nt(
            (tokens, e, h),
            hidden,
            DeviceView::new(&self.router),
            DeviceViewMut::new(&mut activations.logits).prefix(tokens * e),
        )?;
        cuda::router_topk(
            &device,
            DeviceView::new(&activations.logits).prefix(tokens * e),
            e,
            k,
            self.config.norm_topk_prob,
            DeviceViewMut::new(&mut activations.topk_ids).prefix(entries),
            DeviceViewMut::new(&mut activations.topk_weights).prefix(entries),
        )?;

        // Permute, into the backend's own buffer or the scratch's.
        let mut scratch = self.source.get(tokens)?;
        let input = DevicePermuteInput::new(
            DeviceRows::new(hidden, h)?,
            DeviceTopkIds::new(
                DeviceExpertIds::I32(DeviceView::new(&activations.topk_ids).prefix(entries)),
                k,
            )?,
        );
        let routed = match self.kind {
            ExpertsKind::Grouped => {
                let dest = DevicePermuteDest {
                    hidden_states: DeviceRowsMut::new(
                        DeviceViewMut::new(&mut activations.permuted).prefix(entries * h),
                        h,
                    )?,
                    scales: None,
                };
                cuda::permute_into(&mut scratch, &input, dest)?
            }
            _ => cuda::permute(&mut scratch, &input)?,
        };
        let rows = routed.permuted_hidden_states.typed::<bf16>()?;

        // The one host wait: each expert's row count, for one GEMM per expert.
        let offsets = routed.expert_first_token_offset.to_host(&stream)?;
        let valid = offsets.last().map_or(0, |&v| v as usize);
        let gate_up_w = DeviceView::new(&self.gate_up);
        let down_w = DeviceView::new(&self.down);
        for (expert, bounds) in offsets.windows(2).enumerate() {
            let (first, end) = (bounds[0] as usize, bounds[1] as usize);
            if end > first {
                self.blas.matmul_nt(
                    (end - first, 2 * i, h),
                    rows.range(first * h, (end - first) * h)?,
                    gate_up_w.range(expert * 2 * i * h, 2 * i * h)?,
                    DeviceViewMut::new(&mut activations.gate_up)
                        .range(first * 2 * i, (end - first) * 2 * i)?,
                )?;
            }
        }
        cuda::silu_mul(
            &device,
            DeviceView::new(&activations.gate_up).prefix(valid * 2 * i),
            valid,
            i,
            DeviceViewMut::new(&mut activations.act).prefix(valid * i),
        )?;
        for (expert, bounds) in offsets.windows(2).enumerate() {
            let (first, end) = (bounds[0] as usize, bounds[1] as usize);
            if end > first {
                self.blas.matmul_nt(
                    (end - first, h, i),
                    DeviceView::new(&activations.act).range(first * i, (end - first) * i)?,
                    down_w.range(expert * h * i, h * i)?,
                    DeviceViewMut::new(&mut activations.expert_out)
                        .range(first * h, (end - first) * h)?,
                )?;
            }
        }

        // The weighted combine.
        let combine = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::new(
                DeviceView::new(&activations.expert_out).prefix(entries * h),
                h,
            )?,
            inv_permuted_idx: routed.inv_permuted_idx,
            expert_first_token_offset: routed.expert_first_token_offset,
            topk_weights: DeviceView::new(&activations.topk_weights).prefix(entries),
            topk: k,
        };
        let out = DeviceRowsMut::new(
            DeviceViewMut::new(&mut activations.out).prefix(tokens * h),
            h,
        )?;
        cuda::unpermute_into(&device, &combine, out)?;
        Ok(())
    }
}
