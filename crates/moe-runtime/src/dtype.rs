//! Element types of hidden states, and the traits that tie Rust types to them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The element type of a hidden-state tensor.
///
/// permute moves rows as bytes, so every type here can be permuted; unpermute does
/// arithmetic and accepts only the types that implement [`Accumulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// `f32`.
    F32,
    /// IEEE half precision, [`f16`](crate::f16).
    F16,
    /// bfloat16, [`bf16`](crate::bf16).
    BF16,
    /// fp8 e4m3 (OCP "fn" variant), moved as raw bytes.
    Fp8E4M3,
    /// fp8 e5m2, moved as raw bytes.
    Fp8E5M2,
}

impl DType {
    /// Every supported element type.
    pub const ALL: [DType; 5] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Fp8E4M3,
        DType::Fp8E5M2,
    ];

    /// Bytes in one element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Fp8E4M3 | DType::Fp8E5M2 => 1,
        }
    }

    /// Bytes in a row of `hidden_size` elements: the one definition every view and
    /// spec uses, checked ([`MoeError::SizeOverflow`](crate::MoeError::SizeOverflow)
    /// when it does not fit in usize).
    pub(crate) fn row_bytes(self, hidden_size: usize) -> crate::Result<usize> {
        crate::size::product(
            "row bytes (hidden_size * dtype size)",
            &[hidden_size, self.size_bytes()],
        )
    }

    /// The short name used in kernel names, reports and benchmark ids.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Fp8E4M3 => "fp8e4m3",
            DType::Fp8E5M2 => "fp8e5m2",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fp8 e4m3 value as its raw byte. permute never interprets it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct F8E4M3(pub u8);

/// One fp8 e5m2 value as its raw byte. permute never interprets it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct F8E5M2(pub u8);

/// A Rust type that stores one element of a [`DType`].
pub trait Element: bytemuck::Pod + Send + Sync {
    /// The element type this Rust type stores.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for F8E4M3 {
    const DTYPE: DType = DType::Fp8E4M3;
}
impl Element for F8E5M2 {
    const DTYPE: DType = DType::Fp8E5M2;
}

/// An element type unpermute can sum: widened to f32, accumulated in f32, and
/// narrowed once with round-to-nearest-even.
pub trait Accumulate: Element {
    /// The value widened to f32 (exact for every type here).
    fn to_f32(self) -> f32;
    /// `value` rounded to this type, to nearest even.
    fn from_f32(value: f32) -> Self;
}

impl Accumulate for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Accumulate for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        half::f16::from_f32(value)
    }
}

impl Accumulate for half::bf16 {
    /// A shift, exactly what the GPU does: branch-free, so the CPU's sums vectorise
    /// (`half`'s conversion also quiets signalling NaNs, which costs a branch).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_sizes_match_their_dtype() {
        fn check<T: Element>() {
            assert_eq!(
                std::mem::size_of::<T>(),
                T::DTYPE.size_bytes(),
                "{}",
                T::DTYPE
            );
        }
        check::<f32>();
        check::<half::f16>();
        check::<half::bf16>();
        check::<F8E4M3>();
        check::<F8E5M2>();
    }
}
