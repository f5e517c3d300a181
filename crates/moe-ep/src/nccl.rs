//! NCCL through cudarc's bindings, loaded at run time like the driver: the unique id a
//! launcher hands every rank, and a communicator whose operations take the runtime's
//! device views and run on the caller's stream.

use std::ffi::{CStr, c_int, c_void};
use std::sync::{Arc, Mutex};

use cudarc::nccl::sys;
use half::bf16;
use moe_runtime::cuda::{CudaDevice, DeviceView, DeviceViewMut, Stream};

use crate::{EpError, Result};

/// The NCCL version the bindings are built for (cudarc's `nccl-02028`), as NCCL
/// encodes versions: `major * 10000 + minor * 100 + patch`.
pub const BUILT_FOR: c_int = 2_28_00;

fn version_text(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

/// Makes sure NCCL can be loaded and is not older than [`BUILT_FOR`]: a typed error
/// where cudarc's loader would panic.
pub fn check_library() -> Result<String> {
    // SAFETY: only tries to open the library by its candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(EpError::NcclNotFound {
            searched: cudarc::get_lib_name_candidates("nccl"),
        });
    }
    let mut version: c_int = 0;
    // SAFETY: the library is present (checked); writes one int.
    check("read NCCL's version", unsafe {
        sys::ncclGetVersion(&mut version)
    })?;
    if version < BUILT_FOR {
        return Err(EpError::NcclTooOld {
            loaded: version_text(version),
            built: version_text(BUILT_FOR),
        });
    }
    Ok(version_text(version))
}

/// An NCCL result as the crate's error.
fn check(action: &'static str, result: sys::ncclResult_t) -> Result<()> {
    if result == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: NCCL returns a static, NUL-terminated string for any result code.
    let message = unsafe { CStr::from_ptr(sys::ncclGetErrorString(result)) }
        .to_string_lossy()
        .into_owned();
    Err(EpError::Nccl {
        action,
        code: format!("{result:?}"),
        message,
    })
}

/// The id every rank of one communicator starts from: made once (by rank 0 or the
/// launcher) and passed to every process, as text with [`Self::to_hex`].
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new id (NCCL opens its bootstrap socket here).
    pub fn new() -> Result<Self> {
        check_library()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: the library is present (checked); writes one id.
        check("make a unique id", unsafe { sys::ncclGetUniqueId(&mut id) })?;
        Ok(Self(id))
    }

    /// The id's 128 bytes as 256 hex digits.
    pub fn to_hex(&self) -> String {
        self.0
            .internal
            .iter()
            .map(|&byte| format!("{:02x}", byte as u8))
            .collect()
    }

    /// The id from [`Self::to_hex`]'s text.
    pub fn from_hex(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = || EpError::Shape(format!("an NCCL id is 256 hex digits, not {text:?}"));
        if text.len() != 256 || !text.is_ascii() {
            return Err(bad());
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (byte, pair) in id.internal.iter_mut().zip(text.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())? as _;
        }
        Ok(Self(id))
    }
}

/// The element types the exchange moves.
pub trait NcclElement: moe_runtime::cuda::DeviceRepr + sealed::Sealed {
    /// NCCL's name for it.
    const TYPE: sys::ncclDataType_t;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u8 {}
}
impl NcclElement for bf16 {
    const TYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclBfloat16;
}
impl NcclElement for f32 {
    const TYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
}
impl NcclElement for i32 {
    const TYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclInt32;
}
impl NcclElement for i64 {
    const TYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclInt64;
}
/// Rows of any type travel as bytes.
impl NcclElement for u8 {
    const TYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;
}

/// An NCCL communicator handle; NCCL lets one thread at a time queue on it.
#[derive(Debug)]
struct RawComm(sys::ncclComm_t);

// SAFETY: a communicator may be used from any thread, one at a time: the `Mutex` in
// `Communicator` gives that.
unsafe impl Send for RawComm {}

/// One rank's NCCL communicator, on one GPU. Operations are queued on the caller's
/// stream and never wait for the host; like NCCL's, every rank must issue the same
/// collectives in the same order. One thread queues at a time (a lock), so the layers
/// of a model on any threads can share it.
#[derive(Debug)]
pub struct Communicator {
    comm: Mutex<RawComm>,
    rank: usize,
    world: usize,
    device: Arc<CudaDevice>,
}

/// Queues operations on a communicator while holding its lock (inside
/// [`Communicator::group`] or one operation).
#[derive(Debug)]
pub struct Queue<'a> {
    comm: sys::ncclComm_t,
    owner: &'a Communicator,
}

impl Communicator {
    /// Joins the communicator of `world` ranks made from `id`, as `rank`, on `device`.
    /// Every rank must call it (it returns once all have joined).
    pub fn new(device: Arc<CudaDevice>, id: &NcclId, rank: usize, world: usize) -> Result<Self> {
        check_library()?;
        if world == 0 || rank >= world {
            return Err(EpError::Shape(format!(
                "rank {rank} is not one of a world of {world}"
            )));
        }
        let (Ok(rank_c), Ok(world_c)) = (c_int::try_from(rank), c_int::try_from(world)) else {
            return Err(EpError::Shape(format!("a world of {world} ranks")));
        };
        device
            .context()
            .bind_to_thread()
            .map_err(|source| moe_runtime::MoeError::Driver {
                action: "make the CUDA context current",
                source,
            })?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes one communicator; `id` is a unique id from ncclGetUniqueId,
        // the device's context is current on this thread.
        check("join the communicator", unsafe {
            sys::ncclCommInitRank(&mut comm, world_c, id.0, rank_c)
        })?;
        Ok(Self {
            comm: Mutex::new(RawComm(comm)),
            rank,
            world,
            device,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The GPU this rank runs on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// Runs `queue` between `ncclGroupStart` and `ncclGroupEnd`, holding the lock, so
    /// its sends and receives proceed together (an all-to-all). The group is ended
    /// even when `queue` fails.
    pub fn group<T>(&self, queue: impl FnOnce(&Queue<'_>) -> Result<T>) -> Result<T> {
        let comm = self.lock();
        // SAFETY: no arguments.
        check("start a group", unsafe { sys::ncclGroupStart() })?;
        let queued = queue(&Queue {
            comm: comm.0,
            owner: self,
        });
        // SAFETY: closes the group opened above.
        let ended = check("end a group", unsafe { sys::ncclGroupEnd() });
        let value = queued?;
        ended?;
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RawComm> {
        // A panic while queuing leaves nothing half-changed on the host side.
        self.comm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`Queue::all_gather`] on its own.
    pub fn all_gather<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceView<'_, T>,
        gathered: DeviceViewMut<'_, T>,
    ) -> Result<()> {
        let comm = self.lock();
        Queue {
            comm: comm.0,
            owner: self,
        }
        .all_gather(stream, data, gathered)
    }

    /// [`Queue::reduce_scatter_sum`] on its own.
    pub fn reduce_scatter_sum<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceView<'_, T>,
        mine: DeviceViewMut<'_, T>,
    ) -> Result<()> {
        let comm = self.lock();
        Queue {
            comm: comm.0,
            owner: self,
        }
        .reduce_scatter_sum(stream, data, mine)
    }
}

impl Queue<'_> {
    fn stream_of(&self, stream: &Stream<'_>) -> Result<sys::cudaStream_t> {
        if stream.device().ordinal() != self.owner.device.ordinal() {
            return Err(EpError::Shape(format!(
                "the stream is on GPU {}, the communicator on GPU {}",
                stream.device().ordinal(),
                self.owner.device.ordinal()
            )));
        }
        Ok(stream.cu_stream() as sys::cudaStream_t)
    }

    /// A collective's buffers: `all` holds one `part` per rank.
    fn check_world_sized(&self, what: &str, all: usize, part: usize) -> Result<()> {
        let world = self.owner.world;
        if all != part * world {
            return Err(EpError::Shape(format!(
                "{what} of {part} elements per rank over {world} ranks, with {all} in all"
            )));
        }
        Ok(())
    }

    fn peer(&self, peer: usize) -> Result<c_int> {
        if peer >= self.owner.world {
            return Err(EpError::Shape(format!(
                "peer {peer} is not one of {} ranks",
                self.owner.world
            )));
        }
        Ok(peer as c_int)
    }

    /// Queues a send of `data` to `peer` on `stream`.
    pub fn send<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceView<'_, T>,
        peer: usize,
    ) -> Result<()> {
        let (peer, stream) = (self.peer(peer)?, self.stream_of(stream)?);
        // SAFETY: `data` is `len` elements of device memory on the communicator's GPU
        // (the stream's device, checked), alive until the stream passes this point
        // (the caller keeps its buffers across the call).
        check("queue a send", unsafe {
            sys::ncclSend(
                data.address() as *const c_void,
                data.len(),
                T::TYPE,
                peer,
                self.comm,
                stream,
            )
        })
    }

    /// Queues a receive from `peer` into `data` on `stream`; `peer` must send exactly
    /// `data.len()` elements.
    pub fn recv<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceViewMut<'_, T>,
        peer: usize,
    ) -> Result<()> {
        let (peer, stream) = (self.peer(peer)?, self.stream_of(stream)?);
        // SAFETY: as for `send`; `data` is writable.
        check("queue a receive", unsafe {
            sys::ncclRecv(
                data.address() as *mut c_void,
                data.len(),
                T::TYPE,
                peer,
                self.comm,
                stream,
            )
        })
    }

    /// Queues `gathered[r * n..][..n] = data of rank r` for every rank, `n` =
    /// `data.len()` (the same on every rank).
    pub fn all_gather<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceView<'_, T>,
        gathered: DeviceViewMut<'_, T>,
    ) -> Result<()> {
        self.check_world_sized("an all-gather", gathered.len(), data.len())?;
        let stream = self.stream_of(stream)?;
        // SAFETY: `data` holds `n` and `gathered` `world * n` elements (checked) of the
        // communicator's GPU, alive until the stream passes this point.
        check("queue an all-gather", unsafe {
            sys::ncclAllGather(
                data.address() as *const c_void,
                gathered.address() as *mut c_void,
                data.len(),
                T::TYPE,
                self.comm,
                stream,
            )
        })
    }

    /// Queues `mine = sum over ranks r of (data of rank r)[rank * n..][..n]`, `n` =
    /// `mine.len()`.
    pub fn reduce_scatter_sum<T: NcclElement>(
        &self,
        stream: &Stream<'_>,
        data: DeviceView<'_, T>,
        mine: DeviceViewMut<'_, T>,
    ) -> Result<()> {
        self.check_world_sized("a reduce-scatter", data.len(), mine.len())?;
        let stream = self.stream_of(stream)?;
        // SAFETY: `data` holds `world * n` and `mine` `n` elements (checked) of the
        // communicator's GPU, alive until the stream passes this point.
        check("queue a reduce-scatter", unsafe {
            sys::ncclReduceScatter(
                data.address() as *const c_void,
                mine.address() as *mut c_void,
                mine.len(),
                T::TYPE,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream,
            )
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is dropped once;
        // a failure here cannot be reported.
        unsafe {
            let _ = sys::ncclCommDestroy(self.lock().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_survives_its_text_and_bad_text_is_refused() {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (i, byte) in id.internal.iter_mut().enumerate() {
            *byte = (i * 37 % 256) as u8 as _;
        }
        let text = NcclId(id).to_hex();
        assert_eq!(text.len(), 256);
        let back = NcclId::from_hex(&text).unwrap();
        assert_eq!(back.0.internal, id.internal);
        assert!(NcclId::from_hex(&text[..254]).is_err());
        assert!(NcclId::from_hex(&format!("zz{}", &text[2..])).is_err());
        assert!(NcclId::from_hex(&format!("é{}", &text[2..])).is_err());
    }

    #[test]
    fn versions_read_as_nccl_writes_them() {
        assert_eq!(version_text(22803), "2.28.3");
        assert_eq!(version_text(BUILT_FOR), "2.28.0");
    }
}
