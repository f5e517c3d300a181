//! Dispatch and combine: each token's expert entries travel to the ranks that hold
//! the experts, the experts run there, and the results travel back to be summed by
//! unpermute, weighted, in the contract's order (ascending `k`, in f32).
//!
//! Two modes (see `docs/expert-parallel.md`):
//! - [`ExchangeMode::Exact`]: permute groups each token's entries by destination rank,
//!   the ranks' per-destination counts are all-gathered and read on the host (the one
//!   host wait), then exactly the rows each rank needs travel (with their expert ids)
//!   and exactly the results travel back. Least traffic.
//! - [`ExchangeMode::Capacity`]: every rank all-gathers every rank's `max_num_tokens`
//!   token rows and ids (padding ids are -1), each rank computes the entries of its
//!   own experts and writes zeros for the rest, and a reduce-scatter hands each rank
//!   its entries back (one nonzero term each, so the sum is exact). Sizes depend only
//!   on `max_num_tokens`: no host wait, and a layer can be captured in a CUDA graph.
//!
//! Every device buffer is allocated when the exchange is built, for `max_num_tokens`
//! tokens per rank: a call allocates no device memory (exact mode reads the ranks'
//! `W * (W + 2)` counts into a small host vector).

use std::sync::Arc;

use half::bf16;
use moe_runtime::cuda::{
    self, CudaDevice, DeviceBuffer, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput,
    DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceUnpermuteInput, DeviceView,
    DeviceViewMut, StatusBuffer, Stream,
};
use moe_runtime::size::product;
use moe_runtime::{DType, PermuteScratch, ScratchConfig};

use crate::nccl::Communicator;
use crate::placement::ExpertPlacement;
use crate::{EpError, Result};

/// How rows travel between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeMode {
    /// Exact sizes, read on the host after a count exchange (one host wait).
    Exact,
    /// Fixed capacity per rank from `max_num_tokens`: no host wait, graph-capturable.
    Capacity,
}

impl ExchangeMode {
    /// The mode's name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExchangeMode::Exact => "exact",
            ExchangeMode::Capacity => "capacity",
        }
    }
}

/// The sizes an exchange is built for, the same on every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeShape {
    /// `E`, global experts.
    pub num_experts: usize,
    /// `K`, experts per token.
    pub top_k: usize,
    /// `H`, the row width.
    pub hidden_size: usize,
    /// The most tokens a rank passes in one call.
    pub max_num_tokens: usize,
    /// The type of the rows sent (bf16, or fp8 with scales, moved as bytes); the
    /// results that come back are bf16.
    pub dtype: DType,
    /// `S`, f32 scales per token that travel with its rows (0: none).
    pub scale_columns: usize,
}

impl ExchangeShape {
    /// bf16 rows without scales.
    pub fn bf16(
        num_experts: usize,
        top_k: usize,
        hidden_size: usize,
        max_num_tokens: usize,
    ) -> Self {
        Self {
            num_experts,
            top_k,
            hidden_size,
            max_num_tokens,
            dtype: DType::BF16,
            scale_columns: 0,
        }
    }

    /// Sends `dtype` rows with `scale_columns` scales a token.
    pub fn with_rows(mut self, dtype: DType, scale_columns: usize) -> Self {
        self.dtype = dtype;
        self.scale_columns = scale_columns;
        self
    }

    fn row_bytes(&self) -> usize {
        self.hidden_size * self.dtype.size_bytes()
    }
}

/// A rank's experts, as the exchange runs them between dispatch and combine.
pub trait LocalExperts {
    /// `out[r] = expert(r)(rows[r])` (bf16) for the rows `[R, H]` (of the exchange's
    /// type, with their scales when it has them) grouped by local expert as `offsets`
    /// (`[L + 1]`, on the device) says; rows at and after `offsets[L]` may be left as
    /// they are. Queued on `stream`, no host wait.
    fn run(
        &mut self,
        stream: &Stream<'_>,
        rows: DeviceRows<'_>,
        scales: Option<DeviceScales<'_>>,
        offsets: DeviceView<'_, i64>,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()>;
}

/// The call's tensors on this rank: `N` tokens.
#[derive(Clone, Copy, Debug)]
pub struct ExchangeInput<'a> {
    /// `[N, H]` of the exchange's row type.
    pub hidden_states: DeviceRows<'a>,
    /// `[N, S]` when the exchange carries scales.
    pub scales: Option<DeviceScales<'a>>,
    /// `[N, K]` global expert ids.
    pub topk_ids: DeviceView<'a, i32>,
    /// `[N, K]` router weights.
    pub topk_weights: DeviceView<'a, f32>,
}

/// The buffers of exact mode, beside the shared ones.
#[derive(Debug)]
struct ExactBuffers {
    /// Groups entries by destination rank (`L = W`).
    dispatch: PermuteScratch,
    /// `[M * K, H]` (bytes): this rank's entries' rows, grouped by destination, and
    /// `[M * K, S]` their scales.
    send_rows: DeviceBuffer<u8>,
    send_scales: DeviceBuffer<f32>,
    /// `[M * K]`: each sent row's global expert.
    send_ids: DeviceBuffer<i32>,
    /// `[W + 2]` i64 this rank contributes: its `W + 1` dispatch offsets, then a
    /// failure flag; `[W * (W + 2)]` gathered from all ranks.
    record: DeviceBuffer<i64>,
    records: DeviceBuffer<i64>,
    /// `[W * M * K, H]` rows (bytes), `[W * M * K, S]` scales and `[W * M * K]` ids
    /// received, by source rank.
    recv_rows: DeviceBuffer<u8>,
    recv_scales: DeviceBuffer<f32>,
    recv_ids: DeviceBuffer<i32>,
    /// `[M * K, H]`: this rank's entries' results, back in dispatch order.
    returned: DeviceBuffer<bf16>,
}

/// The buffers of capacity mode, beside the shared ones.
#[derive(Debug)]
struct CapacityBuffers {
    /// `[M, H]` rows (bytes), `[M, S]` scales and `[M * K]` ids (padding ids -1) this
    /// rank contributes, and all ranks'.
    send_hidden: DeviceBuffer<u8>,
    send_scales: DeviceBuffer<f32>,
    send_ids: DeviceBuffer<i32>,
    gathered_hidden: DeviceBuffer<u8>,
    gathered_scales: DeviceBuffer<f32>,
    gathered_ids: DeviceBuffer<i32>,
    /// `[M * K, H]`: this rank's entries, each from the rank that holds its expert.
    mine: DeviceBuffer<bf16>,
    /// `[M * K]` `f -> f`, and the valid count `M * K`: unpermute over `mine`.
    identity: DeviceBuffer<i32>,
    all_valid: DeviceBuffer<i64>,
}

#[derive(Debug)]
enum ModeBuffers {
    Exact(ExactBuffers),
    Capacity(CapacityBuffers),
}

/// Dispatch and combine for one rank, with every buffer it needs.
#[derive(Debug)]
pub struct EpExchange {
    comm: Arc<Communicator>,
    placement: ExpertPlacement,
    shape: ExchangeShape,
    mode: ExchangeMode,
    /// `[E]`: each expert's rank (the dispatch's map) and its local id here.
    rank_map: DeviceBuffer<i32>,
    num_local: usize,
    local: LocalSide,
    status: StatusBuffer,
    buffers: ModeBuffers,
}

/// `len` zeroed elements on `device`, at least one (a device allocation cannot be
/// empty; views of it are cut to the call's length).
pub(crate) fn zeros<T: cuda::DeviceRepr + cuda::ValidAsZeroBits>(
    device: &CudaDevice,
    len: usize,
) -> Result<DeviceBuffer<T>> {
    Ok(DeviceBuffer::zeros(device, len.max(1))?)
}

/// Fills `view` with the byte `value` on `stream`.
fn fill<T: cuda::DeviceRepr>(
    stream: &Stream<'_>,
    view: DeviceViewMut<'_, T>,
    value: u8,
) -> Result<()> {
    if view.is_empty() {
        return Ok(());
    }
    // SAFETY: `view` is `len` elements of device memory usable on `stream`; the fill
    // is queued on that stream.
    unsafe {
        cuda::cudarc::driver::result::memset_d8_async(
            view.address(),
            value,
            view.len() * size_of::<T>(),
            stream.cu_stream(),
        )
    }
    .map_err(|source| moe_runtime::MoeError::Driver {
        action: "fill an exchange buffer",
        source,
    })?;
    Ok(())
}

impl EpExchange {
    /// The exchange of `comm`'s rank for `placement`, with buffers for `shape`.
    /// Collective only through what the caller already agreed (see
    /// [`crate::EpMoeBlock::new`], which checks that every rank was given the same).
    pub fn new(
        comm: Arc<Communicator>,
        placement: ExpertPlacement,
        shape: ExchangeShape,
        mode: ExchangeMode,
    ) -> Result<Self> {
        let device = comm.device().clone();
        let (w, rank) = (comm.world(), comm.rank());
        if placement.world() != w || placement.num_experts() != shape.num_experts {
            return Err(EpError::Placement(format!(
                "a placement of {} experts on {} ranks, for {} experts on {w}",
                placement.num_experts(),
                placement.world(),
                shape.num_experts
            )));
        }
        let (m, k, h) = (shape.max_num_tokens, shape.top_k, shape.hidden_size);
        let (e, s, b) = (shape.num_experts, shape.scale_columns, shape.row_bytes());
        let entries = product("entries per rank (M * K)", &[m, k])?;
        let rows = product("rows received (W * M * K)", &[w, m, k])?;
        let row_elements = product("rows received (W * M * K * H)", &[rows, h])?;
        let row_bytes = product("rows received (W * M * K * H), in bytes", &[rows, b])?;
        let num_local = placement.local_experts(rank).len();
        let experts_config = match mode {
            ExchangeMode::Exact => ScratchConfig::new(rows, 1, e, num_local, device.device()),
            ExchangeMode::Capacity => ScratchConfig::new(w * m, k, e, num_local, device.device()),
        };
        let experts_scratch = if num_local > 0 {
            Some(PermuteScratch::with_cuda_device(
                experts_config,
                device.clone(),
            )?)
        } else {
            None
        };
        let buffers = match mode {
            ExchangeMode::Exact => ModeBuffers::Exact(ExactBuffers {
                dispatch: PermuteScratch::with_cuda_device(
                    ScratchConfig::new(m, k, e, w, device.device()),
                    device.clone(),
                )?,
                send_rows: zeros(&device, product("sent rows", &[entries, b])?)?,
                send_scales: zeros(&device, product("sent scales", &[entries, s])?)?,
                send_ids: zeros(&device, entries)?,
                record: zeros(&device, w + 2)?,
                records: zeros(&device, w * (w + 2))?,
                recv_rows: zeros(&device, row_bytes)?,
                recv_scales: zeros(&device, product("received scales", &[rows, s])?)?,
                recv_ids: zeros(&device, rows)?,
                returned: zeros(&device, product("returned rows", &[entries, h])?)?,
            }),
            ExchangeMode::Capacity => {
                let identity: Vec<i32> = (0..entries as i32).collect();
                ModeBuffers::Capacity(CapacityBuffers {
                    send_hidden: zeros(&device, product("hidden states", &[m, b])?)?,
                    send_scales: zeros(&device, product("scales", &[m, s])?)?,
                    send_ids: zeros(&device, entries)?,
                    gathered_hidden: zeros(&device, product("gathered rows", &[w, m, b])?)?,
                    gathered_scales: zeros(&device, product("gathered scales", &[w, m, s])?)?,
                    gathered_ids: zeros(&device, rows)?,
                    mine: zeros(&device, product("returned rows", &[entries, h])?)?,
                    identity: DeviceBuffer::from_host(&device, &identity)?,
                    all_valid: DeviceBuffer::from_host(&device, &[entries as i64])?,
                })
            }
        };
        if i32::try_from(rows).is_err() {
            return Err(EpError::Shape(format!(
                "{rows} rows received per rank (W * max_num_tokens * K) do not fit the \
                 permute's 32-bit indices"
            )));
        }
        Ok(Self {
            rank_map: DeviceBuffer::from_host(&device, &placement.rank_map())?,
            num_local,
            local: LocalSide {
                scratch: experts_scratch,
                expert_map: DeviceBuffer::from_host(&device, &placement.expert_map(rank))?,
                permuted: zeros(&device, row_bytes)?,
                permuted_scales: zeros(&device, product("grouped scales", &[rows, s])?)?,
                expert_out: zeros(&device, row_elements)?,
                results: zeros(&device, row_elements)?,
                ones: DeviceBuffer::from_host(&device, &vec![1.0f32; rows])?,
            },
            status: StatusBuffer::new(&device)?,
            buffers,
            comm,
            placement,
            shape,
            mode,
        })
    }

    /// The communicator.
    pub fn comm(&self) -> &Communicator {
        &self.comm
    }

    /// The placement of experts on ranks.
    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    /// The sizes the exchange was built for.
    pub fn shape(&self) -> ExchangeShape {
        self.shape
    }

    /// The mode.
    pub fn mode(&self) -> ExchangeMode {
        self.mode
    }

    /// The experts on this rank.
    pub fn num_local_experts(&self) -> usize {
        self.num_local
    }

    /// Bytes of device memory the exchange holds.
    pub fn allocated_bytes(&self) -> usize {
        let local = &self.local;
        let rows = local.permuted.len() + (local.expert_out.len() + local.results.len()) * 2;
        let mode = match &self.buffers {
            ModeBuffers::Exact(b) => {
                b.dispatch.allocated_bytes()
                    + b.send_rows.len()
                    + b.recv_rows.len()
                    + b.returned.len() * 2
                    + (b.send_ids.len() + b.recv_ids.len()) * 4
                    + (b.send_scales.len() + b.recv_scales.len()) * 4
            }
            ModeBuffers::Capacity(b) => {
                b.send_hidden.len()
                    + b.gathered_hidden.len()
                    + b.mine.len() * 2
                    + (b.send_ids.len() + b.gathered_ids.len() + b.identity.len()) * 4
                    + (b.send_scales.len() + b.gathered_scales.len()) * 4
            }
        };
        rows + mode
            + (local.ones.len() + local.permuted_scales.len()) * 4
            + local
                .scratch
                .as_ref()
                .map_or(0, PermuteScratch::allocated_bytes)
    }

    /// The input's token count, or why it cannot be exchanged.
    fn tokens_of(&self, input: &ExchangeInput<'_>, out_len: usize) -> Result<usize> {
        let (h, k, m) = (
            self.shape.hidden_size,
            self.shape.top_k,
            self.shape.max_num_tokens,
        );
        let (dtype, s) = (self.shape.dtype, self.shape.scale_columns);
        let rows = input.hidden_states;
        if rows.dtype() != dtype || rows.hidden_size() != h {
            return Err(EpError::Shape(format!(
                "hidden_states are rows of {} {:?}; the exchange moves rows of {h} {dtype:?}",
                rows.hidden_size(),
                rows.dtype()
            )));
        }
        let n = rows.num_rows();
        match (input.scales, s) {
            (None, 0) => {}
            (Some(scales), s) if s > 0 && scales.columns() == s && scales.num_rows() == n => {}
            (scales, s) => {
                return Err(EpError::Shape(format!(
                    "scales (rows, columns) {:?} for {n} tokens; the exchange carries {s} \
                     scales a token",
                    scales.map(|scales| (scales.num_rows(), scales.columns()))
                )));
            }
        }
        if n > m {
            return Err(EpError::Shape(format!(
                "{n} tokens, more than the {m} (max_num_tokens) the exchange was built for"
            )));
        }
        for (tensor, len) in [
            ("topk_ids", input.topk_ids.len()),
            ("topk_weights", input.topk_weights.len()),
        ] {
            if len != n * k {
                return Err(EpError::Shape(format!(
                    "{tensor} has {len} elements, not {n} tokens * top-k {k}"
                )));
            }
        }
        if out_len != n * h {
            return Err(EpError::Shape(format!(
                "the output has {out_len} elements, not {n} tokens * {h}"
            )));
        }
        Ok(n)
    }

    /// Dispatches this rank's entries, runs `experts` on what this rank received, and
    /// combines the results into `out` `[N, H]` (bf16). Every rank must call it with
    /// its own tokens (zero is allowed). A call this rank cannot take (more than
    /// `max_num_tokens` tokens, inconsistent lengths) still takes part in the
    /// exchange, as [`Self::take_part_and_fail`] does.
    pub fn forward(
        &mut self,
        stream: &Stream<'_>,
        input: ExchangeInput<'_>,
        experts: &mut dyn LocalExperts,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        if let Err(error) = self.tokens_of(&input, out.len()) {
            return self.take_part_and_fail(stream, experts, error);
        }
        match self.mode {
            ExchangeMode::Exact => self.forward_exact(stream, input, false, experts, out),
            ExchangeMode::Capacity => self.forward_capacity(stream, input, experts, out),
        }
    }

    /// Takes part in the exchange with no tokens, so that no other rank waits forever,
    /// then returns `error`: what a rank does when its own call cannot run. In exact
    /// mode the other ranks learn of it from the count exchange and return
    /// [`EpError::PeerFailed`]; in capacity mode (no host wait) they finish their
    /// call, with nothing from this rank.
    pub fn take_part_and_fail(
        &mut self,
        stream: &Stream<'_>,
        experts: &mut dyn LocalExperts,
        error: EpError,
    ) -> Result<()> {
        // Empty views of memory of its own (this is the error path, not a step to
        // capture), so the exchange's buffers stay free to borrow.
        let device = self.comm.device().clone();
        let (dtype, h, s) = (
            self.shape.dtype,
            self.shape.hidden_size,
            self.shape.scale_columns,
        );
        let hidden = DeviceBuffer::<u8>::zeros(&device, 1)?;
        let ids = DeviceBuffer::<i32>::zeros(&device, 1)?;
        let weights = DeviceBuffer::<f32>::zeros(&device, 1)?;
        let mut out = DeviceBuffer::<bf16>::zeros(&device, 1)?;
        let none = ExchangeInput {
            hidden_states: DeviceRows::from_bytes(hidden.view().prefix(0), dtype, h)?,
            scales: scales_of(&weights, 0, s)?,
            topk_ids: ids.view().prefix(0),
            topk_weights: weights.view().prefix(0),
        };
        let exchanged = match self.mode {
            ExchangeMode::Exact => {
                self.forward_exact(stream, none, true, experts, out.view_mut().prefix(0))
            }
            ExchangeMode::Capacity => {
                self.forward_capacity(stream, none, experts, out.view_mut().prefix(0))
            }
        };
        match exchanged {
            Ok(()) | Err(EpError::PeerFailed { .. }) => Err(error),
            Err(other) => Err(other),
        }
    }

    fn forward_exact(
        &mut self,
        stream: &Stream<'_>,
        input: ExchangeInput<'_>,
        failed: bool,
        experts: &mut dyn LocalExperts,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        let (h, k) = (self.shape.hidden_size, self.shape.top_k);
        let (dtype, s, rb) = (
            self.shape.dtype,
            self.shape.scale_columns,
            self.shape.row_bytes(),
        );
        let (w, rank) = (self.comm.world(), self.comm.rank());
        let entries = input.topk_ids.len();
        let ModeBuffers::Exact(b) = &mut self.buffers else {
            unreachable!("forward_exact runs in exact mode only")
        };

        // Dispatch: entries grouped by destination rank, each row with its scales and
        // its expert.
        let mut dispatch = DevicePermuteInput::new(
            input.hidden_states,
            DeviceTopkIds::new(DeviceExpertIds::I32(input.topk_ids), k)?,
        )
        .with_expert_map(self.rank_map.view());
        if let Some(scales) = input.scales {
            dispatch = dispatch.with_scales(scales);
        }
        let dest = DevicePermuteDest {
            hidden_states: DeviceRowsMut::from_bytes(
                b.send_rows.view_mut().prefix(entries * rb),
                dtype,
                h,
            )?,
            scales: (s > 0).then(|| b.send_scales.view_mut().prefix(entries * s)),
        };
        let routed = cuda::permute_into(&mut b.dispatch, stream, &dispatch, dest)?;
        let sent_rows = routed.permuted_hidden_states.bytes();
        let sent_scales = routed.permuted_scales.map(|scales| scales.data());
        moe_experts::cuda::gather_ids(
            stream,
            input.topk_ids,
            routed.permuted_idx,
            b.send_ids.view_mut().prefix(entries),
        )?;

        // The counts: every rank's offsets by destination and failure flag, read on
        // the host (the one wait of this mode).
        routed
            .expert_first_token_offset
            .copy_into(b.record.view_mut().prefix(w + 1), stream)?;
        let flag = b.record.view_mut().range("failure flag", w + 1, 1)?;
        fill(stream, flag, u8::from(failed))?;
        self.comm
            .all_gather(stream, b.record.view(), b.records.view_mut())?;
        let records = b.records.view().to_host(stream)?;
        let plan = Plan::new(&records, w, rank, self.shape)?;
        // Every rank sees the same flags: all stop here together (the failed rank
        // returns its own error).
        if let Some(peer) = plan.failed {
            return Err(EpError::PeerFailed {
                rank: peer,
                what: "its exchange call",
            });
        }

        // Rows, scales and ids to the ranks that hold their experts.
        self.comm.group(|comm| {
            for peer in 0..w {
                let (at, count) = plan.sent[peer];
                if count > 0 {
                    let rows = sent_rows.range("sent rows", at * rb, count * rb)?;
                    comm.send(stream, rows, peer)?;
                    if let Some(scales) = sent_scales {
                        let scales = scales.range("sent scales", at * s, count * s)?;
                        comm.send(stream, scales, peer)?;
                    }
                    let ids = b.send_ids.view().range("sent ids", at, count)?;
                    comm.send(stream, ids, peer)?;
                }
                let (at, count) = plan.received[peer];
                if count > 0 {
                    let rows = b.recv_rows.view_mut();
                    let rows = rows.range("received rows", at * rb, count * rb)?;
                    comm.recv(stream, rows, peer)?;
                    if s > 0 {
                        let scales = b.recv_scales.view_mut();
                        let scales = scales.range("received scales", at * s, count * s)?;
                        comm.recv(stream, scales, peer)?;
                    }
                    let ids = b.recv_ids.view_mut().range("received ids", at, count)?;
                    comm.recv(stream, ids, peer)?;
                }
            }
            Ok(())
        })?;

        // This rank's experts, one row each, back in the order received.
        let received = plan.total_received;
        if received > 0 {
            let rows = b.recv_rows.view().prefix(received * rb);
            self.local.run(
                stream,
                experts,
                DeviceRows::from_bytes(rows, dtype, h)?,
                scales_of(&b.recv_scales, received, s)?,
                DeviceTopkIds::new(DeviceExpertIds::I32(b.recv_ids.view().prefix(received)), 1)?,
            )?;
        }

        // The results back to the ranks whose entries they are.
        self.comm.group(|comm| {
            for peer in 0..w {
                let (at, count) = plan.received[peer];
                if count > 0 {
                    let results = self.local.results.view();
                    let results = results.range("results", at * h, count * h)?;
                    comm.send(stream, results, peer)?;
                }
                let (at, count) = plan.sent[peer];
                if count > 0 {
                    let rows = b.returned.view_mut();
                    let rows = rows.range("returned rows", at * h, count * h)?;
                    comm.recv(stream, rows, peer)?;
                }
            }
            Ok(())
        })?;

        // The weighted sum, as on one GPU.
        let combine = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::new(b.returned.view().prefix(entries * h), h)?,
            inv_permuted_idx: routed.inv_permuted_idx,
            expert_first_token_offset: routed.expert_first_token_offset,
            topk_weights: input.topk_weights,
            topk: k,
            status: routed.status,
        };
        cuda::unpermute_into(stream, &combine, DeviceRowsMut::new(out, h)?)?;
        Ok(())
    }

    fn forward_capacity(
        &mut self,
        stream: &Stream<'_>,
        input: ExchangeInput<'_>,
        experts: &mut dyn LocalExperts,
        out: DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        let (h, k) = (self.shape.hidden_size, self.shape.top_k);
        let (dtype, s, rb) = (
            self.shape.dtype,
            self.shape.scale_columns,
            self.shape.row_bytes(),
        );
        let (m, w) = (self.shape.max_num_tokens, self.comm.world());
        let entries = input.topk_ids.len();
        let ModeBuffers::Capacity(b) = &mut self.buffers else {
            unreachable!("forward_capacity runs in capacity mode only")
        };

        // Every rank's tokens to every rank: rows, scales, and ids with -1 past N.
        let rows = input.hidden_states.bytes();
        rows.copy_into(b.send_hidden.view_mut().prefix(rows.len()), stream)?;
        if let Some(scales) = input.scales {
            let scales = scales.data();
            scales.copy_into(b.send_scales.view_mut().prefix(scales.len()), stream)?;
        }
        fill(stream, b.send_ids.view_mut(), 0xff)?;
        input
            .topk_ids
            .copy_into(b.send_ids.view_mut().prefix(entries), stream)?;
        self.comm.group(|comm| {
            let all_rows = b.gathered_hidden.view_mut().prefix(w * m * rb);
            comm.all_gather(stream, b.send_hidden.view().prefix(m * rb), all_rows)?;
            if s > 0 {
                let all_scales = b.gathered_scales.view_mut().prefix(w * m * s);
                comm.all_gather(stream, b.send_scales.view().prefix(m * s), all_scales)?;
            }
            comm.all_gather(stream, b.send_ids.view(), b.gathered_ids.view_mut())
        })?;

        // This rank's experts on every entry they hold; zeros for the others.
        let gathered = w * m * k;
        let rows = b.gathered_hidden.view().prefix(w * m * rb);
        self.local.run(
            stream,
            experts,
            DeviceRows::from_bytes(rows, dtype, h)?,
            scales_of(&b.gathered_scales, w * m, s)?,
            DeviceTopkIds::new(DeviceExpertIds::I32(b.gathered_ids.view()), k)?,
        )?;

        // Each entry back to its rank: one rank wrote it, the others zeros.
        self.comm.reduce_scatter_sum(
            stream,
            self.local.results.view().prefix(gathered * h),
            b.mine.view_mut(),
        )?;
        let combine = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::new(b.mine.view(), h)?,
            inv_permuted_idx: b.identity.view().prefix(entries),
            expert_first_token_offset: b.all_valid.view(),
            topk_weights: input.topk_weights,
            topk: k,
            status: self.status.view(),
        };
        cuda::unpermute_into(stream, &combine, DeviceRowsMut::new(out, h)?)?;
        Ok(())
    }
}

/// What a rank does between dispatch and combine: group what it received by local
/// expert, run its experts, and lay each entry's result out for the way back.
#[derive(Debug)]
struct LocalSide {
    /// Groups what this rank received by local expert (`None` with no experts here).
    scratch: Option<PermuteScratch>,
    /// `[E]`: each expert's local id here, or -1.
    expert_map: DeviceBuffer<i32>,
    /// `[W * M * K, H]`: received rows grouped by local expert (bytes, and their
    /// scales), the experts' bf16 outputs in that order, and those outputs per
    /// received row (exact) or per gathered entry (capacity).
    permuted: DeviceBuffer<u8>,
    permuted_scales: DeviceBuffer<f32>,
    expert_out: DeviceBuffer<bf16>,
    results: DeviceBuffer<bf16>,
    /// `[W * M * K]` ones: the weights of the per-entry unpermute.
    ones: DeviceBuffer<f32>,
}

impl LocalSide {
    /// Groups the entries of `ids` held here by local expert (permute with the rank's
    /// map, rows and scales together), runs `experts`, and writes each entry's result
    /// to `results[f]` (`[T * topk, H]`; zeros for entries held elsewhere): unpermute
    /// with one weight of 1 per entry, an exact copy.
    fn run(
        &mut self,
        stream: &Stream<'_>,
        experts: &mut dyn LocalExperts,
        rows: DeviceRows<'_>,
        scales: Option<DeviceScales<'_>>,
        ids: DeviceTopkIds<'_>,
    ) -> Result<()> {
        let (h, dtype, row_bytes) = (rows.hidden_size(), rows.dtype(), rows.row_bytes());
        let entries = ids.ids().len();
        let results = self.results.view_mut().prefix(entries * h);
        let Some(scratch) = self.scratch.as_mut() else {
            return fill(stream, results, 0);
        };
        let mut permute =
            DevicePermuteInput::new(rows, ids).with_expert_map(self.expert_map.view());
        let scale_columns = scales.map_or(0, |scales| scales.columns());
        if let Some(scales) = scales {
            permute = permute.with_scales(scales);
        }
        let dest = DevicePermuteDest {
            hidden_states: DeviceRowsMut::from_bytes(
                self.permuted.view_mut().prefix(entries * row_bytes),
                dtype,
                h,
            )?,
            scales: (scale_columns > 0).then(|| {
                self.permuted_scales
                    .view_mut()
                    .prefix(entries * scale_columns)
            }),
        };
        let routed = cuda::permute_into(scratch, stream, &permute, dest)?;
        experts.run(
            stream,
            routed.permuted_hidden_states,
            routed.permuted_scales,
            routed.expert_first_token_offset,
            self.expert_out.view_mut().prefix(entries * h),
        )?;
        let per_entry = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::new(self.expert_out.view().prefix(entries * h), h)?,
            inv_permuted_idx: routed.inv_permuted_idx,
            expert_first_token_offset: routed.expert_first_token_offset,
            topk_weights: self.ones.view().prefix(entries),
            topk: 1,
            status: routed.status,
        };
        cuda::unpermute_into(stream, &per_entry, DeviceRowsMut::new(results, h)?)?;
        Ok(())
    }
}

/// The first `rows` rows of `s` scales in `buffer`, or `None` when `s` is 0.
fn scales_of(
    buffer: &DeviceBuffer<f32>,
    rows: usize,
    s: usize,
) -> Result<Option<DeviceScales<'_>>> {
    if s == 0 {
        return Ok(None);
    }
    Ok(Some(DeviceScales::new(buffer.view().prefix(rows * s), s)?))
}

/// Who sends how many rows to whom in one exact-mode call, from every rank's
/// dispatch offsets (the same on every rank, so every rank reaches the same verdict).
#[derive(Debug)]
struct Plan {
    /// `(first row, rows)` this rank sends to each peer, in its dispatch order.
    sent: Vec<(usize, usize)>,
    /// `(first row, rows)` this rank receives from each peer, in its receive buffer.
    received: Vec<(usize, usize)>,
    total_received: usize,
    /// The first rank whose call failed.
    failed: Option<usize>,
}

impl Plan {
    fn new(records: &[i64], w: usize, rank: usize, shape: ExchangeShape) -> Result<Self> {
        let limit = (shape.max_num_tokens * shape.top_k) as i64;
        let record = |r: usize| &records[r * (w + 2)..][..w + 2];
        for r in 0..w {
            let offsets = &record(r)[..=w];
            let ordered = offsets[0] == 0
                && offsets.windows(2).all(|pair| pair[0] <= pair[1])
                && offsets[w] <= limit;
            if !ordered {
                return Err(EpError::Shape(format!(
                    "rank {r} reported dispatch offsets {offsets:?}, not a grouping of at most \
                     {limit} entries"
                )));
            }
        }
        let mine = &record(rank)[..=w];
        let sent = (0..w)
            .map(|peer| (mine[peer] as usize, (mine[peer + 1] - mine[peer]) as usize))
            .collect();
        let mut received = Vec::with_capacity(w);
        let mut at = 0;
        for peer in 0..w {
            let theirs = record(peer);
            let count = (theirs[rank + 1] - theirs[rank]) as usize;
            received.push((at, count));
            at += count;
        }
        Ok(Self {
            sent,
            received,
            total_received: at,
            failed: (0..w).find(|&r| record(r)[w + 1] != 0),
        })
    }
}
