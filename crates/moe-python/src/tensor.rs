//! Tensors as the Python layer hands them over: `(data_ptr, shape, strides, dtype,
//! device index)`, checked before any memory is touched.

use moe_runtime::DType;
use moe_runtime::size::product;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::error::{input_error, moe_error};

/// A tensor as Python describes it: `(data_ptr, shape, strides, dtype code, device
/// index)`, with -1 for the CPU (`moe_permute._tensor.describe` builds it; the dtype
/// codes are `DTYPE_CODES` there, in [`Elem::from_code`]'s order). Shape and strides
/// are read straight from their tuples: an eager call parses several of these, and
/// that is a large share of its host time.
#[derive(Debug, FromPyObject)]
pub(crate) struct TensorArg<'py>(u64, Bound<'py, PyTuple>, Bound<'py, PyTuple>, u8, i64);

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Cpu,
    Cuda(usize),
}

/// The element types the ops take: the rows' types, ids and raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    Rows(DType),
    I32,
    I64,
    U8,
}

impl Elem {
    /// The element type of a dtype code (`moe_permute._tensor.DTYPE_CODES`).
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Rows(DType::F32),
            1 => Self::Rows(DType::F16),
            2 => Self::Rows(DType::BF16),
            3 => Self::Rows(DType::Fp8E4M3),
            4 => Self::Rows(DType::Fp8E5M2),
            5 => Self::I32,
            6 => Self::I64,
            7 => Self::U8,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Rows(dtype) => dtype.name(),
            Self::I32 => "int32",
            Self::I64 => "int64",
            Self::U8 => "uint8",
        }
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Self::Rows(dtype) => dtype.size_bytes(),
            Self::I32 => 4,
            Self::I64 => 8,
            Self::U8 => 1,
        }
    }
}

/// A checked, contiguous tensor.
#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub(crate) name: &'static str,
    pub(crate) address: u64,
    pub(crate) shape: Vec<usize>,
    pub(crate) elem: Elem,
    pub(crate) place: Place,
    pub(crate) numel: usize,
}

impl Tensor {
    /// Checks `arg` (named `name` in errors): a known dtype, a device, a row-major
    /// contiguous layout, a size that fits in memory, an address aligned for its type.
    pub(crate) fn new(name: &'static str, arg: TensorArg<'_>) -> PyResult<Self> {
        let TensorArg(address, shape, strides, code, device) = arg;
        let Some(elem) = Elem::from_code(code) else {
            return Err(input_error(format!(
                "{name}: dtype code {code} is not one the ops take (float32, float16, \
                 bfloat16, float8_e4m3fn, float8_e5m2 rows; int32 or int64 ids)"
            )));
        };
        let shape = ints(name, "shape", &shape)?
            .into_iter()
            .map(usize::try_from)
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| input_error(format!("{name}: a negative size in its shape")))?;
        let strides = ints(name, "strides", &strides)?;
        let place = match device {
            -1 => Place::Cpu,
            ordinal if ordinal >= 0 => Place::Cuda(ordinal as usize),
            other => return Err(input_error(format!("{name}: device index {other}"))),
        };
        let numel = product(name, &shape).map_err(moe_error)?;
        product(name, &[numel, elem.size()]).map_err(moe_error)?;
        if strides.len() != shape.len() {
            return Err(input_error(format!(
                "{name}: {} strides for {} dimensions",
                strides.len(),
                shape.len()
            )));
        }
        // Row-major: each stride is the product of the sizes after it; a dimension
        // of size 1 may have any stride (PyTorch leaves those as they fall).
        let mut expected = 1usize;
        for (&size, &stride) in shape.iter().zip(&strides).rev() {
            if size != 1 && numel != 0 && stride != expected as i64 {
                return Err(input_error(format!(
                    "{name} must be contiguous (shape {shape:?}, strides {strides:?}); \
                     call .contiguous() first"
                )));
            }
            expected = expected.saturating_mul(size);
        }
        if numel != 0 && address % elem.size() as u64 != 0 {
            return Err(input_error(format!(
                "{name}: address {address:#x} is not aligned for its {} elements",
                elem.name()
            )));
        }
        Ok(Self {
            name,
            address,
            shape,
            elem,
            place,
            numel,
        })
    }

    /// Like [`Self::new`], for an optional argument.
    pub(crate) fn optional(
        name: &'static str,
        arg: Option<TensorArg<'_>>,
    ) -> PyResult<Option<Self>> {
        arg.map(|arg| Self::new(name, arg)).transpose()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.numel * self.elem.size()
    }

    /// Requires `dims` dimensions; returns the shape.
    pub(crate) fn dims(&self, dims: usize, what: &str) -> PyResult<&[usize]> {
        if self.shape.len() != dims {
            return Err(input_error(format!(
                "{} must be {what} ({dims} dimension(s)), got shape {:?}",
                self.name, self.shape
            )));
        }
        Ok(&self.shape)
    }

    /// Requires one of `allowed` element types.
    pub(crate) fn expect(&self, allowed: &[Elem], what: &str) -> PyResult<Elem> {
        if allowed.contains(&self.elem) {
            Ok(self.elem)
        } else {
            Err(input_error(format!(
                "{} must be {what}, got {}",
                self.name,
                self.elem.name()
            )))
        }
    }

    /// The rows' dtype, for a tensor of rows.
    pub(crate) fn row_dtype(&self) -> PyResult<DType> {
        match self.elem {
            Elem::Rows(dtype) => Ok(dtype),
            other => Err(input_error(format!(
                "{}: rows must be float32, float16, bfloat16 or float8, got {}",
                self.name,
                other.name()
            ))),
        }
    }

    fn range(&self) -> (u64, u64) {
        (self.address, self.address + self.bytes() as u64)
    }
}

/// The one device every tensor of a call is on; an error naming the first that is
/// elsewhere.
pub(crate) fn common_place(tensors: &[&Tensor]) -> PyResult<Place> {
    let first = tensors[0];
    for tensor in &tensors[1..] {
        if tensor.place != first.place {
            return Err(input_error(format!(
                "{} is on {:?} but {} is on {:?}: every tensor of a call must be on one device",
                tensor.name, tensor.place, first.name, first.place
            )));
        }
    }
    Ok(first.place)
}

/// Refuses a call where a tensor it writes overlaps any other tensor it is given:
/// the results would depend on the order the device writes in (and on the CPU, Rust
/// may not hold a shared and a mutable borrow of the same memory).
pub(crate) fn check_disjoint(written: &[&Tensor], all: &[&Tensor]) -> PyResult<()> {
    for out in written {
        let (start, end) = out.range();
        if start == end {
            continue;
        }
        for other in all {
            let (other_start, other_end) = other.range();
            let same = std::ptr::eq(*out, *other);
            if !same && other_start < end && start < other_end {
                return Err(input_error(format!(
                    "{} overlaps {} in memory: the tensors a call writes must not share memory \
                     with any other argument",
                    out.name, other.name
                )));
            }
        }
    }
    Ok(())
}

/// The integers of a shape or strides tuple.
fn ints(name: &str, what: &str, tuple: &Bound<'_, PyTuple>) -> PyResult<Vec<i64>> {
    let bad = || input_error(format!("{name}: {what} must be integers"));
    let mut out = Vec::with_capacity(tuple.len());
    for item in tuple.iter() {
        out.push(item.extract::<i64>().map_err(|_| bad())?);
    }
    Ok(out)
}
