//! The one place kernels are launched: every kernel launch of the workspace goes
//! through [`launch`], the permute runtime's and the MoE block's alike.

use std::ffi::c_void;
use std::ptr::null_mut;

use cudarc::driver::sys;

use moe_kernels::kernels::{IdWidth, Kernel};
use moe_kernels::{KernelParams, ROUTE_CHUNK, ROUTE_THREADS, RouteParams};

use super::device::{Stream, driver_error};
use crate::{MoeError, Result};

/// A kernel's grid: `blocks` blocks of `threads` threads, in x only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Blocks in the grid; 0 launches nothing.
    pub blocks: u32,
    /// Threads in each block.
    pub threads: u32,
}

/// Queues `kernel` on `stream` with its parameter block; nothing when the grid is
/// empty. Allocates nothing and never waits for the device (a call can be captured
/// in a CUDA graph).
///
/// A parameter block of another kind than the kernel takes is an error, not a launch.
///
/// # Safety
/// - every device address in `params` points to memory of the stream's device, of
///   the sizes and alignment `kernel` reads and writes for the dimensions in `params`
///   and `grid` (the grid the kernel is written for);
/// - that memory stays allocated until the kernel has run, and no other work touches
///   it meanwhile unless ordered with `stream` (same stream, or events).
pub unsafe fn launch<P: KernelParams>(
    stream: &Stream<'_>,
    kernel: Kernel,
    grid: Grid,
    params: &P,
) -> Result<()> {
    if kernel.params() != P::KIND {
        return Err(MoeError::KernelParams {
            kernel: kernel.name(),
            expected: kernel.params(),
            got: P::KIND,
        });
    }
    if grid.blocks == 0 {
        return Ok(());
    }
    let device = stream.device();
    device.bind_to_thread()?;
    // The kernel copies the block from this address when the launch is queued.
    let mut args = [params as *const P as *mut c_void];
    let function = device.function(kernel).cu_function();
    let shared = kernel.dynamic_shared_bytes();
    if device.kernel_module().overlaps_launches() {
        // The Hopper module's kernels wait for the grid before them first thing
        // (`griddepcontrol.wait`), so this launch may begin while that grid ends
        // (programmatic stream serialization); its results are still seen whole.
        let mut overlap = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.blocks,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: grid.threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: stream.cu_stream(),
            attrs: &mut overlap,
            numAttrs: 1,
        };
        // SAFETY: as below; `config` and the attribute it points to outlive the call,
        // which copies them.
        unsafe { sys::cuLaunchKernelEx(&config, function, args.as_mut_ptr(), null_mut()) }.result()
    } else {
        // The plain launch, not `cuLaunchKernelEx` with no attribute: that entry point
        // is CUDA 11.8's, and a driver without it would fail at the call; the sm_90
        // module's devices need a newer driver anyway.
        // SAFETY: `params` is the `#[repr(C)]` block `kernel` takes by value (checked
        // above: one definition in moe-kernels); the caller guarantees the memory it
        // addresses and the ordering; the function is of the stream's context.
        unsafe {
            cudarc::driver::result::launch_kernel(
                function,
                (grid.blocks, 1, 1),
                (grid.threads, 1, 1),
                shared,
                stream.cu_stream(),
                &mut args,
            )
        }
    }
    .map_err(driver_error("launch a kernel"))
}

/// Entries up to which one block routes a whole permute, in one launch. Measured on an
/// H200 with overlapped launches (docs/benchmarks.md): from 1025 to 2048 entries the
/// multi-block path (count, place) took 0.77-0.95x one block's time, whose serial work
/// grows with the entries (a block ranks about 1000 entries a microsecond).
pub const SINGLE_BLOCK_ENTRIES: u32 = 1024;
/// The same for align, whose multi-block path is three launches (count, scan, place).
pub const ALIGN_SINGLE_BLOCK_ENTRIES: u32 = 2048;
/// Entries per block of a permute's multi-block path up to [`SMALL_CHUNK_ENTRIES`]:
/// more blocks for a few thousand entries.
pub const SMALL_CHUNK: u32 = 512;
/// Entries up to which a permute's chunks are [`SMALL_CHUNK`] long (16 of them).
pub const SMALL_CHUNK_ENTRIES: u32 = 16 * SMALL_CHUNK;
/// Entries per block of the multi-block path above [`SMALL_CHUNK_ENTRIES`], and of
/// align's: fewer chunks for `route_scan` to walk. At most [`ROUTE_CHUNK`] (the
/// kernels' 16-bit per-warp counts).
pub const MULTI_BLOCK_CHUNK: u32 = 1024;
const _: () = assert!(
    MULTI_BLOCK_CHUNK <= ROUTE_CHUNK
        && ALIGN_SINGLE_BLOCK_ENTRIES <= ROUTE_CHUNK
        && SINGLE_BLOCK_ENTRIES <= SMALL_CHUNK_ENTRIES
);

/// How `entries` are cut into routing blocks: `(chunk_entries, num_chunks)`. One
/// block does all when there are few (also for none: it still writes offsets).
pub(crate) fn route_chunks(entries: u32, align: bool) -> (u32, u32) {
    let single = if align {
        ALIGN_SINGLE_BLOCK_ENTRIES
    } else {
        SINGLE_BLOCK_ENTRIES
    };
    if entries <= single {
        (entries, 1)
    } else if !align && entries <= SMALL_CHUNK_ENTRIES {
        (SMALL_CHUNK, entries.div_ceil(SMALL_CHUNK))
    } else {
        (MULTI_BLOCK_CHUNK, entries.div_ceil(MULTI_BLOCK_CHUNK))
    }
}

/// The most chunks a permute or an align of at most `entries` entries is cut into: what
/// a scratch's chunk counts must hold. Not simply the chunks of `entries`, as chunks
/// grow from [`SMALL_CHUNK`] to [`MULTI_BLOCK_CHUNK`] past [`SMALL_CHUNK_ENTRIES`].
pub(crate) fn max_route_chunks(entries: u32) -> u32 {
    let small = route_chunks(entries.min(SMALL_CHUNK_ENTRIES), false).1;
    small
        .max(route_chunks(entries, false).1)
        .max(route_chunks(entries, true).1)
}

/// Entries up to which permute's placing blocks scan the chunks' counts themselves
/// (`route_place_scan_*`, one launch fewer): 16 chunks, a few thousand counts for a
/// block to read. Beyond, and for align, `route_scan` does it once.
pub const SCAN_IN_PLACE_ENTRIES: u32 = 16 * MULTI_BLOCK_CHUNK;

/// Routing launches of a permute of `entries` entries: the counting sort is one
/// launch when one block holds every entry, two (count, place) up to
/// [`SCAN_IN_PLACE_ENTRIES`], else three (count, scan, place). align takes three
/// whenever it takes more than one.
pub const fn route_launches(entries: u32) -> u32 {
    if entries <= SINGLE_BLOCK_ENTRIES {
        1
    } else if entries <= SCAN_IN_PLACE_ENTRIES {
        2
    } else {
        3
    }
}

/// The counting sort of a validated call.
///
/// # Safety
/// As [`launch`] for `params` (the scratch's buffers, sized for the call).
pub(super) unsafe fn route(
    stream: &Stream<'_>,
    params: &RouteParams,
    align: bool,
    ids: IdWidth,
) -> Result<()> {
    let grid = |blocks| Grid {
        blocks,
        threads: ROUTE_THREADS,
    };
    // SAFETY: as the caller guarantees; each kernel's grid is the one it is written
    // for (a block per chunk, one block for the scan).
    unsafe {
        if params.num_chunks > 1 {
            let count = Kernel::route_count(align, ids);
            launch(stream, count, grid(params.num_chunks), params)?;
            if !align && params.dims.num_entries() <= SCAN_IN_PLACE_ENTRIES {
                let place = Kernel::route_place_scan(ids);
                return launch(stream, place, grid(params.num_chunks), params);
            }
            launch(stream, Kernel::route_scan(align), grid(1), params)?;
        }
        let place = Kernel::route_place(align, ids);
        launch(stream, place, grid(params.num_chunks), params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_block_routes_small_calls_and_chunks_cover_large_ones() {
        for align in [false, true] {
            assert_eq!(route_chunks(0, align), (0, 1));
            for entries in 1..=40_000 {
                let (chunk, count) = route_chunks(entries, align);
                assert!(
                    chunk <= ROUTE_CHUNK && chunk * count >= entries,
                    "{entries}"
                );
                assert!(chunk * (count - 1) < entries, "{entries}: an empty chunk");
                assert!(count <= max_route_chunks(entries), "{entries}");
                // The scratch of a larger call holds the chunks of every smaller one.
                assert!(max_route_chunks(entries) >= max_route_chunks(entries - 1));
            }
        }
        assert_eq!(
            route_chunks(SINGLE_BLOCK_ENTRIES, false),
            (SINGLE_BLOCK_ENTRIES, 1)
        );
        assert_eq!(
            route_chunks(SINGLE_BLOCK_ENTRIES + 1, false),
            (SMALL_CHUNK, 3)
        );
        assert_eq!(route_chunks(SMALL_CHUNK_ENTRIES, false), (SMALL_CHUNK, 16));
        assert_eq!(
            route_chunks(SMALL_CHUNK_ENTRIES + 1, false),
            (MULTI_BLOCK_CHUNK, 9)
        );
        assert_eq!(max_route_chunks(SMALL_CHUNK_ENTRIES + 1), 16);
        assert_eq!(
            route_chunks(ALIGN_SINGLE_BLOCK_ENTRIES, true),
            (ALIGN_SINGLE_BLOCK_ENTRIES, 1)
        );
        assert_eq!(
            route_chunks(ALIGN_SINGLE_BLOCK_ENTRIES + 1, true),
            (MULTI_BLOCK_CHUNK, 3)
        );
        assert_eq!(route_launches(SINGLE_BLOCK_ENTRIES), 1);
        assert_eq!(route_launches(SINGLE_BLOCK_ENTRIES + 1), 2);
        assert_eq!(route_launches(SCAN_IN_PLACE_ENTRIES), 2);
        assert_eq!(route_launches(SCAN_IN_PLACE_ENTRIES + 1), 3);
    }
}
