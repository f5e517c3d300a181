//! moe-permute's runtime: the MoE token shuffles (`permute`, `unpermute`, `align`)
//! with a pre-allocated [`PermuteScratch`], on the devices the machine has.
//!
//! `docs/contract.md` in the repository states what each operation computes (shapes,
//! orders, dropped entries); `docs/architecture.md` how the crates fit together. The
//! [`cpu`] module is the reference implementation of that contract.
//!
//! ```
//! use moe_runtime::cpu::{self, PermuteInput, UnpermuteInput};
//! use moe_runtime::{bf16, DType, Device, PermuteScratch, Rows, ScratchConfig, TopkIds};
//!
//! // Once: a scratch for up to 16 tokens of top-2 over 4 experts, owning bf16 rows of 8.
//! let config = ScratchConfig::new(16, 2, 4, 4, Device::Cpu).with_rows(8, DType::BF16);
//! let mut scratch = PermuteScratch::new(config)?;
//!
//! // Every layer, every step: 3 tokens; token 1 chose expert 9, which does not exist.
//! let hidden: Vec<bf16> = (0..3 * 8).map(|i| bf16::from_f32(i as f32)).collect();
//! let topk_ids = [2i32, 0, 9, 2, 1, 0];
//! let input = PermuteInput::new(Rows::new(&hidden, 8)?, TopkIds::new(&topk_ids, 2)?);
//! let routed = cpu::permute(&mut scratch, &input)?;
//! assert_eq!(routed.expert_first_token_offset, &[0, 2, 3, 5, 5]);
//! assert_eq!(routed.permuted_idx, &[1, 5, 4, 0, 3, 6]); // flat t*K + k; 6 = dropped
//!
//! // The expert GEMMs would read rows [offset[e], offset[e+1]); here they are identity.
//! let expert_out = routed.permuted_hidden_states.as_slice::<bf16>()?;
//! let topk_weights = [0.75f32, 0.25, 1.0, 0.5, 0.5, 0.5];
//! let mut combined = vec![bf16::ZERO; 3 * 8];
//! cpu::unpermute_into(
//!     &UnpermuteInput {
//!         permuted_hidden_states: expert_out,
//!         hidden_size: 8,
//!         inv_permuted_idx: routed.inv_permuted_idx,
//!         expert_first_token_offset: routed.expert_first_token_offset,
//!         topk_weights: &topk_weights,
//!         topk: 2,
//!     },
//!     &mut combined,
//! )?;
//! // Token 1 kept one entry, expert 2 with weight 0.5: half its row.
//! assert_eq!(combined[8].to_f32(), 4.0);
//! # Ok::<(), moe_runtime::MoeError>(())
//! ```
//!
//! Architecture invariants: with a scratch, no operation allocates; every call is
//! validated against its scratch before memory is touched; bad input is an error
//! value, never a panic or an out-of-bounds access; sizes computed from caller-given
//! numbers, and host memory sized by them, go through [`size`] and fail as errors.

#![warn(missing_docs)]

mod config;
pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
mod scratch;
pub mod size;
mod tensor;
mod unpermute_check;
mod workspace;

pub use config::{CallShape, RowSpec, ScratchConfig, max_padded_rows};
pub use device::Device;
pub use dtype::{Accumulate, DType, Element, F8E4M3, F8E5M2};
pub use error::{ConfigError, MoeError, Result, ScratchMismatch};
pub use scratch::PermuteScratch;
pub use tensor::{ExpertId, ExpertIds, Rows, RowsMut, Scales, TopkIds};
pub use workspace::ScratchWorkspace;

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// Re-exported so callers name the same f16 / bf16 types the runtime accepts.
pub use half::{bf16, f16};
