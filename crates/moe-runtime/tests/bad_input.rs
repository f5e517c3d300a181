//! The bad-input matrix: every malformed call the CPU refuses, run on the CPU and, when
//! there is a GPU, on the GPU too; both must return the same `MoeError`, and that error
//! is written out here for each case. On the GPU, what only device memory shows (a
//! malformed `expert_map` entry, a negative row index, a valid count above the rows
//! given) is recorded by the kernels and returned by the status check (and, in
//! checked mode, by the call itself).
//!
//! Without a GPU the CPU half runs and the GPU half prints why it skipped; with
//! `MOE_REQUIRE_GPU=1` a missing GPU fails.

mod support;

use moe_runtime::cpu::{self, PermuteDest, PermuteInput, UnpermuteInput};
use moe_runtime::cuda::{
    self, CudaDevice, DeviceBuffer, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput,
    DeviceRows, DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceUnpermuteInput, StatusBuffer,
    Stream,
};
use moe_runtime::{
    DType, Device, MoeError, PermuteScratch, Rows, RowsMut, Scales, ScratchConfig, ScratchMismatch,
    TopkIds, bf16,
};
use support::{Rng, gpu};

const H: usize = 8;
/// 6 experts, 4 of them local.
const E: usize = 6;
const L: usize = 4;
const MAP: [i32; E] = [0, -1, 1, 2, -1, 3];

/// What a permute-side case calls.
#[derive(Clone, Debug)]
enum Op {
    Permute,
    /// Into a caller's destination of `rows` rows of `dtype`.
    PermuteInto {
        rows: usize,
        dtype: DType,
    },
    Align,
}

/// One permute, permute_into or align call, and the error it must return.
#[derive(Clone, Debug)]
struct PermuteCase {
    name: &'static str,
    /// The scratch, without its device.
    scratch: fn(Device) -> ScratchConfig,
    tokens: usize,
    topk: usize,
    /// Rows of hidden states given (normally `tokens`).
    rows: usize,
    hidden: usize,
    dtype: DType,
    map: Option<Vec<i32>>,
    scale_columns: usize,
    op: Op,
    expected: MoeError,
}

fn rows_scratch(device: Device) -> ScratchConfig {
    ScratchConfig::new(4, 2, E, L, device)
        .with_rows(H, DType::BF16)
        .with_align_block_size(16)
}

fn index_scratch(device: Device) -> ScratchConfig {
    ScratchConfig::new(4, 2, E, L, device)
}

fn base(name: &'static str, expected: MoeError) -> PermuteCase {
    PermuteCase {
        name,
        scratch: rows_scratch,
        tokens: 4,
        topk: 2,
        rows: 4,
        hidden: H,
        dtype: DType::BF16,
        map: Some(MAP.to_vec()),
        scale_columns: 0,
        op: Op::Permute,
        expected,
    }
}

fn map_entry(index: usize, value: i32) -> MoeError {
    MoeError::ExpertMapEntry {
        index,
        value,
        num_local_experts: L,
    }
}

fn permute_cases() -> Vec<PermuteCase> {
    let mismatch = MoeError::Scratch;
    let mut bad_map = MAP.to_vec();
    bad_map[3] = 4;
    let mut two_bad = MAP.to_vec();
    two_bad[5] = -3;
    two_bad[2] = 7;
    let mut first_bad = MAP.to_vec();
    first_bad[0] = -2;
    vec![
        PermuteCase {
            tokens: 5,
            rows: 5,
            ..base(
                "too many tokens",
                mismatch(ScratchMismatch::TooManyTokens {
                    num_tokens: 5,
                    max_num_tokens: 4,
                }),
            )
        },
        PermuteCase {
            topk: 3,
            tokens: 2,
            rows: 2,
            ..base(
                "another topk",
                mismatch(ScratchMismatch::Topk {
                    expected: 2,
                    got: 3,
                }),
            )
        },
        PermuteCase {
            map: Some(MAP[..5].to_vec()),
            ..base(
                "a map of the wrong length",
                mismatch(ScratchMismatch::NumExperts {
                    expected: E,
                    got: 5,
                }),
            )
        },
        PermuteCase {
            map: None,
            ..base(
                "no map with fewer local experts",
                mismatch(ScratchMismatch::MissingExpertMap {
                    num_experts: E,
                    num_local_experts: L,
                }),
            )
        },
        PermuteCase {
            map: Some(bad_map.clone()),
            ..base("a map entry past the local experts", map_entry(3, 4))
        },
        PermuteCase {
            map: Some(first_bad.clone()),
            ..base("a map entry below -1", map_entry(0, -2))
        },
        PermuteCase {
            map: Some(two_bad.clone()),
            ..base("two bad map entries: the first is named", map_entry(2, 7))
        },
        PermuteCase {
            map: Some(bad_map.clone()),
            op: Op::Align,
            ..base("align with a bad map entry", map_entry(3, 4))
        },
        PermuteCase {
            map: Some(two_bad),
            scratch: index_scratch,
            op: Op::PermuteInto {
                rows: 8,
                dtype: DType::BF16,
            },
            ..base("permute_into with a bad map", map_entry(2, 7))
        },
        PermuteCase {
            hidden: 4,
            ..base(
                "another hidden size",
                mismatch(ScratchMismatch::HiddenSize {
                    expected: H,
                    got: 4,
                }),
            )
        },
        PermuteCase {
            dtype: DType::F16,
            ..base(
                "another dtype",
                mismatch(ScratchMismatch::Dtype {
                    expected: DType::BF16,
                    got: DType::F16,
                }),
            )
        },
        PermuteCase {
            scale_columns: 2,
            ..base(
                "scales the scratch does not hold",
                mismatch(ScratchMismatch::ScaleColumns {
                    expected: 0,
                    got: 2,
                }),
            )
        },
        PermuteCase {
            rows: 3,
            ..base(
                "fewer rows than tokens",
                MoeError::Shape {
                    tensor: "hidden_states",
                    len: 3,
                    expected: "one row per token of topk_ids (4)".into(),
                },
            )
        },
        PermuteCase {
            scratch: index_scratch,
            ..base(
                "a scratch without rows",
                mismatch(ScratchMismatch::NoRowBuffer),
            )
        },
        PermuteCase {
            scratch: index_scratch,
            op: Op::Align,
            ..base(
                "align without align buffers",
                mismatch(ScratchMismatch::NoAlignBuffers),
            )
        },
        PermuteCase {
            scratch: index_scratch,
            op: Op::PermuteInto {
                rows: 7,
                dtype: DType::BF16,
            },
            ..base(
                "a destination too small",
                MoeError::Shape {
                    tensor: "permuted_hidden_states",
                    len: 7 * H,
                    expected: format!("at least N*K = 8 rows of {H}"),
                },
            )
        },
        PermuteCase {
            scratch: index_scratch,
            op: Op::PermuteInto {
                rows: 8,
                dtype: DType::F32,
            },
            ..base(
                "a destination of another dtype",
                MoeError::Dtype {
                    tensor: "permuted_hidden_states",
                    op: "permute",
                    expected: DType::BF16,
                    got: DType::F32,
                },
            )
        },
    ]
}

/// The host data of a case: random rows, ids (a few out of range), scales.
struct PermuteData {
    hidden: Vec<u8>,
    ids: Vec<i32>,
    scales: Vec<f32>,
    dest: Vec<u8>,
}

fn data(case: &PermuteCase, seed: u64) -> PermuteData {
    let mut rng = Rng(seed | 1);
    let dest_bytes = match case.op {
        Op::PermuteInto { rows, dtype } => rows * case.hidden * dtype.size_bytes(),
        _ => 0,
    };
    PermuteData {
        hidden: (0..case.rows * case.hidden * case.dtype.size_bytes())
            .map(|_| rng.next() as u8)
            .collect(),
        ids: (0..case.tokens * case.topk)
            .map(|_| rng.below(E + 2) as i32 - 1)
            .collect(),
        scales: (0..case.rows * case.scale_columns)
            .map(|_| rng.normal())
            .collect(),
        dest: vec![0; dest_bytes],
    }
}

fn cpu_permute(case: &PermuteCase, data: &mut PermuteData) -> Result<(), MoeError> {
    let mut scratch = PermuteScratch::new((case.scratch)(Device::Cpu))?;
    let ids = TopkIds::new(&data.ids, case.topk)?;
    let mut input = PermuteInput::new(
        Rows::from_bytes(&data.hidden, case.dtype, case.hidden)?,
        ids,
    );
    if let Some(map) = &case.map {
        input = input.with_expert_map(map);
    }
    if case.scale_columns > 0 {
        input = input.with_scales(Scales::new(&data.scales, case.scale_columns)?);
    }
    match case.op {
        Op::Permute => cpu::permute(&mut scratch, &input).map(drop),
        Op::Align => cpu::align(&mut scratch, &ids, case.map.as_deref()).map(drop),
        Op::PermuteInto { dtype, .. } => {
            let dest = PermuteDest {
                hidden_states: RowsMut::from_bytes(&mut data.dest, dtype, case.hidden)?,
                scales: None,
            };
            cpu::permute_into(&mut scratch, &input, dest).map(drop)
        }
    }
}

/// The case on the GPU: the call's own error, else the one its status block holds.
fn gpu_permute(
    case: &PermuteCase,
    data: &PermuteData,
    device: &std::sync::Arc<CudaDevice>,
    stream: &Stream<'_>,
    checked: bool,
) -> Result<(), MoeError> {
    let mut scratch =
        PermuteScratch::with_cuda_device((case.scratch)(device.device()), device.clone())?;
    scratch.set_checked(checked);
    let hidden = DeviceBuffer::from_host(device, &data.hidden)?;
    let ids = DeviceBuffer::from_host(device, &data.ids)?;
    let map = DeviceBuffer::from_host(device, case.map.as_deref().unwrap_or(&[]))?;
    let scales = DeviceBuffer::from_host(device, &data.scales)?;
    let mut dest = DeviceBuffer::from_host(device, &data.dest)?;
    let topk_ids = DeviceTopkIds::new(DeviceExpertIds::I32(ids.view()), case.topk)?;
    let mut input = DevicePermuteInput::new(
        DeviceRows::from_bytes(hidden.view(), case.dtype, case.hidden)?,
        topk_ids,
    );
    let expert_map = case.map.as_ref().map(|_| map.view());
    if let Some(map) = expert_map {
        input = input.with_expert_map(map);
    }
    if case.scale_columns > 0 {
        input = input.with_scales(DeviceScales::new(scales.view(), case.scale_columns)?);
    }
    match case.op {
        Op::Permute => cuda::permute(&mut scratch, stream, &input).map(drop)?,
        Op::Align => cuda::align(&mut scratch, stream, &topk_ids, expert_map).map(drop)?,
        Op::PermuteInto { dtype, .. } => {
            let dest = DevicePermuteDest {
                hidden_states: DeviceRowsMut::from_bytes(dest.view_mut(), dtype, case.hidden)?,
                scales: None,
            };
            cuda::permute_into(&mut scratch, stream, &input, dest).map(drop)?
        }
    }
    let status = scratch.check_status(stream);
    // Checked once, the block is clear again: the same scratch reports nothing more.
    scratch.check_status(stream)?;
    status
}

/// One unpermute call and the error it must return. Expert outputs are bf16 `[rows, H]`.
#[derive(Clone, Debug)]
struct UnpermuteCase {
    name: &'static str,
    rows: usize,
    inv: Vec<i32>,
    topk: usize,
    weights: usize,
    offsets: Vec<i64>,
    /// Output rows of `H`.
    out_rows: usize,
    expected: MoeError,
}

fn unpermute_base(name: &'static str, expected: MoeError) -> UnpermuteCase {
    UnpermuteCase {
        name,
        rows: 4,
        inv: vec![0, 1, 2, 3],
        topk: 2,
        weights: 4,
        offsets: vec![0, 2, 4],
        out_rows: 2,
        expected,
    }
}

fn index_error(tensor: &'static str, position: usize, value: i64, bound: String) -> MoeError {
    MoeError::IndexOutOfRange {
        tensor,
        position,
        value,
        bound,
    }
}

fn unpermute_cases() -> Vec<UnpermuteCase> {
    let valid_bound = |rows| format!("the valid count must be in 0..={rows}, the rows given");
    let negative = || "rows are never negative".to_string();
    vec![
        UnpermuteCase {
            offsets: vec![0, 2, 5],
            ..unpermute_base(
                "a valid count above the rows given",
                index_error("expert_first_token_offset", 2, 5, valid_bound(4)),
            )
        },
        UnpermuteCase {
            offsets: vec![0, 2, -1],
            ..unpermute_base(
                "a negative valid count",
                index_error("expert_first_token_offset", 2, -1, valid_bound(4)),
            )
        },
        UnpermuteCase {
            inv: vec![0, 1, 2, -4],
            ..unpermute_base(
                "a negative row index",
                index_error("inv_permuted_idx", 3, -4, negative()),
            )
        },
        UnpermuteCase {
            inv: vec![0, 1, -9, 3, 4, -2],
            topk: 3,
            weights: 6,
            rows: 6,
            offsets: vec![0, 2, 6],
            ..unpermute_base(
                "two negative row indices: the first is named",
                index_error("inv_permuted_idx", 2, -9, negative()),
            )
        },
        {
            // Top-4 of 5 tokens: read by the kernel that loads a token's rows at once
            // (the other cases, top-2 or top-3, by the one that loads them in turn).
            const { assert!(moe_kernels::unpermute_reads_rows_at_once(5, 4)) };
            const { assert!(!moe_kernels::unpermute_reads_rows_at_once(2, 2)) };
            let mut inv: Vec<i32> = (0..20).collect();
            inv[13] = -3;
            inv[17] = -5;
            UnpermuteCase {
                inv,
                topk: 4,
                rows: 20,
                weights: 20,
                offsets: vec![0, 8, 20],
                out_rows: 5,
                ..unpermute_base(
                    "a negative row index, four choices a token",
                    index_error("inv_permuted_idx", 13, -3, negative()),
                )
            }
        },
        UnpermuteCase {
            inv: vec![-1, 1, 2, 3],
            offsets: vec![0, 2, 7],
            ..unpermute_base(
                "a bad count and a bad index: the count is checked first",
                index_error("expert_first_token_offset", 2, 7, valid_bound(4)),
            )
        },
        UnpermuteCase {
            weights: 3,
            ..unpermute_base(
                "weights of another length",
                MoeError::Shape {
                    tensor: "topk_weights",
                    len: 3,
                    expected: "N*K = 4, like inv_permuted_idx".into(),
                },
            )
        },
        UnpermuteCase {
            topk: 3,
            weights: 4,
            ..unpermute_base(
                "indices that are not whole tokens",
                MoeError::Shape {
                    tensor: "inv_permuted_idx",
                    len: 4,
                    expected: "whole tokens of topk 3 (at least 1), N*K within i32".into(),
                },
            )
        },
        UnpermuteCase {
            offsets: vec![],
            ..unpermute_base(
                "no offsets",
                MoeError::Shape {
                    tensor: "expert_first_token_offset",
                    len: 0,
                    expected: "L + 1 >= 2 offsets".into(),
                },
            )
        },
        UnpermuteCase {
            out_rows: 3,
            ..unpermute_base(
                "an output of another size",
                MoeError::Shape {
                    tensor: "output",
                    len: 3 * H,
                    expected: format!("N*H = 2*{H}"),
                },
            )
        },
    ]
}

fn expert_rows(rows: usize) -> Vec<bf16> {
    (0..rows * H)
        .map(|i| bf16::from_f32(i as f32 * 0.25 - 3.0))
        .collect()
}

fn weights(len: usize) -> Vec<f32> {
    (0..len).map(|i| 0.5 + i as f32 * 0.125).collect()
}

fn cpu_unpermute(case: &UnpermuteCase) -> Result<(), MoeError> {
    let rows = expert_rows(case.rows);
    let weights = weights(case.weights);
    let mut out = vec![bf16::ZERO; case.out_rows * H];
    let input = UnpermuteInput {
        permuted_hidden_states: &rows,
        hidden_size: H,
        inv_permuted_idx: &case.inv,
        expert_first_token_offset: &case.offsets,
        topk_weights: &weights,
        topk: case.topk,
    };
    cpu::unpermute_into(&input, &mut out)
}

fn gpu_unpermute(
    case: &UnpermuteCase,
    device: &CudaDevice,
    stream: &Stream<'_>,
    checked: bool,
) -> Result<(), MoeError> {
    let mut status = StatusBuffer::new(device)?;
    status.set_checked(checked);
    let rows = DeviceBuffer::from_host(device, &expert_rows(case.rows))?;
    let inv = DeviceBuffer::from_host(device, &case.inv)?;
    let offsets = DeviceBuffer::from_host(device, &case.offsets)?;
    let weights = DeviceBuffer::from_host(device, &weights(case.weights))?;
    let mut out = DeviceBuffer::<bf16>::zeros(device, case.out_rows * H)?;
    let input = DeviceUnpermuteInput {
        permuted_hidden_states: DeviceRows::new(rows.view(), H)?,
        inv_permuted_idx: inv.view(),
        expert_first_token_offset: offsets.view(),
        topk_weights: weights.view(),
        topk: case.topk,
        status: status.view(),
    };
    cuda::unpermute_into(stream, &input, DeviceRowsMut::new(out.view_mut(), H)?)?;
    let result = status.view().check(stream);
    status.view().check(stream)?;
    result
}

#[test]
fn the_cpu_refuses_every_case_with_its_error() {
    for (i, case) in permute_cases().into_iter().enumerate() {
        let mut data = data(&case, i as u64 + 1);
        assert_eq!(
            cpu_permute(&case, &mut data),
            Err(case.expected.clone()),
            "{}",
            case.name
        );
    }
    for case in unpermute_cases() {
        assert_eq!(
            cpu_unpermute(&case),
            Err(case.expected.clone()),
            "{}",
            case.name
        );
    }
}

#[test]
fn the_gpu_returns_the_cpus_error_for_every_case() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    for checked in [false, true] {
        for (i, case) in permute_cases().into_iter().enumerate() {
            let mut data = data(&case, i as u64 + 1);
            let on_gpu = gpu_permute(&case, &data, &device, &stream, checked);
            let on_cpu = cpu_permute(&case, &mut data);
            assert_eq!(on_gpu, on_cpu, "{} (checked: {checked})", case.name);
            assert_eq!(on_cpu, Err(case.expected.clone()), "{}", case.name);
        }
        for case in unpermute_cases() {
            let on_gpu = gpu_unpermute(&case, &device, &stream, checked);
            assert_eq!(
                on_gpu,
                cpu_unpermute(&case),
                "{} (checked: {checked})",
                case.name
            );
            assert_eq!(on_gpu, Err(case.expected.clone()), "{}", case.name);
        }
    }
}

#[test]
fn a_status_block_keeps_the_first_failing_calls_error() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let status = StatusBuffer::new(&device).unwrap();
    let rows = DeviceBuffer::from_host(&device, &expert_rows(4)).unwrap();
    let offsets = DeviceBuffer::from_host(&device, &[0i64, 2, 4]).unwrap();
    let weights = DeviceBuffer::from_host(&device, &weights(4)).unwrap();
    let mut out = DeviceBuffer::<bf16>::zeros(&device, 2 * H).unwrap();
    // Three calls before one check: a good one, one with row -5 at 3, one with -7 at 0.
    for inv in [[0i32, 1, 2, 3], [0, 1, 2, -5], [-7, 1, 2, 3]] {
        let inv = DeviceBuffer::from_host(&device, &inv).unwrap();
        let input = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::new(rows.view(), H).unwrap(),
            inv_permuted_idx: inv.view(),
            expert_first_token_offset: offsets.view(),
            topk_weights: weights.view(),
            topk: 2,
            status: status.view(),
        };
        cuda::unpermute_into(
            &stream,
            &input,
            DeviceRowsMut::new(out.view_mut(), H).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(
        status.view().check(&stream),
        Err(index_error(
            "inv_permuted_idx",
            3,
            -5,
            "rows are never negative".into()
        ))
    );
    assert_eq!(status.view().check(&stream), Ok(()));
}
