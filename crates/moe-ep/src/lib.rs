//! Expert parallelism for moe-permute: a model's experts spread over GPUs (one rank
//! each), token rows exchanged over NCCL in every MoE layer.
//!
//! - [`nccl`]: NCCL through cudarc, loaded at run time; the unique id a launcher
//!   passes to every rank ([`NcclId`]) and a [`Communicator`] on the caller's streams.
//! - [`placement`]: which rank holds which experts ([`ExpertPlacement`]), from the
//!   ranks' expert maps.
//! - [`exchange`]: dispatch and combine on the permute scratch ([`EpExchange`]), with
//!   exact sizes (one host wait) or a fixed capacity (none; graph-capturable).
//! - [`block`]: the GPU MoE block on W ranks ([`EpMoeBlock`]).
//! - [`launch`]: one process per GPU, as serving stacks run them, for tests and the
//!   benchmark.
//!
//! The design, what each rank holds, and how it scales past one host:
//! `docs/expert-parallel.md`.

pub mod block;
mod error;
pub mod exchange;
pub mod launch;
pub mod nccl;
pub mod placement;

pub use block::EpMoeBlock;
pub use error::{EpError, Result};
pub use exchange::{EpExchange, ExchangeInput, ExchangeMode, ExchangeShape, LocalExperts};
pub use nccl::{Communicator, NcclId};
pub use placement::ExpertPlacement;
