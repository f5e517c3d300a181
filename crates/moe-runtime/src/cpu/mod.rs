//! The CPU device: the reference every other device is tested against, and the
//! fallback where no GPU exists. Parallel with rayon; with a scratch, no call
//! allocates.
//!
//! Each operation validates its call against the scratch before touching memory,
//! then does the contract's work in two halves: a counting sort of the entries by
//! local expert (`routing`), then the data movement (`permute`'s row scatter,
//! `unpermute`'s weighted gather).

mod align;
pub mod allocating;
mod buffers;
mod disjoint;
mod permute;
mod routing;
mod unpermute;

pub(crate) use buffers::CpuBuffers;

pub use align::{AlignOutput, align};
pub use permute::{PermuteDest, PermuteInput, PermuteOutput, permute, permute_into};
pub use unpermute::{UNPERMUTE_TILE, UnpermuteInput, unpermute_into};
