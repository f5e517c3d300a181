//! One permute scratch shared by many users: every MoE layer of a model, or several
//! expert backends, so that scratch memory does not grow with the layer count.

use std::sync::Arc;

use crate::cuda::CudaDevice;
use crate::{Device, MoeError, PermuteScratch, Result, ScratchConfig};

/// Holds one [`PermuteScratch`] for users that run one after another.
///
/// While unlocked, a request the current scratch cannot serve rebuilds it large enough
/// for every request seen so far (warm-up). Once locked (before capturing CUDA graphs,
/// whose recorded addresses must stay valid) it never reallocates: a request that
/// would need more memory is an error.
#[derive(Debug, Default)]
pub struct ScratchWorkspace {
    scratch: Option<PermuteScratch>,
    locked: bool,
    /// Where a CUDA scratch is built (its context and kernels). Without one, a CUDA
    /// scratch opens its configuration's device itself.
    cuda_device: Option<Arc<CudaDevice>>,
}

impl ScratchWorkspace {
    /// An empty, unlocked workspace; a CUDA scratch built in it opens its device itself
    /// ([`PermuteScratch::new`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A workspace whose CUDA scratches are built on `device`, with its context and
    /// kernels.
    pub fn on_cuda_device(device: Arc<CudaDevice>) -> Self {
        Self {
            cuda_device: Some(device),
            ..Self::default()
        }
    }

    /// The CUDA device a CUDA scratch is built on, if one was given.
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        self.cuda_device.as_ref()
    }

    /// A scratch that serves `request`, built or grown if needed and allowed.
    ///
    /// Users of one workspace must agree on `topk`, the expert counts, the device and,
    /// where both ask for them, the owned rows and align block size.
    ///
    /// A request that cannot be served leaves the current scratch to the other users:
    /// a configuration that cannot be built is refused before the scratch is released,
    /// and when building the grown scratch fails (out of memory), the previous one is
    /// built again before the error is returned.
    pub fn get(&mut self, request: &ScratchConfig) -> Result<&mut PermuteScratch> {
        let merged = match &self.scratch {
            Some(current) if current.config().covers(request) => None,
            Some(current) => Some(merge(current.config(), request)?),
            None => Some(request.clone()),
        };
        if let Some(merged) = merged {
            if self.locked {
                return Err(MoeError::WorkspaceLocked {
                    reason: match &self.scratch {
                        Some(current) => format!(
                            "its scratch ({:?}) cannot serve {request:?}",
                            current.config()
                        ),
                        None => "no scratch was built before locking".into(),
                    },
                });
            }
            // A configuration that cannot be built fails here, while the scratch every
            // other user shares is still in place.
            merged.check_buildable()?;
            // Release the old buffers first: peak memory stays one scratch.
            let previous = self
                .scratch
                .take()
                .map(|old| (old.config().clone(), old.cuda_device().cloned()));
            match self.build(merged, None) {
                Ok(scratch) => self.scratch = Some(scratch),
                Err(error) => {
                    // Out of memory, say: give the other users back the scratch they
                    // had, on the device (and stream) it was on. Should even that fail,
                    // the workspace is left empty and the next request builds anew.
                    if let Some((config, device)) = previous {
                        self.scratch = self.build(config, device).ok();
                    }
                    return Err(error);
                }
            }
        }
        Ok(self.scratch.as_mut().expect("built above when absent"))
    }

    /// A scratch for `config`: on `device` when given, else on the workspace's CUDA
    /// device for a CUDA configuration, else as [`PermuteScratch::new`] builds it.
    fn build(
        &self,
        config: ScratchConfig,
        device: Option<Arc<CudaDevice>>,
    ) -> Result<PermuteScratch> {
        match (device.or_else(|| self.cuda_device.clone()), config.device) {
            (Some(device), Device::Cuda(_)) => PermuteScratch::with_cuda_device(config, device),
            _ => PermuteScratch::new(config),
        }
    }

    /// The scratch, if one was built.
    pub fn scratch(&self) -> Option<&PermuteScratch> {
        self.scratch.as_ref()
    }

    /// The scratch for a call, if one was built.
    pub fn scratch_mut(&mut self) -> Option<&mut PermuteScratch> {
        self.scratch.as_mut()
    }

    /// Refuses any further growth.
    pub fn lock(&mut self) {
        self.locked = true;
    }

    /// Allows growth again (for example before a new warm-up at a larger batch size).
    pub fn unlock(&mut self) {
        self.locked = false;
    }

    /// Whether growth is refused.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

/// The smallest configuration that serves both, or the first field they disagree on.
fn merge(current: &ScratchConfig, request: &ScratchConfig) -> Result<ScratchConfig> {
    fn agree<T: PartialEq + std::fmt::Debug>(field: &'static str, a: &T, b: &T) -> Result<()> {
        if a == b {
            Ok(())
        } else {
            Err(MoeError::WorkspaceConflict {
                field,
                current: format!("{a:?}"),
                requested: format!("{b:?}"),
            })
        }
    }
    fn either<T: PartialEq + std::fmt::Debug + Copy>(
        field: &'static str,
        a: Option<T>,
        b: Option<T>,
    ) -> Result<Option<T>> {
        match (a, b) {
            (Some(a), Some(b)) => agree(field, &a, &b).map(|()| Some(a)),
            (a, b) => Ok(a.or(b)),
        }
    }
    agree("topk", &current.topk, &request.topk)?;
    agree("num_experts", &current.num_experts, &request.num_experts)?;
    agree(
        "num_local_experts",
        &current.num_local_experts,
        &request.num_local_experts,
    )?;
    agree("device", &current.device, &request.device)?;
    Ok(ScratchConfig {
        max_num_tokens: current.max_num_tokens.max(request.max_num_tokens),
        rows: either("rows", current.rows, request.rows)?,
        align_block_size: either(
            "align_block_size",
            current.align_block_size,
            request.align_block_size,
        )?,
        ..current.clone()
    })
}
