//! What the GPU test files share.

use std::sync::Arc;

use moe_runtime::cuda::{CudaDevice, CudaStream};

/// The GPU and a stream of it, or `None` (after saying why) when there is none and
/// none is required; with `MOE_REQUIRE_GPU=1` a missing GPU panics.
pub(crate) fn gpu() -> Option<(Arc<CudaDevice>, Arc<CudaStream>)> {
    match CudaDevice::new(0) {
        Ok(device) => {
            let stream = device.new_stream().unwrap();
            Some((device, stream))
        }
        Err(error) if std::env::var("MOE_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("MOE_REQUIRE_GPU=1 but no GPU can be used: {error}")
        }
        Err(error) => {
            eprintln!("no GPU found, skipping: {error}");
            None
        }
    }
}
