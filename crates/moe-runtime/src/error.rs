//! The errors every operation of the runtime returns.

use cudarc::driver::DriverError;
use moe_kernels::ParamsKind;

use crate::{DType, Device};

/// A call that does not fit the permute scratch it was given.
///
/// Returned by [`PermuteScratch::validate`](crate::PermuteScratch::validate) and by
/// every operation that takes a scratch, before any memory is touched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScratchMismatch {
    /// The call's `N*K` does not fit in i32, the type of the permutation's indices
    /// (and of the `N*K` sentinel). Checked before anything else.
    #[error("N*K = {num_tokens}*{topk} does not fit in i32 (the index type of the permutation)")]
    IndexOverflow {
        /// `N` of the call.
        num_tokens: usize,
        /// `K` of the call.
        topk: usize,
    },
    /// The call has more tokens than the scratch was built for.
    #[error("{num_tokens} tokens exceed the scratch's max_num_tokens of {max_num_tokens}")]
    TooManyTokens {
        /// `N` of the call.
        num_tokens: usize,
        /// The scratch's [`ScratchConfig::max_num_tokens`](crate::ScratchConfig::max_num_tokens).
        max_num_tokens: usize,
    },
    /// `topk_ids` has another `K` than the scratch.
    #[error("topk_ids has topk {got}, the scratch was built for topk {expected}")]
    Topk {
        /// The scratch's `K`.
        expected: usize,
        /// The call's `K`.
        got: usize,
    },
    /// `expert_map` does not have one entry per global expert (`E`) of the scratch.
    #[error("expert_map has {got} entries, the scratch was built for {expected} experts")]
    NumExperts {
        /// The scratch's `E`.
        expected: usize,
        /// Entries of the call's `expert_map`.
        got: usize,
    },
    /// No `expert_map` was given to a scratch with `L < E`: without a map, global ids
    /// are local ids, which needs `L == E`.
    #[error(
        "no expert_map was given, but the scratch has {num_local_experts} local of {num_experts} experts: pass the map from global to local ids"
    )]
    MissingExpertMap {
        /// The scratch's `E`.
        num_experts: usize,
        /// The scratch's `L`.
        num_local_experts: usize,
    },
    /// The rows written into the scratch have another `H` than its own.
    #[error("hidden size {got} does not match the scratch's hidden size {expected}")]
    HiddenSize {
        /// The `H` of the scratch's rows.
        expected: usize,
        /// The `H` of the call's hidden states.
        got: usize,
    },
    /// The rows written into the scratch have another element type than its own.
    #[error("hidden states are {got}, the scratch holds {expected} rows")]
    Dtype {
        /// The dtype of the scratch's rows.
        expected: DType,
        /// The dtype of the call's hidden states.
        got: DType,
    },
    /// The call's scales have another `S` than the scratch's rows (0 for none).
    #[error("{got} scale columns do not match the scratch's {expected}")]
    ScaleColumns {
        /// The scratch's `S`.
        expected: usize,
        /// The call's `S`.
        got: usize,
    },
    /// A tensor of the call is not on the scratch's device, or a CUDA scratch is built
    /// on another device than its configuration names.
    #[error("{tensor} is on {got}, the scratch is on {expected}")]
    Device {
        /// The tensor (or what else is on the wrong device), by name.
        tensor: &'static str,
        /// The scratch's device.
        expected: Device,
        /// The tensor's device.
        got: Device,
    },
    /// A permute into the scratch's own rows, on a scratch built without rows: build it
    /// with rows, or give the call a destination (`permute_into`).
    #[error(
        "the scratch does not own permuted hidden states (build it with `ScratchConfig::with_rows`) and no destination was given"
    )]
    NoRowBuffer,
    /// An align on a scratch built without an align block size.
    #[error(
        "the scratch has no align buffers (build it with `ScratchConfig::with_align_block_size`)"
    )]
    NoAlignBuffers,
    /// (CUDA) The call is on another stream than the one the scratch is bound to.
    #[error(
        "the scratch runs on stream {bound:#x}, the call is on stream {call:#x}: move it with `switch_stream` first"
    )]
    Stream {
        /// The stream the scratch is bound to.
        bound: usize,
        /// The call's stream.
        call: usize,
    },
}

/// A scratch configuration that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `topk` is 0.
    #[error("topk must be at least 1")]
    ZeroTopk,
    /// `num_experts` is 0.
    #[error("num_experts must be at least 1")]
    ZeroExperts,
    /// `num_local_experts` is 0 or larger than `num_experts`.
    #[error("num_local_experts is {local}: it must be in 1..={global} (num_experts)")]
    LocalExperts {
        /// The configuration's `L`.
        local: usize,
        /// The configuration's `E`.
        global: usize,
    },
    /// `num_experts` (the value held) does not fit in i32, the type of expert ids.
    #[error("num_experts {0} does not fit in i32")]
    TooManyExperts(usize),
    /// (CUDA) More local experts than the routing kernels' shared-memory counters hold
    /// ([`MAX_LOCAL_EXPERTS`](moe_kernels::MAX_LOCAL_EXPERTS)).
    #[error("{local} local experts: the CUDA kernels handle at most {max}")]
    TooManyLocalExperts {
        /// The configuration's `L`.
        local: usize,
        /// The most the kernels handle.
        max: usize,
    },
    /// The owned rows have `hidden_size` 0.
    #[error("hidden_size must be at least 1")]
    ZeroHiddenSize,
    /// The align block size is 0.
    #[error("align block_size must be at least 1")]
    ZeroBlockSize,
    /// The largest index the scratch stores (`max_num_tokens * topk`, or align's padded
    /// length) does not fit in i32.
    #[error(
        "the largest index the scratch must hold ({rows} rows) does not fit in i32: lower max_num_tokens, topk or the align block size"
    )]
    IndexOverflow {
        /// The rows that index would cover.
        rows: u128,
    },
}

/// Everything that can go wrong in a call of the runtime.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoeError {
    /// The call does not fit its scratch; returned before any memory is touched.
    #[error(transparent)]
    Scratch(#[from] ScratchMismatch),
    /// The scratch configuration cannot be built.
    #[error("invalid scratch configuration: {0}")]
    Config(#[from] ConfigError),
    /// A tensor's length does not fit the call: not whole rows, not one row per token,
    /// a destination too small, a size beyond what a CUDA launch can address.
    #[error("{tensor} has {len} elements: {expected}")]
    Shape {
        /// The tensor, by name.
        tensor: &'static str,
        /// Its length, in elements (in bytes for memory given as bytes; its `H` for a
        /// row too long for a CUDA launch).
        len: usize,
        /// What the call needs of it.
        expected: String,
    },
    /// A tensor has another element type than the operation needs (a typed view of
    /// rows of another dtype, a destination or output unlike its input).
    #[error("{tensor} is {got}, {op} needs {expected}")]
    Dtype {
        /// The tensor, by name.
        tensor: &'static str,
        /// The operation.
        op: &'static str,
        /// The element type needed.
        expected: DType,
        /// The tensor's element type.
        got: DType,
    },
    /// The operation does not take this element type at all (a CUDA unpermute of fp8
    /// rows: it sums f32, f16 or bf16).
    #[error("{tensor} is {got}; {op} takes {}", list_dtypes(supported))]
    UnsupportedDtype {
        /// The tensor, by name.
        tensor: &'static str,
        /// The operation.
        op: &'static str,
        /// The tensor's element type.
        got: DType,
        /// The element types the operation takes.
        supported: &'static [DType],
    },
    /// Host rows seen as bytes cannot be viewed as their element type: their address
    /// is not aligned to it.
    #[error("{tensor} is not aligned to its element type ({dtype})")]
    Misaligned {
        /// The tensor, by name.
        tensor: &'static str,
        /// The element type.
        dtype: DType,
    },
    /// Device memory given by the caller is null or not aligned as required (a scratch
    /// over caller memory needs [`SCRATCH_ALIGNMENT`](crate::cuda::SCRATCH_ALIGNMENT)).
    #[error("{what} at {address:#x} is not aligned to {alignment} bytes")]
    MemoryAlignment {
        /// The memory, by what it is for.
        what: &'static str,
        /// Its device address.
        address: u64,
        /// The alignment required, in bytes.
        alignment: usize,
    },
    /// An `expert_map` entry is outside `-1..L` (the lowest such index). The CPU
    /// returns it from permute, permute_into and align; a GPU records it in the status
    /// block.
    #[error("expert_map[{index}] = {value}: local ids must be -1 or in 0..{num_local_experts}")]
    ExpertMapEntry {
        /// The entry's index in `expert_map`: a global expert id.
        index: usize,
        /// The entry.
        value: i32,
        /// `L`.
        num_local_experts: usize,
    },
    /// An unpermute index outside its range: the valid count
    /// (`expert_first_token_offset[L]`) negative or larger than the rows given, or a
    /// negative `inv_permuted_idx` entry (the lowest such position). The CPU returns it
    /// from the call; a GPU records it in the status block.
    #[error("{tensor}[{position}] = {value} is out of range ({bound})")]
    IndexOutOfRange {
        /// `"expert_first_token_offset"` or `"inv_permuted_idx"`.
        tensor: &'static str,
        /// The element's position in the tensor.
        position: usize,
        /// The element.
        value: i64,
        /// The range it must be in.
        bound: String,
    },
    /// Host or device memory cannot be had, or no allocation can be that large.
    #[error("cannot allocate {bytes} bytes for {buffer}")]
    OutOfMemory {
        /// What the memory is for.
        buffer: &'static str,
        /// The bytes asked for.
        bytes: u128,
    },
    /// A CUDA driver call failed; `source` is cudarc's error.
    #[error("CUDA driver error while trying to {action}")]
    Driver {
        /// What the call was for.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A device view is bound to another stream than the call's (see
    /// [`DeviceView::on_any_stream`](crate::cuda::DeviceView::on_any_stream)).
    #[error(
        "{tensor} is bound to stream {bound:#x}, the call is on stream {call:#x} (use it on its own stream, or order the streams and call `on_any_stream`)"
    )]
    StreamMismatch {
        /// The view, by name.
        tensor: &'static str,
        /// The stream the view is bound to.
        bound: usize,
        /// The call's stream.
        call: usize,
    },
    /// A stream of another CUDA context than the device's (or the scratch's).
    #[error("the stream belongs to a context of {stream_device}, not to {device}'s")]
    ForeignStream {
        /// The device the stream was given to.
        device: Device,
        /// The device of the stream's context.
        stream_device: Device,
    },
    /// Something that waits on the host (reading the status block) was asked of a
    /// stream that is capturing a CUDA graph.
    #[error("cannot {action} while the stream is capturing a CUDA graph")]
    Capturing {
        /// What was asked.
        action: &'static str,
    },
    /// A launch was given another parameter block than the kernel takes; nothing was
    /// launched.
    #[error("kernel {kernel} takes {expected:?} parameters, not {got:?}")]
    KernelParams {
        /// The kernel's name.
        kernel: &'static str,
        /// The block the kernel takes.
        expected: ParamsKind,
        /// The block given.
        got: ParamsKind,
    },
    /// No CUDA driver, or no such device: the caller can fall back to the CPU.
    #[error("{device} is not available: {reason}")]
    DeviceUnavailable {
        /// The device asked for.
        device: Device,
        /// Why it cannot be used.
        reason: String,
    },
    /// A locked [`ScratchWorkspace`](crate::ScratchWorkspace) was asked for a scratch
    /// it would have to build or grow.
    #[error(
        "the scratch workspace is locked: {reason}; warm up with the largest call before locking"
    )]
    WorkspaceLocked {
        /// The request, and the scratch that cannot serve it.
        reason: String,
    },
    /// Users of one [`ScratchWorkspace`](crate::ScratchWorkspace) disagree on a field
    /// every user must share (`topk`, the expert counts, the device, the owned rows, the
    /// align block size).
    #[error(
        "the scratch workspace holds {field} = {current}, a user asked for {requested}: users of one workspace must agree on it"
    )]
    WorkspaceConflict {
        /// The field, by name.
        field: &'static str,
        /// The workspace's value (`Debug`).
        current: String,
        /// The request's value (`Debug`).
        requested: String,
    },
    /// A size the CUDA kernels index with 32 bits (a row's bytes, `H`, `L + 1`, a
    /// grid's blocks) is larger than they take: refused before any launch.
    #[error("{quantity} is {value}: the CUDA kernels take at most {max}")]
    DeviceLimit {
        /// What is too large.
        quantity: &'static str,
        /// Its value in this call.
        value: u128,
        /// The largest the kernels take.
        max: u128,
    },
    /// A size computed from caller-given numbers does not fit in usize (see
    /// [`size::product`](crate::size::product)).
    #[error("{quantity}: the product of {factors:?} does not fit in usize")]
    SizeOverflow {
        /// What the product is, e.g. `"row bytes (hidden_size * dtype size)"`.
        quantity: &'static str,
        /// The caller-given numbers whose product overflowed.
        factors: Vec<usize>,
    },
}

/// `f32, f16 or bf16`.
fn list_dtypes(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|dtype| dtype.name()).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "no type".into(),
    }
}

/// The runtime's result type.
pub type Result<T, E = MoeError> = std::result::Result<T, E>;
