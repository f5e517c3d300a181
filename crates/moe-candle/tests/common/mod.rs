//! The devices the tests run on: candle's CPU, and with feature `cuda` the first CUDA
//! device, skipped where there is none unless `MOE_REQUIRE_GPU=1` (then a failure).

use candle_core::Device;

pub(crate) fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(cuda) => devices.push(cuda),
        Err(error) if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("MOE_REQUIRE_GPU=1 and no CUDA device: {error}")
        }
        Err(error) => eprintln!("no CUDA device, CPU only: {error}"),
    }
    #[cfg(not(feature = "cuda"))]
    if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        eprintln!("moe-candle built without feature `cuda`: its tests run on the CPU only");
    }
    devices
}

/// `[rows, cols]` f32 values uniform in `[-scale, scale)` from a xorshift seed.
#[allow(dead_code)] // not every test binary uses it
pub(crate) fn random(
    shape: (usize, usize),
    scale: f32,
    seed: u64,
    dev: &Device,
) -> candle_core::Tensor {
    let mut s = seed | 1;
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    candle_core::Tensor::from_vec(data, shape, dev).unwrap()
}

/// The first line of an error's text: candle appends a backtrace when
/// `RUST_BACKTRACE` is set.
#[allow(dead_code)]
pub(crate) fn message(error: &candle_core::Error) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Checks a block's model output `got` against a reference model's `want` (both
/// `[tokens, H]` f32): every token's relative L2 error below `tolerance`, and the
/// MoE part not negligible: `without` (the output with no MoE) is further than 20x the
/// tolerance from `want` for every token, so a token routed to other experts would
/// show. `label` names the case in a failure.
#[allow(dead_code)]
pub(crate) fn assert_matches_reference(
    got: &candle_core::Tensor,
    want: &candle_core::Tensor,
    without: &candle_core::Tensor,
    tolerance: f32,
    label: &str,
) {
    use candle_core::{D, Tensor};
    let norm = |t: &Tensor| t.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
    let errors = (norm(&(got - want).unwrap()) / norm(want))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let worst = errors.iter().cloned().fold(0f32, f32::max);
    assert!(
        worst < tolerance,
        "{label}: worst token's relative error {worst}"
    );
    let moe_share = (norm(&(without - want).unwrap()) / norm(want))
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moe_share > 20.0 * tolerance,
        "{label}: every token's MoE output matters: {moe_share}"
    );
}
