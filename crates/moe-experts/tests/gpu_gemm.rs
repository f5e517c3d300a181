//! The grouped expert GEMMs (the project's tensor-core kernels) against an f32 CPU
//! GEMM of the same bf16 values, on random shapes: empty experts, one-row experts,
//! ragged row tiles, `N` and `K` that are not multiples of the tiles, offsets that
//! stop before the buffer's end.
//!
//! Without a GPU every test prints why and passes; with `MOE_REQUIRE_GPU=1` a missing
//! GPU fails them.

use half::bf16;
use moe_experts::ExpertsError;
use moe_experts::cuda::{
    GemmEpilogue, GroupedGemmOperands, GroupedGemmShape, RowTiles, grouped_gemm,
    split_workspace_len,
};
use moe_runtime::cuda::DeviceBuffer;

mod support;
use support::gpu;

/// xorshift values in `[-1, 1)`.
fn values(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn random_bf16(len: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut v = values(seed);
    (0..len).map(|_| bf16::from_f32(v() * scale)).collect()
}

/// `sum_k a[r, k] * b[j, k]` in f64.
fn dot(a: &[bf16], b: &[bf16]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

/// What the kernels compute, on the CPU: rows past the valid count keep `sentinel`.
fn reference(
    epilogue: GemmEpilogue,
    counts: &[usize],
    (max_rows, n, k): (usize, usize, usize),
    a: &[bf16],
    b: &[bf16],
    sentinel: bf16,
) -> Vec<f32> {
    let mut c = vec![sentinel.to_f32(); max_rows * n];
    let weight_rows = match epilogue {
        GemmEpilogue::Plain => n,
        GemmEpilogue::SiluMul => 2 * n,
    };
    let mut row = 0;
    for (e, &count) in counts.iter().enumerate() {
        let w = &b[e * weight_rows * k..][..weight_rows * k];
        for r in row..row + count {
            let x = &a[r * k..][..k];
            for j in 0..n {
                c[r * n + j] = match epilogue {
                    GemmEpilogue::Plain => dot(x, &w[j * k..][..k]) as f32,
                    GemmEpilogue::SiluMul => {
                        let g = bf16::from_f64(dot(x, &w[j * k..][..k])).to_f32();
                        let u = bf16::from_f64(dot(x, &w[(n + j) * k..][..k])).to_f32();
                        g / (1.0 + (-g).exp()) * u
                    }
                };
            }
        }
        row += count;
    }
    c
}

#[test]
fn the_grouped_gemms_compute_each_experts_rows_as_the_cpu_does() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let sentinel = bf16::from_f32(12345.0);
    // (rows of each expert, spare rows past the valid count, N, K)
    let cases: Vec<(Vec<usize>, usize, usize, usize)> = vec![
        (vec![1], 0, 64, 64),
        (vec![0, 1, 0, 2, 0], 3, 128, 32),
        (vec![63, 64, 65, 1, 0, 130], 5, 200, 72),
        (vec![5; 40], 0, 136, 256),
        (vec![0, 0, 0], 4, 64, 64),
        (vec![300, 0, 7], 0, 768, 2048),
        ((0..128).map(|e| (e * 37 + 11) % 9).collect(), 17, 96, 128),
    ];
    for (case, (counts, spare, n, k)) in cases.into_iter().enumerate() {
        let valid: usize = counts.iter().sum();
        let max_rows = valid + spare;
        let mut offsets = vec![0i64];
        for &count in &counts {
            offsets.push(offsets.last().unwrap() + count as i64);
        }
        let a = random_bf16(max_rows * k, 1.0, 10 + case as u64);
        for (epilogue, splits) in [
            (GemmEpilogue::Plain, 1),
            (GemmEpilogue::SiluMul, 1),
            (GemmEpilogue::Plain, 3),
            (GemmEpilogue::SiluMul, 5),
        ] {
            let weight_rows = if epilogue == GemmEpilogue::Plain {
                n
            } else {
                2 * n
            };
            let scale = 2.0 / (k as f32).sqrt();
            let b = random_bf16(counts.len() * weight_rows * k, scale, 100 + case as u64);
            let want = reference(epilogue, &counts, (max_rows, n, k), &a, &b, sentinel);
            let d_a = DeviceBuffer::from_host(&device, &a).unwrap();
            let d_b = DeviceBuffer::from_host(&device, &b).unwrap();
            let d_offsets = DeviceBuffer::from_host(&device, &offsets).unwrap();
            let mut d_c =
                DeviceBuffer::from_host(&device, &vec![sentinel; (max_rows * n).max(1)]).unwrap();
            let shape = GroupedGemmShape {
                max_rows,
                n,
                k,
                splits,
            };
            // Partial sums start as NaN: a slice the kernels forgot to write would show.
            let partials_len = split_workspace_len(epilogue, shape).max(1);
            let mut d_partials =
                DeviceBuffer::from_host(&device, &vec![f32::NAN; partials_len]).unwrap();
            let operands = GroupedGemmOperands {
                a: d_a.view(),
                b: d_b.view(),
                tiles: RowTiles::Offsets(d_offsets.view()),
                c: d_c.view_mut(),
                partials: Some(d_partials.view_mut()),
            };
            grouped_gemm(&stream, epilogue, shape, operands).unwrap();
            let got = d_c.view().to_host(&stream).unwrap();
            let mut worst = 0f32;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let g = g.to_f32();
                // One rounding to bf16 (2^-9), the f32 sum's order, and for the gated
                // kernel a gate or up value that rounds to the neighbouring bf16.
                let tolerance = w.abs() * (1.0 / 64.0) + 2e-3;
                let error = (g - w).abs();
                assert!(
                    error <= tolerance,
                    "case {case} {epilogue:?} splits {splits}: element {i} (row {}, column {}) is {g}, want {w}",
                    i / n,
                    i % n
                );
                worst = worst.max(error / w.abs().max(1e-2));
            }
            let nonzero = got[..valid * n]
                .iter()
                .filter(|x| x.to_f32() != 0.0)
                .count();
            assert!(
                valid == 0 || nonzero * 2 > valid * n,
                "case {case} {epilogue:?}: the output is mostly zeros"
            );
            eprintln!(
                "case {case} {epilogue:?} splits {splits}: {} experts, {valid} rows, N {n}, K {k}: worst relative error {worst:.2e}",
                counts.len()
            );
        }
    }
}

#[test]
fn the_grouped_gemm_refuses_what_it_cannot_compute() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let a = DeviceBuffer::<bf16>::zeros(&device, 4 * 64).unwrap();
    let b = DeviceBuffer::<bf16>::zeros(&device, 2 * 64 * 64).unwrap();
    let offsets = DeviceBuffer::from_host(&device, &[0i64, 2, 4]).unwrap();
    let mut c = DeviceBuffer::<bf16>::zeros(&device, 4 * 64).unwrap();
    let mut call = |shape: GroupedGemmShape, epilogue| {
        let operands = GroupedGemmOperands {
            a: a.view(),
            b: b.view(),
            tiles: RowTiles::Offsets(offsets.view()),
            c: c.view_mut(),
            partials: None,
        };
        grouped_gemm(&stream, epilogue, shape, operands)
    };
    let shape = GroupedGemmShape {
        max_rows: 4,
        n: 64,
        k: 64,
        splits: 1,
    };
    call(shape, GemmEpilogue::Plain).unwrap();
    // N or K not a multiple of 8.
    for (n, k) in [(60, 64), (64, 60), (0, 64)] {
        let error = call(GroupedGemmShape { n, k, ..shape }, GemmEpilogue::Plain).unwrap_err();
        assert!(matches!(error, ExpertsError::Config(_)), "{error}");
    }
    // Weights for another number of experts (the gated kernel reads 2N rows each).
    let error = call(shape, GemmEpilogue::SiluMul).unwrap_err();
    assert!(
        matches!(error, ExpertsError::Shape { tensor: "b", .. }),
        "{error}"
    );
    // More rows than a holds.
    let error = call(
        GroupedGemmShape {
            max_rows: 5,
            ..shape
        },
        GemmEpilogue::Plain,
    )
    .unwrap_err();
    assert!(
        matches!(error, ExpertsError::Shape { tensor: "a", .. }),
        "{error}"
    );
}
