//! Borrowed views of a call's host tensors, with their shapes checked on construction.

use crate::{DType, Element, MoeError, Result};

fn shape_error(tensor: &'static str, len: usize, expected: String) -> MoeError {
    MoeError::Shape {
        tensor,
        len,
        expected,
    }
}

/// Checks that `len` elements form whole rows of `columns` and returns the row count.
fn whole_rows(tensor: &'static str, len: usize, columns: usize, what: &str) -> Result<usize> {
    if columns == 0 {
        return Err(shape_error(
            tensor,
            len,
            format!("{what} must be at least 1"),
        ));
    }
    if len % columns != 0 {
        return Err(shape_error(
            tensor,
            len,
            format!("not a multiple of {what} {columns}"),
        ));
    }
    Ok(len / columns)
}

/// A row-major `[N, H]` matrix of hidden states in host memory, of any [`DType`],
/// seen as bytes: permute moves rows without looking at their elements.
///
/// `H >= 1` and a row's bytes fit in usize (checked on construction), so every
/// accessor is total.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    bytes: &'a [u8],
    dtype: DType,
    hidden_size: usize,
}

impl<'a> Rows<'a> {
    /// Views `data` as rows of `hidden_size` elements.
    ///
    /// Fails when `data` is not whole rows, `hidden_size` is 0, or a row's bytes do
    /// not fit in usize ([`MoeError::SizeOverflow`]).
    pub fn new<T: Element>(data: &'a [T], hidden_size: usize) -> Result<Self> {
        whole_rows("rows", data.len(), hidden_size, "hidden_size")?;
        T::DTYPE.row_bytes(hidden_size)?;
        Ok(Self {
            bytes: bytemuck::cast_slice(data),
            dtype: T::DTYPE,
            hidden_size,
        })
    }

    /// Views raw bytes as rows of `hidden_size` elements of `dtype`, with the checks
    /// of [`Self::new`].
    pub fn from_bytes(bytes: &'a [u8], dtype: DType, hidden_size: usize) -> Result<Self> {
        let row_bytes = dtype.row_bytes(hidden_size)?;
        whole_rows(
            "rows",
            bytes.len(),
            row_bytes,
            "row bytes (hidden_size * dtype size)",
        )?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    /// Views bytes the runtime sized itself from a validated view's spec: `H >= 1`, its
    /// row bytes fit in usize and `bytes.len()` is a whole number of rows.
    pub(crate) fn from_parts(bytes: &'a [u8], dtype: DType, hidden_size: usize) -> Self {
        debug_assert!(hidden_size > 0 && bytes.len() % (hidden_size * dtype.size_bytes()) == 0);
        Self {
            bytes,
            dtype,
            hidden_size,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `H`, elements in one row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Bytes in one row (at least 1; construction checked that it fits in usize).
    pub fn row_bytes(&self) -> usize {
        self.hidden_size * self.dtype.size_bytes()
    }

    /// `N`, the number of rows.
    pub fn num_rows(&self) -> usize {
        self.bytes.len() / self.row_bytes()
    }

    /// The rows as bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The rows as a typed slice, when `T` is their element type.
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        if T::DTYPE != self.dtype {
            return Err(MoeError::Dtype {
                tensor: "rows",
                op: "as_slice",
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        bytemuck::try_cast_slice(self.bytes).map_err(|_| MoeError::Misaligned {
            tensor: "rows",
            dtype: self.dtype,
        })
    }
}

/// A mutable row-major `[R, H]` destination for permuted rows, with the invariants
/// of [`Rows`].
#[derive(Debug)]
pub struct RowsMut<'a> {
    bytes: &'a mut [u8],
    dtype: DType,
    hidden_size: usize,
}

impl<'a> RowsMut<'a> {
    /// Views `data` as rows of `hidden_size` elements, with the checks of
    /// [`Rows::new`].
    pub fn new<T: Element>(data: &'a mut [T], hidden_size: usize) -> Result<Self> {
        whole_rows(
            "permuted_hidden_states",
            data.len(),
            hidden_size,
            "hidden_size",
        )?;
        T::DTYPE.row_bytes(hidden_size)?;
        Ok(Self {
            bytes: bytemuck::cast_slice_mut(data),
            dtype: T::DTYPE,
            hidden_size,
        })
    }

    /// Views raw bytes as rows of `hidden_size` elements of `dtype`, with the checks
    /// of [`Rows::new`].
    pub fn from_bytes(bytes: &'a mut [u8], dtype: DType, hidden_size: usize) -> Result<Self> {
        let row_bytes = dtype.row_bytes(hidden_size)?;
        whole_rows(
            "permuted_hidden_states",
            bytes.len(),
            row_bytes,
            "row bytes (hidden_size * dtype size)",
        )?;
        Ok(Self {
            bytes,
            dtype,
            hidden_size,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `H`, elements in one row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// `R`, the number of rows (construction checked that a row's bytes fit in usize).
    pub fn num_rows(&self) -> usize {
        self.bytes.len() / (self.hidden_size * self.dtype.size_bytes())
    }

    pub(crate) fn into_parts(self) -> (&'a mut [u8], DType, usize) {
        (self.bytes, self.dtype, self.hidden_size)
    }
}

/// The global expert ids of a call, in either integer width serving stacks use.
#[derive(Clone, Copy, Debug)]
pub enum ExpertIds<'a> {
    /// `i32` ids.
    I32(&'a [i32]),
    /// `i64` ids.
    I64(&'a [i64]),
}

impl ExpertIds<'_> {
    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            ExpertIds::I32(ids) => ids.len(),
            ExpertIds::I64(ids) => ids.len(),
        }
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An integer type that can hold global expert ids.
pub trait ExpertId: Copy + Send + Sync + sealed::Sealed {
    /// `ids` as the [`ExpertIds`] variant of this type.
    fn as_ids(ids: &[Self]) -> ExpertIds<'_>;
}

impl ExpertId for i32 {
    fn as_ids(ids: &[Self]) -> ExpertIds<'_> {
        ExpertIds::I32(ids)
    }
}

impl ExpertId for i64 {
    fn as_ids(ids: &[Self]) -> ExpertIds<'_> {
        ExpertIds::I64(ids)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// `topk_ids`, row-major `[N, K]`: the `K` global experts each token chose.
#[derive(Clone, Copy, Debug)]
pub struct TopkIds<'a> {
    ids: ExpertIds<'a>,
    topk: usize,
}

impl<'a> TopkIds<'a> {
    /// Views `ids` as `[N, K]` with `K = topk`; fails when `topk` is 0 or `ids` is not
    /// whole tokens.
    pub fn new<I: ExpertId>(ids: &'a [I], topk: usize) -> Result<Self> {
        whole_rows("topk_ids", ids.len(), topk, "topk")?;
        Ok(Self {
            ids: I::as_ids(ids),
            topk,
        })
    }

    /// The ids, flat (`N*K`).
    pub fn ids(&self) -> ExpertIds<'a> {
        self.ids
    }

    /// `K`.
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// `N`.
    pub fn num_tokens(&self) -> usize {
        self.ids.len() / self.topk
    }
}

/// Per-token `f32` scales, row-major `[N, S]`, that travel with their rows.
#[derive(Clone, Copy, Debug)]
pub struct Scales<'a> {
    data: &'a [f32],
    columns: usize,
}

impl<'a> Scales<'a> {
    /// Views `data` as rows of `columns` scales; fails when `columns` is 0 or `data`
    /// is not whole rows.
    pub fn new(data: &'a [f32], columns: usize) -> Result<Self> {
        whole_rows("scales", data.len(), columns, "scale columns")?;
        Ok(Self { data, columns })
    }

    /// Views scales the runtime sized itself: `data.len()` is a whole number of rows.
    pub(crate) fn from_parts(data: &'a [f32], columns: usize) -> Self {
        debug_assert!(columns > 0 && data.len() % columns == 0);
        Self { data, columns }
    }

    /// The scales, flat (`N*S`).
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }

    /// `S`.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// `N`, the number of rows.
    pub fn num_rows(&self) -> usize {
        self.data.len() / self.columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_refuse_a_partial_row() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        assert!(matches!(
            Rows::new(&data, 2),
            Err(MoeError::Shape {
                tensor: "rows",
                len: 5,
                ..
            })
        ));
        assert!(matches!(Rows::new(&data, 0), Err(MoeError::Shape { .. })));
        let rows = Rows::new(&data, 5).unwrap();
        assert_eq!((rows.num_rows(), rows.row_bytes()), (1, 20));
    }

    #[test]
    fn rows_as_slice_checks_the_dtype() {
        let data = [half::bf16::from_f32(1.5); 6];
        let rows = Rows::new(&data, 3).unwrap();
        assert_eq!(rows.as_slice::<half::bf16>().unwrap(), &data);
        assert!(matches!(
            rows.as_slice::<half::f16>(),
            Err(MoeError::Dtype { .. })
        ));
    }

    #[test]
    fn topk_ids_must_hold_whole_tokens() {
        let ids = [1i64, 2, 3];
        assert!(matches!(
            TopkIds::new(&ids, 2),
            Err(MoeError::Shape {
                tensor: "topk_ids",
                ..
            })
        ));
        let ids = TopkIds::new(&ids, 3).unwrap();
        assert_eq!((ids.num_tokens(), ids.topk()), (1, 3));
        assert!(matches!(
            Scales::new(&[1.0; 4], 3),
            Err(MoeError::Shape {
                tensor: "scales",
                ..
            })
        ));
    }
}
