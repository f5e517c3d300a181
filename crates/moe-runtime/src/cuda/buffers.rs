//! The device memory of a CUDA permute scratch: one region, carved into buffers.
//!
//! The region is either the scratch's own (allocated with `cuMemAlloc` when it is
//! built, freed with `cuMemFree`, which waits for the work still using it) or the
//! caller's ([`crate::PermuteScratch::in_cuda_memory`]: PyTorch's caching allocator,
//! a candle tensor). [`ScratchMemoryLayout`] says how many bytes a configuration
//! needs and how they must be aligned; every buffer starts on a 256-byte boundary,
//! which 16-byte row accesses and coalescing want.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, sys};
use moe_kernels::{MAX_LOCAL_EXPERTS, STATUS_BYTES};

use super::device::{CudaDevice, Stream, StreamId, driver_error};
use super::launch::max_route_chunks;
use super::memory::Binding;
use super::owned::DeviceMemory;
use super::status::{DeviceStatus, STATUS_CLEAR_BYTE, clear_async};
use crate::config::max_padded_rows;
use crate::size::product;
use crate::{ConfigError, MoeError, Result, ScratchConfig, ScratchMismatch};

/// Alignment of the region and of every buffer in it.
pub const SCRATCH_ALIGNMENT: usize = 256;

/// The device memory a CUDA scratch of a configuration needs: `bytes`, starting at an
/// address that is a multiple of `alignment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchMemoryLayout {
    /// Bytes of the region: every buffer, each rounded up to [`SCRATCH_ALIGNMENT`].
    pub bytes: usize,
    /// The alignment of the region's start, in bytes ([`SCRATCH_ALIGNMENT`]).
    pub alignment: usize,
    /// Where the outputs lie in the region, so that a caller whose allocator owns the
    /// region can make its own tensors over them.
    pub offsets: ScratchOffsets,
}

/// Byte offsets, from the region's start, of the buffers a call's outputs are views
/// of. A call of `N` tokens uses the start of each: `[N*K]` of `permuted_idx`, and
/// so on. The align buffers are at offset 0 with no bytes when the configuration
/// has no align block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchOffsets {
    /// The status block ([`STATUS_BYTES`] bytes) the scratch's calls record bad input in.
    pub status: usize,
    /// `[L + 1]` i64.
    pub expert_first_token_offset: usize,
    /// `[max N*K]` i32.
    pub permuted_idx: usize,
    /// `[max N*K]` i32.
    pub inv_permuted_idx: usize,
    /// `[max N*K, H]` rows, when the configuration has rows.
    pub permuted_hidden_states: usize,
    /// `[max N*K, S]` f32, when the configuration has scale columns.
    pub permuted_scales: usize,
    /// align: `[max padded rows]` i32.
    pub sorted_ids: usize,
    /// align: `[max padded rows / block size]` i32.
    pub block_expert_ids: usize,
    /// align: one i32.
    pub num_rows_post_padded: usize,
}

/// A buffer's place in the region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Region {
    offset: usize,
    bytes: usize,
}

/// Every buffer of a scratch, in the region.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Carving {
    /// The status block kernels report bad input in.
    pub(crate) status: Region,
    /// `[max chunks, L]` u32: per-chunk counts, then first rows (multi-block routing).
    pub(crate) chunk_counts: Region,
    /// `[L + 1]` i64.
    pub(crate) expert_first_token_offset: Region,
    /// `[max N*K]` i32.
    pub(crate) permuted_idx: Region,
    /// `[max N*K]` i32.
    pub(crate) inv_permuted_idx: Region,
    /// `[max N*K, H]` bytes.
    pub(crate) permuted_rows: Region,
    /// `[max N*K, S]` f32.
    pub(crate) permuted_scales: Region,
    /// align: `[max padded rows]` i32.
    pub(crate) sorted_ids: Region,
    /// align: `[max padded rows / block size]` i32.
    pub(crate) block_expert_ids: Region,
    /// align: `[L + 1]` i64, first padded row of each expert.
    pub(crate) padded_offsets: Region,
    /// align: `[1]` i32.
    pub(crate) num_rows_post_padded: Region,
    /// Bytes of the whole region.
    total: usize,
}

impl Carving {
    /// The buffers of `config`, after the checks of building any scratch.
    pub(crate) fn of(config: &ScratchConfig) -> Result<Self> {
        config.check_buildable()?;
        let local = config.num_local_experts;
        if local > MAX_LOCAL_EXPERTS as usize {
            return Err(ConfigError::TooManyLocalExperts {
                local,
                max: MAX_LOCAL_EXPERTS as usize,
            }
            .into());
        }
        // `check` keeps every index (so `entries`) within i32.
        let entries = config.max_entries()?;
        let max_chunks = max_route_chunks(entries as u32) as usize;
        let (row_bytes, scales) = config.rows.map_or(Ok((0, 0)), |rows| {
            rows.row_bytes().map(|bytes| (bytes, rows.scale_columns))
        })?;
        let padded = config
            .align_block_size
            .map_or(0, |block| max_padded_rows(entries, local, block));
        let blocks = config
            .align_block_size
            .map_or(0, |block| padded.div_ceil(block));
        let align = usize::from(config.align_block_size.is_some());
        let mut next = 0usize;
        let mut region = |what: &'static str, bytes: usize| -> Result<Region> {
            let offset = next;
            let end = offset
                .checked_add(bytes)
                .and_then(|end| end.checked_next_multiple_of(SCRATCH_ALIGNMENT))
                .ok_or_else(|| MoeError::SizeOverflow {
                    quantity: what,
                    factors: vec![offset, bytes],
                })?;
            next = end;
            Ok(Region { offset, bytes })
        };
        let status = region("status block", STATUS_BYTES)?;
        let chunk_counts = region("chunk counts", max_chunks * local * 4)?;
        let expert_first_token_offset = region("expert_first_token_offset", (local + 1) * 8)?;
        let permuted_idx = region("permuted_idx", entries * 4)?;
        let inv_permuted_idx = region("inv_permuted_idx", entries * 4)?;
        let rows = product("permuted_hidden_states bytes", &[entries, row_bytes])?;
        let permuted_rows = region("permuted_hidden_states bytes", rows)?;
        let scales = product("permuted_scales bytes", &[entries, scales, 4])?;
        let permuted_scales = region("permuted_scales", scales)?;
        let sorted_ids = region("sorted_ids", padded * 4)?;
        let block_expert_ids = region("block_expert_ids", blocks * 4)?;
        let padded_offsets = region("padded offsets", align * (local + 1) * 8)?;
        let num_rows_post_padded = region("num_rows_post_padded", align * 4)?;
        Ok(Self {
            status,
            chunk_counts,
            expert_first_token_offset,
            permuted_idx,
            inv_permuted_idx,
            permuted_rows,
            permuted_scales,
            sorted_ids,
            block_expert_ids,
            padded_offsets,
            num_rows_post_padded,
            total: next,
        })
    }

    pub(crate) fn layout(&self) -> ScratchMemoryLayout {
        ScratchMemoryLayout {
            bytes: self.total,
            alignment: SCRATCH_ALIGNMENT,
            offsets: ScratchOffsets {
                status: self.status.offset,
                expert_first_token_offset: self.expert_first_token_offset.offset,
                permuted_idx: self.permuted_idx.offset,
                inv_permuted_idx: self.inv_permuted_idx.offset,
                permuted_hidden_states: self.permuted_rows.offset,
                permuted_scales: self.permuted_scales.offset,
                sorted_ids: self.sorted_ids.offset,
                block_expert_ids: self.block_expert_ids.offset,
                num_rows_post_padded: self.num_rows_post_padded.offset,
            },
        }
    }
}

/// Whose memory a scratch's region is.
#[derive(Debug)]
enum Memory {
    Owned(DeviceMemory),
    /// The caller's: valid while the scratch lives (the constructor's contract).
    Caller {
        address: u64,
    },
}

/// The buffers of a CUDA scratch, and the stream its calls run on.
#[derive(Debug)]
pub(crate) struct CudaBuffers {
    pub(crate) device: Arc<CudaDevice>,
    memory: Memory,
    carving: Carving,
    /// The stream of the calls so far; the first call binds a scratch that has none.
    bound: Option<StreamId>,
    /// Recorded on the old stream when the scratch moves to another one; made on the
    /// first move (most scratches never move, and the allocating baseline builds one
    /// per call).
    handoff: Option<CudaEvent>,
    /// Checked mode: every call reads the status block back.
    pub(crate) checked: bool,
}

impl CudaBuffers {
    /// A scratch of its own memory for `config`, on `device`; unbound.
    pub(crate) fn allocate(config: &ScratchConfig, device: Arc<CudaDevice>) -> Result<Self> {
        let carving = Carving::of(config)?;
        let memory = DeviceMemory::allocate(&device, "the scratch", carving.total)?;
        memory.fill_sync(
            &device,
            carving.status.offset,
            STATUS_BYTES,
            STATUS_CLEAR_BYTE,
        )?;
        Self::with_memory(device, Memory::Owned(memory), carving, None)
    }

    /// A scratch allocated on `stream` (stream-ordered), bound to it for its life.
    ///
    /// # Safety
    /// `stream` stays valid until the scratch is dropped.
    pub(crate) unsafe fn on_stream(
        config: &ScratchConfig,
        device: Arc<CudaDevice>,
        stream: &Stream<'_>,
    ) -> Result<Self> {
        if !device.same_context(stream.device()) {
            return Err(foreign(&device, stream));
        }
        let carving = Carving::of(config)?;
        // SAFETY: the caller's contract; the scratch stays bound to `stream`.
        let memory = unsafe { DeviceMemory::allocate_on(stream, "the scratch", carving.total)? };
        // SAFETY: the status block lies in the allocation; ordered on its stream.
        unsafe { clear_async(memory.address() + carving.status.offset as u64, stream)? };
        Self::with_memory(device, Memory::Owned(memory), carving, Some(stream.id()))
    }

    /// A scratch over `bytes` of the caller's memory at `address`, bound to `stream`
    /// (where its status block is cleared when `clear_status`).
    ///
    /// # Safety
    /// As [`crate::PermuteScratch::in_cuda_memory`]; without `clear_status`, as
    /// [`crate::PermuteScratch::reopen_cuda_memory`].
    pub(crate) unsafe fn in_memory(
        config: &ScratchConfig,
        device: Arc<CudaDevice>,
        address: u64,
        bytes: usize,
        stream: &Stream<'_>,
        clear_status: bool,
    ) -> Result<Self> {
        let carving = Carving::of(config)?;
        let layout = carving.layout();
        if bytes < layout.bytes {
            return Err(MoeError::Shape {
                tensor: "scratch memory",
                len: bytes,
                expected: format!("at least {} bytes for this configuration", layout.bytes),
            });
        }
        if address % layout.alignment as u64 != 0 || address == 0 {
            return Err(MoeError::MemoryAlignment {
                what: "scratch memory",
                address,
                alignment: layout.alignment,
            });
        }
        if !device.same_context(stream.device()) {
            return Err(foreign(&device, stream));
        }
        if clear_status {
            // SAFETY: the status block lies in the caller's region (checked above),
            // which the caller guarantees is valid and the scratch's; ordered on
            // `stream`.
            unsafe { clear_async(address + carving.status.offset as u64, stream)? };
        }
        Self::with_memory(
            device,
            Memory::Caller { address },
            carving,
            Some(stream.id()),
        )
    }

    fn with_memory(
        device: Arc<CudaDevice>,
        memory: Memory,
        carving: Carving,
        bound: Option<StreamId>,
    ) -> Result<Self> {
        // No driver call here: the allocating baseline builds a scratch inside graph
        // captures.
        Ok(Self {
            device,
            memory,
            carving,
            bound,
            handoff: None,
            checked: false,
        })
    }

    /// Bytes of device memory the scratch uses.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.carving.total
    }

    fn base(&self) -> u64 {
        match &self.memory {
            Memory::Owned(memory) => memory.address(),
            Memory::Caller { address } => *address,
        }
    }

    /// The address of a buffer, chosen from the carving (`|c| c.permuted_idx`).
    pub(crate) fn address(&self, region: fn(&Carving) -> Region) -> u64 {
        self.base() + region(&self.carving).offset as u64
    }

    /// Starts a call on `stream`: the scratch's own device and stream (binding a new
    /// scratch to it). Returns the binding the call's output views get.
    pub(crate) fn enter(&mut self, stream: &Stream<'_>) -> Result<Binding> {
        if !self.device.same_context(stream.device()) {
            return Err(foreign(&self.device, stream));
        }
        match self.bound {
            Some(bound) if bound != stream.id() => Err(ScratchMismatch::Stream {
                bound,
                call: stream.id(),
            }
            .into()),
            _ => {
                self.bound = Some(stream.id());
                Ok(Binding::stream(stream.id()))
            }
        }
    }

    /// The status block, bound like the call's outputs.
    pub(crate) fn status(&self, binding: Binding) -> DeviceStatus<'_> {
        DeviceStatus::from_parts(
            self.address(|c| c.status),
            self.device.ordinal(),
            binding,
            self.checked,
        )
    }

    /// The stream the scratch is bound to.
    pub(crate) fn bound_stream(&self) -> Option<StreamId> {
        self.bound
    }

    /// The status block for the stream the scratch is bound to, if it ran a call.
    pub(crate) fn bound_status(&self) -> DeviceStatus<'_> {
        let binding = self.bound.map_or(Binding::ANY_STREAM, Binding::stream);
        self.status(binding)
    }

    /// Moves the scratch from its stream `from` to `to`, which waits (on the device)
    /// for what `from` has queued.
    pub(crate) fn switch_stream(&mut self, from: &Stream<'_>, to: &Stream<'_>) -> Result<()> {
        for stream in [from, to] {
            if !self.device.same_context(stream.device()) {
                return Err(foreign(&self.device, stream));
            }
        }
        if let Some(bound) = self.bound
            && bound != from.id()
        {
            return Err(ScratchMismatch::Stream {
                bound,
                call: from.id(),
            }
            .into());
        }
        self.device.bind_to_thread()?;
        let handoff = match &self.handoff {
            Some(event) => event.cu_event(),
            None => {
                let event = self
                    .device
                    .context()
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .map_err(driver_error("create an event"))?;
                self.handoff.insert(event).cu_event()
            }
        };
        // SAFETY: the event is the scratch's; both streams are valid (the Stream
        // constructors' contract) and of this context (checked above).
        unsafe {
            cudarc::driver::result::event::record(handoff, from.cu_stream())
                .map_err(driver_error("record an event"))?;
            cudarc::driver::result::stream::wait_event(
                to.cu_stream(),
                handoff,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(driver_error("make a stream wait for an event"))?;
        }
        self.bound = Some(to.id());
        Ok(())
    }

    /// Binds the scratch to `to` with no ordering of its own.
    ///
    /// # Safety
    /// As [`crate::PermuteScratch::assume_stream`].
    pub(crate) unsafe fn assume_stream(&mut self, to: &Stream<'_>) -> Result<()> {
        if !self.device.same_context(to.device()) {
            return Err(foreign(&self.device, to));
        }
        self.bound = Some(to.id());
        Ok(())
    }
}

fn foreign(device: &CudaDevice, stream: &Stream<'_>) -> MoeError {
    MoeError::ForeignStream {
        device: device.device(),
        stream_device: stream.device().device(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device};

    /// The published offsets are where the carving puts the buffers: aligned, inside
    /// the region, and each with room for its buffer before the next one starts.
    #[test]
    fn layout_offsets_name_disjoint_aligned_buffers() {
        for (tokens, topk, experts, local, hidden, block) in [
            (1, 1, 1, 1, 16, 1),
            (37, 8, 256, 32, 7168, 64),
            (513, 2, 8, 8, 4096, 16),
        ] {
            let config = ScratchConfig::new(tokens, topk, experts, local, Device::Cuda(0))
                .with_rows(hidden, DType::BF16)
                .with_scale_columns(3)
                .with_align_block_size(block);
            let layout = Carving::of(&config).unwrap().layout();
            let entries = tokens * topk;
            let padded = max_padded_rows(entries, local, block);
            let o = layout.offsets;
            let mut buffers = [
                (o.status, STATUS_BYTES),
                (o.expert_first_token_offset, (local + 1) * 8),
                (o.permuted_idx, entries * 4),
                (o.inv_permuted_idx, entries * 4),
                (o.permuted_hidden_states, entries * hidden * 2),
                (o.permuted_scales, entries * 3 * 4),
                (o.sorted_ids, padded * 4),
                (o.block_expert_ids, padded.div_ceil(block) * 4),
                (o.num_rows_post_padded, 4),
            ];
            buffers.sort();
            for pair in buffers.windows(2) {
                assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{buffers:?}");
            }
            for (offset, bytes) in buffers {
                assert_eq!(offset % layout.alignment, 0);
                assert!(offset + bytes <= layout.bytes);
            }
        }
    }
}
