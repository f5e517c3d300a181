//! permute, unpermute and align on the tensors Python hands over: the shapes checked
//! here, then the runtime's CPU or CUDA path.
//!
//! Outputs the scratch holds (`expert_first_token_offset`, `inv_permuted_idx`,
//! `permuted_idx`, align's ids) stay in the workspace at the layout's offsets, where
//! Python makes tensors over them; on the CPU they are copied there.

use std::mem::size_of;

use half::{bf16, f16};
use moe_runtime::cpu::{self, PermuteDest, PermuteInput, UnpermuteInput};
use moe_runtime::cuda::{
    self, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput, DeviceRepr, DeviceRows,
    DeviceRowsMut, DeviceScales, DeviceStatus, DeviceTopkIds, DeviceUnpermuteInput, DeviceView,
    DeviceViewMut,
};
use moe_runtime::{Accumulate, DType, Rows, RowsMut, Scales, TopkIds};
use pyo3::prelude::*;

use crate::devices::{caller_stream, cuda_device};
use crate::error::{input_error, moe_error};
use crate::scratch::{Inner, NativeScratch};
use crate::tensor::{Elem, Place, Tensor, TensorArg, check_disjoint, common_place};

/// The checked arguments of permute.
struct PermuteArgs {
    hidden: Tensor,
    topk_ids: Tensor,
    expert_map: Option<Tensor>,
    scales: Option<Tensor>,
    out_rows: Tensor,
    out_scales: Option<Tensor>,
    workspace: Tensor,
    hidden_size: usize,
    topk: usize,
    scale_columns: usize,
}

/// Permutes `hidden_states` `[N, H]` by `topk_ids` `[N, K]` into `out_rows`
/// (`[>= N*K, H]`) and `out_scales`; the index outputs go to the scratch.
#[pyfunction]
#[pyo3(signature = (scratch, hidden_states, topk_ids, expert_map, scales, out_rows, out_scales, workspace, stream, checked))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn permute(
    py: Python<'_>,
    scratch: &NativeScratch,
    hidden_states: TensorArg<'_>,
    topk_ids: TensorArg<'_>,
    expert_map: Option<TensorArg<'_>>,
    scales: Option<TensorArg<'_>>,
    out_rows: TensorArg<'_>,
    out_scales: Option<TensorArg<'_>>,
    workspace: Option<TensorArg<'_>>,
    stream: u64,
    checked: bool,
) -> PyResult<()> {
    let workspace = match workspace {
        Some(workspace) => Tensor::new("workspace", workspace)?,
        None => scratch.lock().own_workspace(),
    };
    let args = PermuteArgs::new(
        hidden_states,
        topk_ids,
        expert_map,
        scales,
        out_rows,
        out_scales,
        workspace,
    )?;
    // The device work is queued (or, on the CPU, done) without Python's lock.
    py.detach(|| {
        let mut inner = scratch.lock();
        match inner.place {
            Place::Cpu => permute_cpu(&mut inner, &args),
            Place::Cuda(ordinal) => permute_cuda(&mut inner, &args, ordinal, stream, checked),
        }
    })
}

impl PermuteArgs {
    fn new(
        hidden: TensorArg<'_>,
        topk_ids: TensorArg<'_>,
        expert_map: Option<TensorArg<'_>>,
        scales: Option<TensorArg<'_>>,
        out_rows: TensorArg<'_>,
        out_scales: Option<TensorArg<'_>>,
        workspace: Tensor,
    ) -> PyResult<Self> {
        let hidden = Tensor::new("hidden_states", hidden)?;
        let topk_ids = Tensor::new("topk_ids", topk_ids)?;
        let expert_map = Tensor::optional("expert_map", expert_map)?;
        let scales = Tensor::optional("a1q_scale", scales)?;
        let out_rows = Tensor::new("permuted_hidden_states", out_rows)?;
        let out_scales = Tensor::optional("permuted a1q_scale", out_scales)?;
        let hidden_size = hidden.dims(2, "[num_tokens, hidden_size]")?[1];
        hidden.row_dtype()?;
        let topk = routing_args(&topk_ids, expert_map.as_ref())?;
        let scale_columns = match &scales {
            Some(scales) => {
                scales.expect(&[Elem::Rows(DType::F32)], "float32")?;
                scales.dims(2, "[num_tokens, scale_columns]")?[1]
            }
            None => 0,
        };
        out_rows.dims(2, "[num_tokens * topk, hidden_size]")?;
        out_rows.row_dtype()?;
        match (&scales, &out_scales) {
            (Some(_), Some(out)) => {
                out.expect(&[Elem::Rows(DType::F32)], "float32")?;
            }
            (None, None) => {}
            _ => {
                return Err(input_error(
                    "a permuted a1q_scale destination is given exactly when a1q_scale is".into(),
                ));
            }
        }
        workspace.expect(&[Elem::U8], "uint8")?;
        let mut all = vec![&hidden, &topk_ids, &out_rows, &workspace];
        all.extend(expert_map.iter());
        all.extend(scales.iter());
        all.extend(out_scales.iter());
        common_place(&all)?;
        let mut written = vec![&out_rows, &workspace];
        written.extend(out_scales.iter());
        check_disjoint(&written, &all)?;
        Ok(Self {
            hidden,
            topk_ids,
            expert_map,
            scales,
            out_rows,
            out_scales,
            workspace,
            hidden_size,
            topk,
            scale_columns,
        })
    }
}

fn permute_cuda(
    inner: &mut Inner,
    args: &PermuteArgs,
    ordinal: usize,
    stream: u64,
    checked: bool,
) -> PyResult<()> {
    let device = cuda_device(ordinal)?;
    let stream = caller_stream(&device, stream);
    let mut scratch = inner.for_call(&args.workspace, &stream, checked)?;
    let hidden_dtype = args.hidden.row_dtype()?;
    let input = DevicePermuteInput::new(
        DeviceRows::from_bytes(device_bytes(&args.hidden), hidden_dtype, args.hidden_size)
            .map_err(moe_error)?,
        device_ids(&args.topk_ids, args.topk)?,
    );
    let input = match &args.expert_map {
        Some(map) => input.with_expert_map(device_view(map)),
        None => input,
    };
    let input = match &args.scales {
        Some(scales) => input.with_scales(
            DeviceScales::new(device_view(scales), args.scale_columns).map_err(moe_error)?,
        ),
        None => input,
    };
    let dest = DevicePermuteDest {
        hidden_states: DeviceRowsMut::from_bytes(
            device_bytes_mut(&args.out_rows),
            args.out_rows.row_dtype()?,
            args.out_rows.shape[1],
        )
        .map_err(moe_error)?,
        scales: args.out_scales.as_ref().map(device_view_mut),
    };
    cuda::permute_into(scratch.get(), &stream, &input, dest).map_err(moe_error)?;
    Ok(())
}

fn permute_cpu(inner: &mut Inner, args: &PermuteArgs) -> PyResult<()> {
    inner.check_workspace(&args.workspace)?;
    let hidden = Rows::from_bytes(
        host_slice::<u8>(&args.hidden),
        args.hidden.row_dtype()?,
        args.hidden_size,
    )
    .map_err(moe_error)?;
    let input = PermuteInput::new(hidden, host_ids(&args.topk_ids, args.topk)?);
    let input = match &args.expert_map {
        Some(map) => input.with_expert_map(host_slice::<i32>(map)),
        None => input,
    };
    let input = match &args.scales {
        Some(scales) => input.with_scales(
            Scales::new(host_slice::<f32>(scales), args.scale_columns).map_err(moe_error)?,
        ),
        None => input,
    };
    let dest = PermuteDest {
        hidden_states: RowsMut::from_bytes(
            host_slice_mut::<u8>(&args.out_rows),
            args.out_rows.row_dtype()?,
            args.out_rows.shape[1],
        )
        .map_err(moe_error)?,
        scales: args.out_scales.as_ref().map(host_slice_mut::<f32>),
    };
    let o = inner.layout.offsets;
    let out = cpu::permute_into(&mut inner.scratch, &input, dest).map_err(moe_error)?;
    let workspace = host_slice_mut::<u8>(&args.workspace);
    place(
        workspace,
        o.expert_first_token_offset,
        out.expert_first_token_offset,
    );
    place(workspace, o.inv_permuted_idx, out.inv_permuted_idx);
    place(workspace, o.permuted_idx, out.permuted_idx);
    Ok(())
}

/// Sums each token's kept expert rows into `out` `[N, H]`, weighted by
/// `topk_weights` `[N, K]`.
#[pyfunction]
#[pyo3(signature = (out, permuted_hidden_states, topk_weights, inv_permuted_idx, expert_first_token_offset, status, stream, checked))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn unpermute(
    py: Python<'_>,
    out: TensorArg<'_>,
    permuted_hidden_states: TensorArg<'_>,
    topk_weights: TensorArg<'_>,
    inv_permuted_idx: TensorArg<'_>,
    expert_first_token_offset: TensorArg<'_>,
    status: TensorArg<'_>,
    stream: u64,
    checked: bool,
) -> PyResult<()> {
    let out = Tensor::new("out", out)?;
    let permuted = Tensor::new("permuted_hidden_states", permuted_hidden_states)?;
    let weights = Tensor::new("topk_weights", topk_weights)?;
    let inv = Tensor::new("inv_permuted_idx", inv_permuted_idx)?;
    let offsets = Tensor::new("expert_first_token_offset", expert_first_token_offset)?;
    let status = Tensor::new("status", status)?;
    let dtype = permuted.row_dtype()?;
    let hidden_size = permuted.dims(2, "[rows, hidden_size]")?[1];
    out.dims(2, "[num_tokens, hidden_size]")?;
    let topk = weights.dims(2, "[num_tokens, topk]")?[1];
    weights.expect(&[Elem::Rows(DType::F32)], "float32")?;
    inv.expect(&[Elem::I32], "int32")?;
    offsets.expect(&[Elem::I64], "int64")?;
    offsets.dims(1, "[num_local_experts + 1]")?;
    status.expect(&[Elem::U8], "uint8")?;
    let all = [&out, &permuted, &weights, &inv, &offsets, &status];
    let place = common_place(&all)?;
    check_disjoint(&[&out, &status], &all)?;
    if out.elem != permuted.elem {
        return Err(input_error(format!(
            "out is {}, permuted_hidden_states is {}: unpermute writes the rows' type",
            out.elem.name(),
            permuted.elem.name()
        )));
    }
    py.detach(|| match place {
        Place::Cpu => match dtype {
            DType::F32 => unpermute_cpu::<f32>(&out, &permuted, &weights, &inv, &offsets, topk),
            DType::F16 => unpermute_cpu::<f16>(&out, &permuted, &weights, &inv, &offsets, topk),
            DType::BF16 => unpermute_cpu::<bf16>(&out, &permuted, &weights, &inv, &offsets, topk),
            other => Err(input_error(format!(
                "unpermute sums float32, float16 or bfloat16 rows, got {}",
                other.name()
            ))),
        },
        Place::Cuda(ordinal) => {
            if status.bytes() < cuda::STATUS_BYTES {
                return Err(input_error(format!(
                    "status has {} bytes; a status block is {}",
                    status.bytes(),
                    cuda::STATUS_BYTES
                )));
            }
            let device = cuda_device(ordinal)?;
            let stream = caller_stream(&device, stream);
            // SAFETY: `status` is a live CUDA tensor of at least STATUS_BYTES on this
            // device (checked), 8-byte aligned (PyTorch aligns allocations to 512
            // bytes; the Python layer passes a whole allocation), filled with the
            // clear byte when the Python layer made it, and used on the current
            // stream only, like every tensor here.
            let status = unsafe { DeviceStatus::from_raw(status.address, ordinal, checked) };
            let input = DeviceUnpermuteInput {
                permuted_hidden_states: DeviceRows::from_bytes(
                    device_bytes(&permuted),
                    dtype,
                    hidden_size,
                )
                .map_err(moe_error)?,
                inv_permuted_idx: device_view(&inv),
                expert_first_token_offset: device_view(&offsets),
                topk_weights: device_view(&weights),
                topk,
                status,
            };
            let out = DeviceRowsMut::from_bytes(device_bytes_mut(&out), dtype, out.shape[1])
                .map_err(moe_error)?;
            cuda::unpermute_into(&stream, &input, out).map_err(moe_error)
        }
    })
}

fn unpermute_cpu<T: Accumulate + Copy>(
    out: &Tensor,
    permuted: &Tensor,
    weights: &Tensor,
    inv: &Tensor,
    offsets: &Tensor,
    topk: usize,
) -> PyResult<()> {
    if out.shape[1] != permuted.shape[1] {
        return Err(input_error(format!(
            "out has rows of {}, permuted_hidden_states of {}",
            out.shape[1], permuted.shape[1]
        )));
    }
    let input = UnpermuteInput {
        permuted_hidden_states: host_slice::<T>(permuted),
        hidden_size: permuted.shape[1],
        inv_permuted_idx: host_slice::<i32>(inv),
        expert_first_token_offset: host_slice::<i64>(offsets),
        topk_weights: host_slice::<f32>(weights),
        topk,
    };
    cpu::unpermute_into(&input, host_slice_mut::<T>(out)).map_err(moe_error)
}

/// Sorts `topk_ids` `[N, K]` by local expert, padded per expert to the scratch's
/// block size; the outputs go to the scratch.
#[pyfunction]
#[pyo3(signature = (scratch, topk_ids, expert_map, workspace, stream, checked))]
pub(crate) fn align(
    py: Python<'_>,
    scratch: &NativeScratch,
    topk_ids: TensorArg<'_>,
    expert_map: Option<TensorArg<'_>>,
    workspace: TensorArg<'_>,
    stream: u64,
    checked: bool,
) -> PyResult<()> {
    let topk_ids = Tensor::new("topk_ids", topk_ids)?;
    let expert_map = Tensor::optional("expert_map", expert_map)?;
    let workspace = Tensor::new("workspace", workspace)?;
    let topk = routing_args(&topk_ids, expert_map.as_ref())?;
    let mut all = vec![&topk_ids, &workspace];
    all.extend(expert_map.iter());
    common_place(&all)?;
    check_disjoint(&[&workspace], &all)?;
    py.detach(|| {
        let mut inner = scratch.lock();
        align_on(
            &mut inner,
            &topk_ids,
            expert_map.as_ref(),
            &workspace,
            topk,
            stream,
            checked,
        )
    })
}

fn align_on(
    inner: &mut Inner,
    topk_ids: &Tensor,
    expert_map: Option<&Tensor>,
    workspace: &Tensor,
    topk: usize,
    stream: u64,
    checked: bool,
) -> PyResult<()> {
    match inner.place {
        Place::Cpu => {
            inner.check_workspace(workspace)?;
            let o = inner.layout.offsets;
            let map = expert_map.map(host_slice::<i32>);
            let out = cpu::align(&mut inner.scratch, &host_ids(topk_ids, topk)?, map)
                .map_err(moe_error)?;
            let (sorted, blocks, rows) = (
                out.sorted_ids,
                out.block_expert_ids,
                out.num_rows_post_padded,
            );
            // Validated by the scratch: every row index fits in i32.
            let rows = rows as i32;
            let bytes = host_slice_mut::<u8>(workspace);
            place(bytes, o.sorted_ids, sorted);
            place(bytes, o.block_expert_ids, blocks);
            place(bytes, o.num_rows_post_padded, &[rows]);
            Ok(())
        }
        Place::Cuda(ordinal) => {
            let device = cuda_device(ordinal)?;
            let stream = caller_stream(&device, stream);
            let mut scratch = inner.for_call(workspace, &stream, checked)?;
            let ids = device_ids(topk_ids, topk)?;
            let map = expert_map.map(device_view::<i32>);
            cuda::align(scratch.get(), &stream, &ids, map).map_err(moe_error)?;
            Ok(())
        }
    }
}

/// Checks the routing arguments permute and align share: `topk_ids` `[N, K]` int32 or
/// int64, `expert_map` `[E]` int32. Returns `K`.
fn routing_args(topk_ids: &Tensor, expert_map: Option<&Tensor>) -> PyResult<usize> {
    let topk = topk_ids.dims(2, "[num_tokens, topk]")?[1];
    topk_ids.expect(&[Elem::I32, Elem::I64], "int32 or int64")?;
    if let Some(map) = expert_map {
        map.dims(1, "[num_experts]")?;
        map.expect(&[Elem::I32], "int32")?;
    }
    Ok(topk)
}

/// Reads a status block made by the Python layer (the one unpermute records into)
/// after the work queued on `stream`, and raises the first error recorded since the
/// last check.
#[pyfunction]
pub(crate) fn check_status(status: TensorArg<'_>, stream: u64) -> PyResult<()> {
    let status = Tensor::new("status", status)?;
    status.expect(&[Elem::U8], "uint8")?;
    let Place::Cuda(ordinal) = status.place else {
        return Ok(());
    };
    if status.bytes() < cuda::STATUS_BYTES {
        return Err(input_error("status is smaller than a status block".into()));
    }
    let device = cuda_device(ordinal)?;
    // SAFETY: as in `unpermute`: a live status block the Python layer made.
    let block = unsafe { DeviceStatus::from_raw(status.address, ordinal, false) };
    block
        .check(&caller_stream(&device, stream))
        .map_err(moe_error)
}

fn device_bytes(tensor: &Tensor) -> DeviceView<'_, u8> {
    device_view(tensor)
}

fn device_bytes_mut(tensor: &Tensor) -> DeviceViewMut<'_, u8> {
    device_view_mut(tensor)
}

/// A view of a checked CUDA tensor as elements of `T`.
fn device_view<T: DeviceRepr>(tensor: &Tensor) -> DeviceView<'_, T> {
    let Place::Cuda(ordinal) = tensor.place else {
        unreachable!("a CUDA call's tensors are on its device (common_place)")
    };
    // SAFETY: the tensor is a live, contiguous CUDA tensor of `bytes()` bytes on
    // `ordinal` (checked by `Tensor::new` and `common_place`), aligned for its
    // element type, which every caller here reads it as (`T` has that size or is
    // u8); the Python call that passed it holds it until the call returns, and
    // PyTorch's allocator orders its free after the work queued on the current
    // stream; tensors a call writes overlap no other (`check_disjoint`).
    unsafe { DeviceView::from_raw(tensor.address, tensor.bytes() / size_of::<T>(), ordinal) }
}

/// A writable view of a checked CUDA tensor as elements of `T`.
fn device_view_mut<T: DeviceRepr>(tensor: &Tensor) -> DeviceViewMut<'_, T> {
    let Place::Cuda(ordinal) = tensor.place else {
        unreachable!("a CUDA call's tensors are on its device (common_place)")
    };
    // SAFETY: as in `device_view`, and the tensor overlaps no other argument.
    unsafe { DeviceViewMut::from_raw(tensor.address, tensor.bytes() / size_of::<T>(), ordinal) }
}

fn device_ids(tensor: &Tensor, topk: usize) -> PyResult<DeviceTopkIds<'_>> {
    let ids = match tensor.elem {
        Elem::I64 => DeviceExpertIds::I64(device_view(tensor)),
        _ => DeviceExpertIds::I32(device_view(tensor)),
    };
    DeviceTopkIds::new(ids, topk).map_err(moe_error)
}

fn host_ids(tensor: &Tensor, topk: usize) -> PyResult<TopkIds<'_>> {
    match tensor.elem {
        Elem::I64 => TopkIds::new(host_slice::<i64>(tensor), topk),
        _ => TopkIds::new(host_slice::<i32>(tensor), topk),
    }
    .map_err(moe_error)
}

/// A checked CPU tensor as a slice of `T`.
fn host_slice<T>(tensor: &Tensor) -> &[T] {
    debug_assert!(tensor.place == Place::Cpu);
    let len = tensor.bytes() / size_of::<T>();
    if len == 0 {
        return &[];
    }
    // SAFETY: a live, contiguous CPU tensor of `bytes()` bytes (checked by
    // `Tensor::new`), aligned for its element type, read as that type or as bytes;
    // the Python call holds it until this call returns, and no tensor the call
    // writes overlaps it (`check_disjoint`).
    unsafe { std::slice::from_raw_parts(tensor.address as usize as *const T, len) }
}

/// A checked CPU tensor the call writes, as a mutable slice of `T`.
#[allow(clippy::mut_from_ref)]
fn host_slice_mut<T>(tensor: &Tensor) -> &mut [T] {
    debug_assert!(tensor.place == Place::Cpu);
    let len = tensor.bytes() / size_of::<T>();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as in `host_slice`; the tensor overlaps no other argument of the call
    // (`check_disjoint`) and each written tensor is borrowed once per call.
    unsafe { std::slice::from_raw_parts_mut(tensor.address as usize as *mut T, len) }
}

/// Copies `values` into `workspace` at byte `offset` (inside the layout: the
/// workspace was checked to hold it, and the values are at most the scratch's).
fn place<T: bytemuck::Pod>(workspace: &mut [u8], offset: usize, values: &[T]) {
    let raw: &[u8] = bytemuck::cast_slice(values);
    workspace[offset..offset + raw.len()].copy_from_slice(raw);
}
