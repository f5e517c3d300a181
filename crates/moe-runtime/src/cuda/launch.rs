//! The one place kernels are launched: every `unsafe` launch of the runtime is here.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use moe_kernels::kernels::{self, IdWidth};
use moe_kernels::{ROUTE_CHUNK, ROUTE_THREADS, RouteParams};

use super::device::{CudaDevice, driver_error};
use crate::Result;

/// Launches kernel `name` with `blocks` blocks of `threads` and its parameter block.
///
/// The caller must have validated the call: every address in `params` points to
/// device memory of the sizes the kernel reads and writes for these dimensions.
pub(super) fn launch<P: DeviceRepr>(
    device: &CudaDevice,
    name: &'static str,
    blocks: u32,
    threads: u32,
    params: &P,
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let mut builder = device.stream().launch_builder(device.function(name));
    builder.arg(params);
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `params` is the `#[repr(C)]` block `name` was compiled to take (one
    // definition in moe-kernels, by value); the caller validated the call and sized
    // every buffer it addresses; the grid is the one the kernel is written for.
    unsafe { builder.launch(config) }
        .map(drop)
        .map_err(driver_error("launch a kernel"))
}

/// Entries up to which one block routes a whole call, in one launch: below this, the
/// two extra launches of the multi-block path cost more than the block's serial work
/// (measured on an H200: a block ranks about 1000 entries a microsecond).
const SINGLE_BLOCK_ENTRIES: u32 = 2048;
/// Entries per block of the multi-block path: small enough for many blocks at a few
/// thousand entries, at most [`ROUTE_CHUNK`] (the kernels' 16-bit per-warp counts).
const MULTI_BLOCK_CHUNK: u32 = 1024;
const _: () = assert!(MULTI_BLOCK_CHUNK <= ROUTE_CHUNK && SINGLE_BLOCK_ENTRIES <= ROUTE_CHUNK);

/// How `entries` are cut into routing blocks: `(chunk_entries, num_chunks)`. One
/// block does all when there are few (also for none: it still writes offsets).
pub(crate) fn route_chunks(entries: u32) -> (u32, u32) {
    if entries <= SINGLE_BLOCK_ENTRIES {
        (entries, 1)
    } else {
        (MULTI_BLOCK_CHUNK, entries.div_ceil(MULTI_BLOCK_CHUNK))
    }
}

/// The counting sort: one launch when one block holds every entry, else three.
pub(super) fn route(
    device: &CudaDevice,
    params: &RouteParams,
    align: bool,
    ids: IdWidth,
) -> Result<()> {
    if params.num_chunks > 1 {
        let count = kernels::route_count(align, ids);
        launch(device, count, params.num_chunks, ROUTE_THREADS, params)?;
        launch(device, kernels::route_scan(align), 1, ROUTE_THREADS, params)?;
    }
    let place = kernels::route_place(align, ids);
    launch(device, place, params.num_chunks, ROUTE_THREADS, params)
}
