//! Errors of the expert backends, the MoE block and checkpoint loading.

use moe_runtime::MoeError;
use moe_runtime::cuda::cudarc::cublas::result::CublasError;

#[derive(Debug, thiserror::Error)]
pub enum ExpertsError {
    #[error(transparent)]
    Runtime(#[from] MoeError),
    #[error("checkpoint: tensor {name} is missing (looked for the {layout} layout)")]
    MissingTensor { name: String, layout: &'static str },
    #[error("checkpoint: tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("checkpoint: tensor {name} is {got}, expected bf16 or f32")]
    TensorDtype { name: String, got: String },
    #[error(
        "checkpoint: no MoE layer under prefix {prefix:?} (looked for {prefix}.block_sparse_moe.gate.weight and {prefix}.mlp.gate.weight)"
    )]
    NoMoeLayer { prefix: String },
    #[error("checkpoint: {0}")]
    Format(String),
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tensor} has {len} elements: {expected}")]
    Shape {
        tensor: &'static str,
        len: usize,
        expected: String,
    },
    #[error("invalid MoE configuration: {0}")]
    Config(String),
    #[error("cuBLAS failed to {action}")]
    Blas {
        action: &'static str,
        #[source]
        source: CublasError,
    },
    #[error("cuBLAS cannot be used on {device}: {reason}")]
    BlasUnavailable {
        device: moe_runtime::Device,
        reason: String,
    },
    #[error("the {backend} backend cannot run on {device}: {reason}")]
    Unsupported {
        backend: &'static str,
        device: moe_runtime::Device,
        reason: &'static str,
    },
}

pub type Result<T, E = ExpertsError> = std::result::Result<T, E>;
