//! The kernels of moe-permute and the argument types they share with the host.
//!
//! This crate is `#![no_std]` so that the same source compiles for
//! `nvptx64-nvidia-cuda` (the kernels) and for the host (the `#[repr(C)]` parameter
//! types, which the runtime fills and passes to launches). Keeping one definition of
//! each kernel's arguments means host and device cannot disagree on a field's offset:
//! every type here asserts its size and alignment at compile time.
//!
//! Architecture invariant: nothing here allocates, does I/O or depends on a host crate.
#![no_std]

mod params;

pub use params::{AlignDims, RoutingDims, RowLayout};
