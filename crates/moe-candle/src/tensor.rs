//! Reading candle tensors as the runtime's slices: contiguous data at any layout
//! offset, on the device the call runs on, of a dtype the op takes.

use candle_core::{CpuStorage, Error, Layout, Result, Storage, Tensor, WithDType};
use moe_runtime::MoeError;

/// A runtime error as a candle error, with the runtime's message.
pub(crate) fn candle_error(error: MoeError) -> Error {
    Error::wrap(error)
}

/// `tensor`'s dims, checked to be `rank` of them.
pub(crate) fn dims_of<'t>(tensor: &'t Tensor, name: &str, rank: usize) -> Result<&'t [usize]> {
    let dims = tensor.dims();
    if dims.len() != rank {
        return Err(Error::msg(format!(
            "{name} has shape {dims:?}; expected {rank} dimensions"
        )));
    }
    Ok(dims)
}

/// The element range `start..end` of a contiguous `layout` in a storage of
/// `storage_len` elements (a view may start anywhere).
pub(crate) fn contiguous_range(
    layout: &Layout,
    storage_len: usize,
    name: &str,
) -> Result<(usize, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(Error::msg(format!(
            "{name} is not contiguous (strides {:?}); call .contiguous() first",
            layout.stride()
        )));
    };
    if start > end || end > storage_len {
        return Err(Error::msg(format!(
            "{name}'s layout ({start}..{end}) is outside its storage ({storage_len} elements)"
        )));
    }
    Ok((start, end))
}

/// The elements of a contiguous `layout` in `storage`.
pub(crate) fn cpu_slice<'s, T: WithDType>(
    storage: &'s CpuStorage,
    layout: &Layout,
    name: &str,
) -> Result<&'s [T]> {
    let all = storage.as_slice::<T>()?;
    let (start, end) = contiguous_range(layout, all.len(), name)?;
    Ok(&all[start..end])
}

/// Runs `f` on the CPU elements of `tensor` (dtype `T`, contiguous).
pub(crate) fn with_cpu<T: WithDType, R>(
    tensor: &Tensor,
    name: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    if tensor.dtype() != T::DTYPE {
        return Err(Error::msg(format!(
            "{name} is {:?}; expected {:?}",
            tensor.dtype(),
            T::DTYPE
        )));
    }
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu_slice(cpu, layout, name)?),
        other => Err(Error::msg(format!(
            "{name} is on {:?}; this call runs on the CPU",
            other.device().location()
        ))),
    }
}

/// Expert ids as the runtime takes them, without a copy: i32 and i64 as they are; u32
/// (candle's top-k index type) read as i32, where an id of `2^31` or more becomes
/// negative and is dropped, exactly as the contract drops any id outside `0..E`.
pub(crate) fn u32_ids_as_i32(ids: &[u32]) -> &[i32] {
    bytemuck::cast_slice(ids)
}
