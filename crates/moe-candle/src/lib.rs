//! moe-permute for candle: `permute`, `unpermute` and `align` on candle tensors, and
//! [`MoeBlock`], a sparse MoE block that loads from the tensor names of
//! candle-transformers' Mixtral and Qwen3-MoE blocks.
//!
//! Tensors are read where they are: contiguous, at any layout offset (a `narrow` of a
//! larger tensor), expert ids in u32 (candle's top-k), i32 or i64, rows in bf16, f16 or
//! f32. Results are candle tensors that own what the op wrote (the permuted rows and
//! the combined output are written once, straight into them). Errors are
//! `candle_core::Error`s carrying the runtime's message.
//!
//! CPU tensors run the runtime's CPU path. With feature `cuda` (and without the
//! default features: candle links CUDA, so the runtime does too), CUDA tensors run the
//! project's kernels on the stream of their candle device, without a host wait; see
//! `docs/candle.md`.
//!
//! A model's MoE layer, as candle-transformers' Mixtral loads it (the README's example,
//! on a small random layer):
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use moe_candle::{MoeBlock, SharedScratch};
//!
//! # let (h, i, e) = (64, 96, 8);
//! # let mut tensors = std::collections::HashMap::new();
//! # let p = "model.layers.0.block_sparse_moe";
//! # tensors.insert(format!("{p}.gate.weight"), Tensor::randn(0f32, 1.0, (e, h), &Device::Cpu)?);
//! # for x in 0..e {
//! #     for (w, shape) in [("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))] {
//! #         let t = Tensor::randn(0f32, 0.1, shape, &Device::Cpu)?;
//! #         tensors.insert(format!("{p}.experts.{x}.{w}.weight"), t);
//! #     }
//! # }
//! let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
//! let scratch = SharedScratch::new(); // one permute scratch for every layer
//! let moe = MoeBlock::mixtral(h, i, e, 2, vb.pp("model.layers.0.block_sparse_moe"))?
//!     .with_scratch(scratch.clone());
//! let xs = Tensor::randn(0f32, 1.0, (1, 16, h), &Device::Cpu)?; // [batch, seq, hidden]
//! let ys = moe.forward(&xs)?; // what Mixtral's SparseMoeBlock computes
//! assert_eq!(ys.dims(), &[1, 16, h]);
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]

mod block;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod ops;
mod scratch;
mod tensor;

pub use block::{MoeBlock, SharedScratch};
pub use ops::{Aligned, Permuted, align, permute, unpermute};
pub use scratch::Scratch;
