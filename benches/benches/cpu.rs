//! CPU permute and unpermute, with a reused scratch against allocating every call,
//! next to this machine's memory copy bandwidth measured the same way.
//!
//! Shapes: Mixtral-like (H 4096, E 8, K 2) and DeepSeek-V3-like (H 7168, E 256, K 8),
//! bf16 activations, N = 1, 64, 1024 tokens, each token choosing K distinct experts
//! uniformly. Throughput counts the bytes that must move (`2*H*(1+K)` a token: each
//! source row read once and written K times for permute; K rows read and one written
//! for unpermute), the model `docs/benchmarks.md` and the anchor figures use.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moe_runtime::cpu::{self, PermuteInput, UnpermuteInput};
use moe_runtime::{DType, Device, PermuteScratch, Rows, ScratchConfig, TopkIds, bf16};
use rayon::prelude::*;

struct Shape {
    name: &'static str,
    hidden_size: usize,
    num_experts: usize,
    topk: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "mixtral",
        hidden_size: 4096,
        num_experts: 8,
        topk: 2,
    },
    Shape {
        name: "dsv3",
        hidden_size: 7168,
        num_experts: 256,
        topk: 8,
    },
];

const TOKENS: [usize; 3] = [1, 64, 1024];

/// xorshift64*: inputs are random and reproducible, never zeros.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn normalish(&mut self) -> f32 {
        // Sum of uniforms: cheap, centred, unit-ish spread.
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0
    }
}

struct Inputs {
    hidden: Vec<bf16>,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

fn inputs(shape: &Shape, num_tokens: usize, rng: &mut Rng) -> Inputs {
    let mut ids = Vec::with_capacity(num_tokens * shape.topk);
    for _ in 0..num_tokens {
        let first = ids.len();
        while ids.len() < first + shape.topk {
            let id = (rng.next() % shape.num_experts as u64) as i32;
            if !ids[first..].contains(&id) {
                ids.push(id);
            }
        }
    }
    Inputs {
        hidden: (0..num_tokens * shape.hidden_size)
            .map(|_| bf16::from_f32(rng.normalish()))
            .collect(),
        ids,
        weights: (0..num_tokens * shape.topk)
            .map(|_| rng.normalish().abs())
            .collect(),
    }
}

/// Bytes permute or unpermute must move for `num_tokens` bf16 tokens.
fn bytes_moved(shape: &Shape, num_tokens: usize) -> u64 {
    (2 * shape.hidden_size * (1 + shape.topk) * num_tokens) as u64
}

fn permute(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut group = c.benchmark_group("permute");
    for shape in &SHAPES {
        for &n in &TOKENS {
            let x = inputs(shape, n, &mut rng);
            let input = PermuteInput::new(
                Rows::new(&x.hidden, shape.hidden_size).unwrap(),
                TopkIds::new(&x.ids, shape.topk).unwrap(),
            );
            let config = ScratchConfig::new(
                n,
                shape.topk,
                shape.num_experts,
                shape.num_experts,
                Device::Cpu,
            )
            .with_rows(shape.hidden_size, DType::BF16);
            let mut scratch = PermuteScratch::new(config).unwrap();
            group.throughput(Throughput::Bytes(bytes_moved(shape, n)));
            let id = format!("{}/bf16/n{n}", shape.name);
            group.bench_function(BenchmarkId::new("scratch", &id), |b| {
                b.iter(|| {
                    let out = cpu::permute(&mut scratch, black_box(&input)).unwrap();
                    black_box(out.num_valid_rows());
                })
            });
            group.bench_function(BenchmarkId::new("alloc", &id), |b| {
                b.iter(|| {
                    let owned = cpu::allocating::permute(
                        black_box(&input),
                        shape.num_experts,
                        shape.num_experts,
                    )
                    .unwrap();
                    black_box(owned.output().unwrap().num_valid_rows());
                })
            });
        }
    }
    group.finish();
}

fn unpermute(c: &mut Criterion) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut group = c.benchmark_group("unpermute");
    for shape in &SHAPES {
        for &n in &TOKENS {
            let x = inputs(shape, n, &mut rng);
            let input = PermuteInput::new(
                Rows::new(&x.hidden, shape.hidden_size).unwrap(),
                TopkIds::new(&x.ids, shape.topk).unwrap(),
            );
            let owned =
                cpu::allocating::permute(&input, shape.num_experts, shape.num_experts).unwrap();
            let routed = owned.output().unwrap();
            // Expert outputs: the permuted rows stand in for them.
            let unpermute = UnpermuteInput {
                permuted_hidden_states: routed.permuted_hidden_states.as_slice::<bf16>().unwrap(),
                hidden_size: shape.hidden_size,
                inv_permuted_idx: routed.inv_permuted_idx,
                expert_first_token_offset: routed.expert_first_token_offset,
                topk_weights: &x.weights,
                topk: shape.topk,
            };
            let mut out = vec![bf16::ZERO; n * shape.hidden_size];
            group.throughput(Throughput::Bytes(bytes_moved(shape, n)));
            let id = format!("{}/bf16/n{n}", shape.name);
            group.bench_function(BenchmarkId::new("reused", &id), |b| {
                b.iter(|| cpu::unpermute_into(black_box(&unpermute), &mut out).unwrap())
            });
            group.bench_function(BenchmarkId::new("alloc", &id), |b| {
                b.iter(|| black_box(cpu::allocating::unpermute(black_box(&unpermute)).unwrap()))
            });
        }
    }
    group.finish();
}

/// The machine's copy bandwidth, as a ceiling for the figures above: the largest
/// permute's output size, copied by one thread and by the rayon pool.
fn copy(c: &mut Criterion) {
    let bytes = SHAPES[1].hidden_size * 2 * SHAPES[1].topk * TOKENS[2];
    let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; bytes];
    let mut group = c.benchmark_group("copy");
    group.throughput(Throughput::Bytes(2 * bytes as u64));
    let id = format!("{}MiB", bytes >> 20);
    group.bench_function(BenchmarkId::new("one-thread", &id), |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    group.bench_function(BenchmarkId::new("rayon", &id), |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 20)
                .zip(black_box(&src).par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = permute, unpermute, copy
}
criterion_main!(benches);
