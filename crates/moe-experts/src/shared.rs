//! The permute scratch as the backends see it: one workspace shared by the backends
//! of every layer, a scratch built in it lazily, on a backend's first call.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use moe_runtime::{PermuteScratch, ScratchConfig, ScratchWorkspace};

use crate::Result;

/// A [`ScratchWorkspace`] the backends of many layers share (clone it to share): the
/// layers run one after another, so one scratch serves them all and memory does not
/// grow with the layer count.
#[derive(Clone, Debug, Default)]
pub struct SharedWorkspace(Arc<Mutex<ScratchWorkspace>>);

impl SharedWorkspace {
    /// An empty workspace with no CUDA device: for CPU backends
    /// ([`CudaMoeBlock`](crate::CudaMoeBlock) needs [`Self::on_cuda_device`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A workspace for backends on a CUDA device: its scratch is built there (each
    /// call chooses its stream).
    pub fn on_cuda_device(device: std::sync::Arc<moe_runtime::cuda::CudaDevice>) -> Self {
        Self(Arc::new(Mutex::new(ScratchWorkspace::on_cuda_device(
            device,
        ))))
    }

    /// The workspace itself (to lock it before graph capture, or inspect it).
    pub fn lock(&self) -> MutexGuard<'_, ScratchWorkspace> {
        // A panic while the lock was held cannot leave the workspace half-changed: its
        // only mutation replaces the scratch whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The scratch a backend asked for, held for the length of one call.
#[derive(Debug)]
pub struct ScratchGuard<'a>(MutexGuard<'a, ScratchWorkspace>);

impl Deref for ScratchGuard<'_> {
    type Target = PermuteScratch;
    fn deref(&self) -> &PermuteScratch {
        self.0
            .scratch()
            .expect("a guard is made only after the scratch was built")
    }
}

impl DerefMut for ScratchGuard<'_> {
    fn deref_mut(&mut self) -> &mut PermuteScratch {
        self.0
            .scratch_mut()
            .expect("a guard is made only after the scratch was built")
    }
}

/// What a backend asks of the shared workspace.
#[derive(Clone, Debug)]
pub(crate) struct ScratchSource {
    pub(crate) workspace: SharedWorkspace,
    /// The scratch the backend needs; `max_num_tokens` is the size to build it for at
    /// first (a larger call grows it while the workspace is unlocked).
    pub(crate) request: ScratchConfig,
}

impl ScratchSource {
    /// `get_permute_scratch()`: the scratch for a call of `num_tokens`, built on first
    /// use, then reused.
    pub(crate) fn get(&self, num_tokens: usize) -> Result<ScratchGuard<'_>> {
        let mut request = self.request.clone();
        request.max_num_tokens = request.max_num_tokens.max(num_tokens);
        let mut workspace = self.workspace.lock();
        workspace.get(&request)?;
        Ok(ScratchGuard(workspace))
    }
}
