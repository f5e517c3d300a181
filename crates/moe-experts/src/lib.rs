//! Expert backends and the whole MoE block, on top of moe-permute's runtime.
//!
//! A block routes each token (softmax over the router's logits, top-k, optional
//! renormalisation; or DeepSeek-V3's grouped sigmoid routing), runs each token's `K`
//! experts (`down(SiLU(gate(x)) * up(x))`) and sums their outputs, weighted, plus a
//! shared expert's output where the layer has one. The experts run through a backend that takes its
//! permute scratch from a [`SharedWorkspace`], lazily, on first use
//! (`get_permute_scratch()`): the backends of every layer can share one workspace, so
//! scratch memory does not grow with the layer count.
//!
//! Weights and activations are bf16, every GEMM accumulates in f32, and values are
//! rounded to bf16 where a bf16 tensor would hold them (each GEMM's output and the
//! activation), on the CPU and the GPU alike.

#![warn(missing_docs)]

mod block;
mod checkpoint;
mod config;
pub mod cpu;
pub mod cuda;
mod error;
mod mlp;
mod router;
mod shared;
mod weights;

pub use block::{BlockOutput, CpuMoeBlock, ExpertsKind};
pub use checkpoint::{INDEX_FILE, SINGLE_FILE};
pub use config::MoeConfig;
pub use cuda::CudaMoeBlock;
pub use error::{ExpertsError, Result};
pub use mlp::CpuWeights;
pub use router::{GroupedRouting, Routing, route, route_grouped};
pub use shared::{ScratchGuard, SharedWorkspace};
pub use weights::{Layout, MoeWeights, SharedExpertWeights};
