//! moe-permute's runtime: the MoE token shuffles (`permute`, `unpermute`, `align`)
//! with a pre-allocated [`PermuteScratch`], on the devices the machine has.
//!
//! `../../docs/architecture.md` describes how the crates fit together. The contract
//! every device implements (shapes, orders, dropped entries) is in the docs of the
//! [`cpu`] module's operations, which are its reference implementation.
//!
//! Architecture invariants: with a scratch, no operation allocates; every call is
//! validated against its scratch before memory is touched; bad input is an error
//! value, never a panic or an out-of-bounds access.

mod config;
pub mod cpu;
mod device;
mod dtype;
mod error;
mod scratch;
mod tensor;
mod workspace;

pub use config::{CallShape, RowSpec, ScratchConfig};
pub use device::Device;
pub use dtype::{Accumulate, DType, Element, F8E4M3, F8E5M2};
pub use error::{ConfigError, MoeError, Result, ScratchMismatch};
pub use scratch::PermuteScratch;
pub use tensor::{ExpertId, ExpertIds, Rows, RowsMut, Scales, TopkIds};
pub use workspace::ScratchWorkspace;

/// Re-exported so callers name the same f16 / bf16 types the runtime accepts.
pub use half::{bf16, f16};
