//! Parallel writes to distinct elements of one slice: the scatter half of permute.
//!
//! permute reads each source row once and writes it to its `K` destination rows,
//! which lie anywhere in the permuted buffer. Safe Rust can split a slice only into
//! contiguous pieces, so the scatter goes through this type: the placement computed
//! by the counting sort gives every valid entry its own row, which is the proof that
//! no two tasks write the same element. Bounds are always checked.

use std::marker::PhantomData;

/// A mutable slice shared by parallel tasks that each write their own elements.
pub(super) struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the type is only a `&mut [T]` that several threads write through; every
// write method requires its caller to guarantee no other thread touches the same
// elements at the same time, which is what makes sending the writes to other
// threads sound. `T: Send` because values are moved into the slice from any thread.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}

impl<'a, T: Copy> DisjointSlice<'a, T> {
    pub(super) fn new(slice: &'a mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// No other thread reads or writes element `index` while the slice is shared.
    #[inline(always)]
    pub(super) unsafe fn write(&self, index: usize, value: T) {
        assert!(index < self.len, "index {index} out of {}", self.len);
        // SAFETY: `index` is in bounds (checked above) of the slice borrowed for 'a,
        // and the caller guarantees this thread is its only user.
        unsafe { self.ptr.add(index).write(value) }
    }

    /// Copies `src` into the elements `start..start + src.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes those elements while the slice is shared.
    #[inline(always)]
    pub(super) unsafe fn copy_from(&self, start: usize, src: &[T]) {
        assert!(
            start <= self.len && src.len() <= self.len - start,
            "range {start}..+{} out of {}",
            src.len(),
            self.len
        );
        // SAFETY: the range is in bounds (checked above) of the slice borrowed for 'a,
        // cannot overlap `src` (a shared borrow cannot alias the mutable borrow this
        // type holds), and the caller guarantees this thread is its only user.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), src.len()) };
        copy_in_blocks(dst, src);
    }
}

/// Copies in fixed 64-byte blocks, which compile to vector loads and stores.
///
/// A plain `copy_from_slice` of a whole row calls `memcpy`, which for rows of a few
/// kilobytes uses `rep movsb`; on some x86 machines (seen on an AMD EPYC VM) that runs
/// several times slower when source and destination happen to sit at unlucky
/// distances, so a reused scratch buffer could be slower than a fresh one.
#[inline(always)]
fn copy_in_blocks<T: Copy>(dst: &mut [T], src: &[T]) {
    const BLOCK_BYTES: usize = 64;
    let block = (BLOCK_BYTES / size_of::<T>().max(1)).max(1);
    let mut dst_blocks = dst.chunks_exact_mut(block);
    let mut src_blocks = src.chunks_exact(block);
    for (d, s) in (&mut dst_blocks).zip(&mut src_blocks) {
        d.copy_from_slice(s);
    }
    dst_blocks
        .into_remainder()
        .copy_from_slice(src_blocks.remainder());
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    #[test]
    fn parallel_scatter_writes_every_element_once() {
        let n = 10_000usize;
        // A permutation: i -> (i * 7919) mod n, bijective because 7919 is prime to n.
        let mut out = vec![usize::MAX; n];
        let dst = DisjointSlice::new(&mut out);
        (0..n).into_par_iter().for_each(|i| {
            // SAFETY: i -> i*7919 mod n is a bijection, so each index has one writer.
            unsafe { dst.write((i * 7919) % n, i) }
        });
        for (j, &i) in out.iter().enumerate() {
            assert_eq!((i * 7919) % n, j);
        }
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn an_out_of_bounds_copy_panics_instead_of_writing() {
        let mut out = [0u8; 8];
        let dst = DisjointSlice::new(&mut out);
        // SAFETY: single-threaded; the bounds check is what is under test.
        unsafe { dst.copy_from(6, &[1, 2, 3]) }
    }
}
