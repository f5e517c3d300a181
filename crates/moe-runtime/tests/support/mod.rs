//! What the GPU tests share: finding the GPU, a reproducible generator, random cases.
#![allow(dead_code)] // each test binary uses its own part

use std::sync::Arc;

use moe_runtime::cuda::{CudaDevice, CudaStream};

/// The GPU and a stream of it, or `None` (after saying why) when there is none and
/// none is required (`MOE_REQUIRE_GPU=1` turns the skip into a failure).
pub(crate) fn gpu() -> Option<(Arc<CudaDevice>, Arc<CudaStream>)> {
    match CudaDevice::new(0) {
        Ok(device) => {
            let stream = device.new_stream().expect("a new stream");
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

/// Random cases per test (`MOE_GPU_CASES`, default `default`; fewer under
/// compute-sanitizer).
pub(crate) fn case_count(default: usize) -> usize {
    std::env::var("MOE_GPU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: reproducible from the seed each case prints.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Roughly normal, mean 0.
    pub(crate) fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0
    }
}
