//! Sizes computed from caller-given numbers, and host memory allocated by them.
//!
//! A caller can give any `usize` as a hidden size, a token count or an expert count,
//! with little or no data behind it (an empty slice of rows of `usize::MAX` elements is
//! a valid slice). Every size the runtime derives from such numbers is computed by
//! [`product`], which returns [`MoeError::SizeOverflow`] instead of panicking (debug)
//! or wrapping (release); every host buffer sized by them is allocated by [`zeroed`],
//! which returns [`MoeError::OutOfMemory`] instead of aborting.
//!
//! The expert crate uses the same two functions, so that a size means the same thing,
//! and fails the same way, on both sides.

use crate::{MoeError, Result};

/// The product of `factors`, or [`MoeError::SizeOverflow`] naming `quantity` (what the
/// product is, e.g. `"row bytes (hidden_size * dtype size)"`) when it does not fit in
/// `usize`. The product of no factors is 1.
///
/// ```
/// use moe_runtime::{MoeError, size};
///
/// assert_eq!(size::product("N*H", &[3, 8]), Ok(24));
/// assert_eq!(
///     size::product("N*H", &[2, usize::MAX]),
///     Err(MoeError::SizeOverflow { quantity: "N*H", factors: vec![2, usize::MAX] })
/// );
/// ```
pub fn product(quantity: &'static str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |product, &factor| product.checked_mul(factor))
        .ok_or_else(|| MoeError::SizeOverflow {
            quantity,
            factors: factors.to_vec(),
        })
}

/// `len` zeroed elements of host memory for `buffer`, or [`MoeError::OutOfMemory`]
/// when the allocator refuses them (or no allocation can be that large), instead of
/// aborting the process.
///
/// Zeroed memory comes from `calloc`, so large buffers cost page mappings, not a pass
/// of writes.
pub fn zeroed<T: bytemuck::Zeroable>(buffer: &'static str, len: usize) -> Result<Vec<T>> {
    let bytes = len as u128 * size_of::<T>() as u128;
    let out_of_memory = || MoeError::OutOfMemory { buffer, bytes };
    if bytes > isize::MAX as u128 {
        return Err(out_of_memory());
    }
    bytemuck::allocation::try_zeroed_vec(len).map_err(|()| out_of_memory())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_fit_and_that_do_not() {
        assert_eq!(product("none", &[]), Ok(1));
        assert_eq!(product("a zero", &[0, usize::MAX, usize::MAX]), Ok(0));
        assert_eq!(product("fits", &[1 << 20, 1 << 30, 4]), Ok(1 << 52));
        assert_eq!(
            product("too big", &[1 << 40, 1 << 30]),
            Err(MoeError::SizeOverflow {
                quantity: "too big",
                factors: vec![1 << 40, 1 << 30]
            })
        );
    }

    #[test]
    fn allocations_that_cannot_be_had_are_errors() {
        let small: Vec<u32> = zeroed("small", 5).unwrap();
        assert_eq!(small, [0; 5]);
        // More bytes than any allocation may have.
        assert_eq!(
            zeroed::<u64>("huge", usize::MAX / 4).unwrap_err(),
            MoeError::OutOfMemory {
                buffer: "huge",
                bytes: (usize::MAX / 4) as u128 * 8
            }
        );
        // Fits isize, but no machine has 4 PiB.
        assert!(matches!(
            zeroed::<u8>("4 PiB", 1 << 52),
            Err(MoeError::OutOfMemory { bytes, .. }) if bytes == 1 << 52
        ));
    }
}
