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
    #[error("N*K = {num_tokens}*{topk} does not fit in i32 (the index type of the permutation)")]
    IndexOverflow { num_tokens: usize, topk: usize },
    #[error("{num_tokens} tokens exceed the scratch's max_num_tokens of {max_num_tokens}")]
    TooManyTokens {
        num_tokens: usize,
        max_num_tokens: usize,
    },
    #[error("topk_ids has topk {got}, the scratch was built for topk {expected}")]
    Topk { expected: usize, got: usize },
    #[error("expert_map has {got} entries, the scratch was built for {expected} experts")]
    NumExperts { expected: usize, got: usize },
    #[error(
        "no expert_map was given, but the scratch has {num_local_experts} local of {num_experts} experts: pass the map from global to local ids"
    )]
    MissingExpertMap {
        num_experts: usize,
        num_local_experts: usize,
    },
    #[error("hidden size {got} does not match the scratch's hidden size {expected}")]
    HiddenSize { expected: usize, got: usize },
    #[error("hidden states are {got}, the scratch holds {expected} rows")]
    Dtype { expected: DType, got: DType },
    #[error("{got} scale columns do not match the scratch's {expected}")]
    ScaleColumns { expected: usize, got: usize },
    #[error("{tensor} is on {got}, the scratch is on {expected}")]
    Device {
        tensor: &'static str,
        expected: Device,
        got: Device,
    },
    #[error(
        "the scratch does not own permuted hidden states (build it with `ScratchConfig::with_rows`) and no destination was given"
    )]
    NoRowBuffer,
    #[error(
        "the scratch has no align buffers (build it with `ScratchConfig::with_align_block_size`)"
    )]
    NoAlignBuffers,
    #[error(
        "the scratch runs on stream {bound:#x}, the call is on stream {call:#x}: move it with `switch_stream` first"
    )]
    Stream { bound: usize, call: usize },
}

/// A scratch configuration that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("topk must be at least 1")]
    ZeroTopk,
    #[error("num_experts must be at least 1")]
    ZeroExperts,
    #[error("num_local_experts is {local}: it must be in 1..={global} (num_experts)")]
    LocalExperts { local: usize, global: usize },
    #[error("num_experts {0} does not fit in i32")]
    TooManyExperts(usize),
    #[error("{local} local experts: the CUDA kernels handle at most {max}")]
    TooManyLocalExperts { local: usize, max: usize },
    #[error("hidden_size must be at least 1")]
    ZeroHiddenSize,
    #[error("align block_size must be at least 1")]
    ZeroBlockSize,
    #[error(
        "the largest index the scratch must hold ({rows} rows) does not fit in i32: lower max_num_tokens, topk or the align block size"
    )]
    IndexOverflow { rows: u128 },
}

/// Everything that can go wrong in a call of the runtime.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoeError {
    #[error(transparent)]
    Scratch(#[from] ScratchMismatch),
    #[error("invalid scratch configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{tensor} has {len} elements: {expected}")]
    Shape {
        tensor: &'static str,
        len: usize,
        expected: String,
    },
    #[error("{tensor} is {got}, {op} needs {expected}")]
    Dtype {
        tensor: &'static str,
        op: &'static str,
        expected: DType,
        got: DType,
    },
    #[error("{tensor} is {got}; {op} takes {}", list_dtypes(supported))]
    UnsupportedDtype {
        tensor: &'static str,
        op: &'static str,
        got: DType,
        supported: &'static [DType],
    },
    #[error("{tensor} is not aligned to its element type ({dtype})")]
    Misaligned { tensor: &'static str, dtype: DType },
    #[error("{what} at {address:#x} is not aligned to {alignment} bytes")]
    MemoryAlignment {
        what: &'static str,
        address: u64,
        alignment: usize,
    },
    #[error("expert_map[{index}] = {value}: local ids must be -1 or in 0..{num_local_experts}")]
    ExpertMapEntry {
        index: usize,
        value: i32,
        num_local_experts: usize,
    },
    #[error("{tensor}[{position}] = {value} is out of range ({bound})")]
    IndexOutOfRange {
        tensor: &'static str,
        position: usize,
        value: i64,
        bound: String,
    },
    #[error("cannot allocate {bytes} bytes for {buffer}")]
    OutOfMemory { buffer: &'static str, bytes: u128 },
    #[error("CUDA driver error while trying to {action}")]
    Driver {
        action: &'static str,
        #[source]
        source: DriverError,
    },
    #[error(
        "{tensor} is bound to stream {bound:#x}, the call is on stream {call:#x} (use it on its own stream, or order the streams and call `on_any_stream`)"
    )]
    StreamMismatch {
        tensor: &'static str,
        bound: usize,
        call: usize,
    },
    #[error("the stream belongs to a context of {stream_device}, not to {device}'s")]
    ForeignStream {
        device: Device,
        stream_device: Device,
    },
    #[error("cannot {action} while the stream is capturing a CUDA graph")]
    Capturing { action: &'static str },
    #[error("kernel {kernel} takes {expected:?} parameters, not {got:?}")]
    KernelParams {
        kernel: &'static str,
        expected: ParamsKind,
        got: ParamsKind,
    },
    #[error("{device} is not available: {reason}")]
    DeviceUnavailable { device: Device, reason: String },
    #[error(
        "the scratch workspace is locked: {reason}; warm up with the largest call before locking"
    )]
    WorkspaceLocked { reason: String },
    #[error(
        "the scratch workspace holds {field} = {current}, a user asked for {requested}: users of one workspace must agree on it"
    )]
    WorkspaceConflict {
        field: &'static str,
        current: String,
        requested: String,
    },
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
