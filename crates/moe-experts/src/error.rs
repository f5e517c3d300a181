//! Errors of the expert backends, the MoE block and checkpoint loading.

use moe_runtime::MoeError;
use moe_runtime::cuda::cudarc::cublas::result::CublasError;

/// Everything that can go wrong in an expert backend, a MoE block or loading a
/// checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ExpertsError {
    /// The runtime refused a call (permute, unpermute, align, a device view or buffer,
    /// a size or an allocation).
    #[error(transparent)]
    Runtime(#[from] MoeError),
    /// The checkpoint lacks a tensor the layer's layout names.
    #[error("checkpoint: tensor {name} is missing (looked for the {layout} layout)")]
    MissingTensor {
        /// The tensor's name in the checkpoint.
        name: String,
        /// The layout found from the router's name ([`Layout::name`](crate::Layout::name)).
        layout: &'static str,
    },
    /// The layer's MoE module holds a tensor the block would not read (a shared expert,
    /// a router bias, a score correction, quantisation scales): refused, since the
    /// output would be wrong without it.
    #[error(
        "checkpoint: tensor {name} is part of this {layout} MoE layer, but the block does not implement it (a shared expert, router bias, score correction or quantisation scale would be ignored and the output wrong)"
    )]
    UnsupportedTensor {
        /// The tensor's name.
        name: String,
        /// The layout the layer was read as.
        layout: &'static str,
    },
    /// A checkpoint tensor has another shape than the layer's sizes imply.
    #[error("checkpoint: tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name in the checkpoint.
        name: String,
        /// The shape the layer needs (0 where any size would do).
        expected: Vec<usize>,
        /// The tensor's shape.
        got: Vec<usize>,
    },
    /// A checkpoint tensor is neither bf16 nor f32.
    #[error("checkpoint: tensor {name} is {got}, expected bf16 or f32")]
    TensorDtype {
        /// The tensor's name in the checkpoint.
        name: String,
        /// Its dtype, as safetensors names it.
        got: String,
    },
    /// The checkpoint has no router weight under `prefix` in any known layout.
    #[error(
        "checkpoint: no MoE layer under prefix {prefix:?} (looked for {prefix}.block_sparse_moe.gate.weight and {prefix}.mlp.gate.weight)"
    )]
    NoMoeLayer {
        /// The layer prefix asked for, e.g. `model.layers.3`.
        prefix: String,
    },
    /// The bytes are not a valid safetensors file (the parser's message).
    #[error("checkpoint: {0}")]
    Format(String),
    /// The checkpoint file cannot be read.
    #[error("cannot read {path}")]
    Io {
        /// The file's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor of a block or backend call has the wrong length: not whole rows, not
    /// one row per token, too small for a GEMM or kernel, or beyond what a launch can
    /// address.
    #[error("{tensor} has {len} elements: {expected}")]
    Shape {
        /// The tensor, by name.
        tensor: &'static str,
        /// Its length, in elements.
        len: usize,
        /// What the call needs of it.
        expected: String,
    },
    /// A configuration, or weights, that a block or backend cannot run: sizes of 0,
    /// `top_k` outside `1..=num_experts`, weights of other sizes, limits of the GPU
    /// router, a workspace on another device.
    #[error("invalid MoE configuration: {0}")]
    Config(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS failed to {action}")]
    Blas {
        /// What the call was for.
        action: &'static str,
        /// cuBLAS's error.
        #[source]
        source: CublasError,
    },
    /// cuBLAS cannot be loaded (no `libcublas`): the caller can fall back to the CPU.
    #[error("cuBLAS cannot be used on {device}: {reason}")]
    BlasUnavailable {
        /// The device the handle was asked for.
        device: moe_runtime::Device,
        /// Why cuBLAS cannot be used.
        reason: String,
    },
    /// The backend cannot run on this device as configured (Humming's indexed variant on
    /// a GPU needs align blocks of 64 rows).
    #[error("the {backend} backend cannot run on {device}: {reason}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The device asked for.
        device: moe_runtime::Device,
        /// Why it cannot run there.
        reason: &'static str,
    },
}

/// The expert crate's result type.
pub type Result<T, E = ExpertsError> = std::result::Result<T, E>;
