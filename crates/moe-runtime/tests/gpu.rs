//! The CUDA device against the CPU reference, on fresh random inputs across the
//! contract's space: every dtype, i32 and i64 ids, `expert_map` with -1, invalid ids,
//! N from 0 to 16384, K 1..=8, E up to 512; and a CUDA graph of scratch calls,
//! captured once and replayed on new inputs.
//!
//! Without a GPU every test prints why and passes; with `MOE_REQUIRE_GPU=1` a missing
//! GPU fails them. `MOE_GPU_CASES` sets the random cases per test (default 48; fewer
//! under compute-sanitizer).

mod support;

use moe_runtime::cpu::{self, PermuteInput, UnpermuteInput};
use moe_runtime::cuda::cudarc::driver::sys;
use moe_runtime::cuda::{
    self, DeviceBuffer, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput, DeviceRows,
    DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceUnpermuteInput, DeviceView, StatusBuffer,
    Stream,
};
use moe_runtime::{
    DType, Device, MoeError, PermuteScratch, Rows, Scales, ScratchConfig, ScratchMismatch, TopkIds,
    bf16, f16,
};
use support::{Rng, case_count, gpu};

#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    tokens: usize,
    topk: usize,
    experts: usize,
    local: usize,
    hidden: usize,
    dtype: DType,
    ids64: bool,
    map: bool,
    scale_columns: usize,
    block_size: usize,
}

const HIDDEN: [usize; 10] = [1, 3, 8, 24, 64, 100, 128, 256, 1000, 2048];

fn random_case(seed: u64) -> Case {
    let mut rng = Rng(seed | 1);
    let tokens = match rng.below(6) {
        0 => rng.below(2),
        1 => 2 + rng.below(64),
        2 => 64 + rng.below(512),
        3 => 512 + rng.below(4096),
        4 => 4096 + rng.below(12289),
        _ => 16384,
    };
    let topk = 1 + rng.below(8);
    let experts = 1 + rng.below(512);
    let map = rng.below(3) > 0;
    let local = if map { 1 + rng.below(experts) } else { experts };
    let dtype = DType::ALL[rng.below(5)];
    let mut hidden = HIDDEN[rng.below(HIDDEN.len())];
    // Keep each case's permuted rows within 64 MiB so the CPU reference stays quick.
    while hidden > 1 && tokens * topk * hidden * dtype.size_bytes() > 64 << 20 {
        hidden /= 2;
    }
    Case {
        seed,
        tokens,
        topk,
        experts,
        local,
        hidden,
        dtype,
        ids64: rng.below(2) == 0,
        map,
        scale_columns: rng.below(3),
        block_size: [1, 16, 64, 128][rng.below(4)],
    }
}

/// The edge cases, then random ones.
fn cases() -> Vec<Case> {
    let edge = |tokens, topk, experts, hidden, dtype| Case {
        seed: 7 + tokens as u64,
        tokens,
        topk,
        experts,
        local: experts,
        hidden,
        dtype,
        ids64: false,
        map: false,
        scale_columns: 1,
        block_size: 16,
    };
    let mut cases = vec![
        edge(0, 2, 8, 64, DType::BF16),
        edge(1, 8, 256, 7168, DType::BF16),
        // More than eight choices: a small unpermute reads its rows eight at a time.
        edge(5, 10, 64, 256, DType::BF16),
        edge(64, 13, 64, 1024, DType::F16),
        edge(4096 / 8, 8, 512, 128, DType::F16),
        edge(4096 / 8 + 1, 8, 512, 128, DType::F32),
        edge(16384, 8, 256, 256, DType::BF16),
    ];
    cases.extend((0..case_count(48) as u64).map(|i| random_case(0x9e37_79b9 * (i + 1))));
    let max_tokens = std::env::var("MOE_GPU_MAX_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    cases.retain(|case| case.tokens <= max_tokens);
    cases
}

/// Host inputs of a case: random data, ids with invalid entries, a map with -1.
struct HostInputs {
    hidden: Vec<u8>,
    ids: Vec<i64>,
    map: Option<Vec<i32>>,
    scales: Vec<f32>,
    weights: Vec<f32>,
}

fn random_bytes(rng: &mut Rng, dtype: DType, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len * dtype.size_bytes());
    for _ in 0..len {
        let x = rng.normal();
        match dtype {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
            DType::Fp8E4M3 | DType::Fp8E5M2 => out.push(rng.next() as u8),
        }
    }
    out
}

fn inputs(case: &Case) -> HostInputs {
    let mut rng = Rng(case.seed.wrapping_mul(31) | 1);
    let entries = case.tokens * case.topk;
    let invalid_percent = [0, 5, 30][rng.below(3)];
    let ids = (0..entries)
        .map(|_| {
            if rng.below(100) < invalid_percent {
                [-1, -7, case.experts as i64, case.experts as i64 + 3][rng.below(4)]
            } else {
                rng.below(case.experts) as i64
            }
        })
        .collect();
    let map = case.map.then(|| {
        // `local` of the globals map to distinct local ids, the others to -1.
        let mut globals: Vec<usize> = (0..case.experts).collect();
        for i in (1..globals.len()).rev() {
            globals.swap(i, rng.below(i + 1));
        }
        let mut map = vec![-1; case.experts];
        for (local, &global) in globals[..case.local].iter().enumerate() {
            map[global] = local as i32;
        }
        map
    });
    HostInputs {
        hidden: random_bytes(&mut rng, case.dtype, case.tokens * case.hidden),
        ids,
        map,
        scales: (0..case.tokens * case.scale_columns)
            .map(|_| rng.normal())
            .collect(),
        weights: (0..entries).map(|_| rng.normal()).collect(),
    }
}

/// The device copies of a case's inputs.
struct DeviceInputs {
    hidden: DeviceBuffer<u8>,
    ids32: DeviceBuffer<i32>,
    ids64: DeviceBuffer<i64>,
    map: DeviceBuffer<i32>,
    scales: DeviceBuffer<f32>,
    weights: DeviceBuffer<f32>,
}

fn upload<T: cuda::DeviceRepr>(device: &cuda::CudaDevice, host: &[T]) -> DeviceBuffer<T> {
    DeviceBuffer::from_host(device, host).unwrap()
}

impl DeviceInputs {
    fn new(device: &cuda::CudaDevice, host: &HostInputs) -> Self {
        let ids32: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
        Self {
            hidden: upload(device, &host.hidden),
            ids32: upload(device, &ids32),
            ids64: upload(device, &host.ids),
            map: upload(device, host.map.as_deref().unwrap_or(&[])),
            scales: upload(device, &host.scales),
            weights: upload(device, &host.weights),
        }
    }

    /// Copies new inputs of the same case into the same device memory.
    fn refill(&mut self, stream: &Stream<'_>, host: &HostInputs) {
        let ids32: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
        self.hidden.copy_from_host(stream, &host.hidden).unwrap();
        self.ids32.copy_from_host(stream, &ids32).unwrap();
        self.ids64.copy_from_host(stream, &host.ids).unwrap();
        if let Some(map) = &host.map {
            self.map.copy_from_host(stream, map).unwrap();
        }
        self.scales.copy_from_host(stream, &host.scales).unwrap();
        self.weights.copy_from_host(stream, &host.weights).unwrap();
    }

    fn permute_input<'a>(&'a self, case: &Case, host: &HostInputs) -> DevicePermuteInput<'a> {
        let entries = case.tokens * case.topk;
        let ids = if case.ids64 {
            DeviceExpertIds::I64(self.ids64.view().prefix(entries))
        } else {
            DeviceExpertIds::I32(self.ids32.view().prefix(entries))
        };
        let rows = DeviceRows::from_bytes(
            self.hidden.view().prefix(host.hidden.len()),
            case.dtype,
            case.hidden,
        )
        .unwrap();
        let mut input = DevicePermuteInput::new(rows, DeviceTopkIds::new(ids, case.topk).unwrap());
        if let Some(map) = &host.map {
            input = input.with_expert_map(self.map.view().prefix(map.len()));
        }
        if case.scale_columns > 0 {
            let scales = self.scales.view().prefix(host.scales.len());
            input = input.with_scales(DeviceScales::new(scales, case.scale_columns).unwrap());
        }
        input
    }
}

fn config(case: &Case, device: Device) -> ScratchConfig {
    ScratchConfig::new(case.tokens, case.topk, case.experts, case.local, device)
        .with_rows(case.hidden, case.dtype)
        .with_scale_columns(case.scale_columns)
        .with_align_block_size(case.block_size)
}

/// The CPU reference of a case: permute and align outputs, copied out.
struct Expected {
    rows: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<i64>,
    inv: Vec<i32>,
    permuted_idx: Vec<i32>,
    sorted_ids: Vec<i32>,
    block_expert_ids: Vec<i32>,
    padded_rows: usize,
}

fn expected(case: &Case, host: &HostInputs) -> Expected {
    let mut scratch = PermuteScratch::new(config(case, Device::Cpu)).unwrap();
    let ids32: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
    let ids = if case.ids64 {
        TopkIds::new(&host.ids, case.topk).unwrap()
    } else {
        TopkIds::new(&ids32, case.topk).unwrap()
    };
    let rows = Rows::from_bytes(&host.hidden, case.dtype, case.hidden).unwrap();
    let mut input = PermuteInput::new(rows, ids);
    if let Some(map) = &host.map {
        input = input.with_expert_map(map);
    }
    if case.scale_columns > 0 {
        input = input.with_scales(Scales::new(&host.scales, case.scale_columns).unwrap());
    }
    let out = cpu::permute(&mut scratch, &input).unwrap();
    let valid = out.num_valid_rows();
    let row_bytes = case.hidden * case.dtype.size_bytes();
    let mut expected = Expected {
        rows: out.permuted_hidden_states.as_bytes()[..valid * row_bytes].to_vec(),
        scales: out.permuted_scales.map_or(vec![], |s| {
            s.as_slice()[..valid * case.scale_columns].to_vec()
        }),
        offsets: out.expert_first_token_offset.to_vec(),
        inv: out.inv_permuted_idx.to_vec(),
        permuted_idx: out.permuted_idx.to_vec(),
        sorted_ids: vec![],
        block_expert_ids: vec![],
        padded_rows: 0,
    };
    let aligned = cpu::align(&mut scratch, &ids, host.map.as_deref()).unwrap();
    expected.sorted_ids = aligned.sorted_ids.to_vec();
    expected.block_expert_ids = aligned.block_expert_ids.to_vec();
    expected.padded_rows = aligned.num_rows_post_padded;
    expected
}

/// Byte 0xA5 in every poisoned destination.
const POISON: u8 = 0xA5;

#[test]
fn permute_and_align_match_the_cpu_bit_for_bit() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    for case in cases() {
        let host = inputs(&case);
        let want = expected(&case, &host);
        let inputs = DeviceInputs::new(&device, &host);
        let input = inputs.permute_input(&case, &host);
        let mut scratch =
            PermuteScratch::with_cuda_device(config(&case, device.device()), device.clone())
                .unwrap();
        let valid = *want.offsets.last().unwrap() as usize;
        let row_bytes = case.hidden * case.dtype.size_bytes();

        let out = cuda::permute(&mut scratch, &stream, &input).unwrap();
        let offsets = out.expert_first_token_offset.to_host(&stream).unwrap();
        assert_eq!(offsets, want.offsets, "offsets, {case:?}");
        let got = out.inv_permuted_idx.to_host(&stream).unwrap();
        assert_eq!(got, want.inv, "inv_permuted_idx, {case:?}");
        let got = out.permuted_idx.to_host(&stream).unwrap();
        assert_eq!(got, want.permuted_idx, "permuted_idx, {case:?}");
        let rows = out.permuted_hidden_states.bytes().to_host(&stream).unwrap();
        assert_eq!(rows.len(), case.tokens * case.topk * row_bytes);
        assert!(rows[..valid * row_bytes] == want.rows[..], "rows, {case:?}");
        if let Some(scales) = out.permuted_scales {
            let got = scales.data().to_host(&stream).unwrap();
            assert_eq!(
                &got[..valid * case.scale_columns],
                &want.scales[..],
                "scales, {case:?}"
            );
        }
        let addresses = out.permuted_hidden_states.bytes().address();
        // Valid input: nothing was reported.
        scratch.check_status(&stream).unwrap();

        // Caller-owned, poisoned destinations: rows after the valid ones stay poison.
        let entries = case.tokens * case.topk;
        let mut dest_rows = upload(&device, &vec![POISON; entries * row_bytes + 16]);
        let mut dest_scales = upload(
            &device,
            &vec![f32::from_bits(0x7fc0_dead); entries * case.scale_columns],
        );
        let dest = DevicePermuteDest {
            hidden_states: DeviceRowsMut::from_bytes(
                dest_rows.view_mut().prefix(entries * row_bytes),
                case.dtype,
                case.hidden,
            )
            .unwrap(),
            scales: (case.scale_columns > 0)
                .then(|| dest_scales.view_mut().prefix(entries * case.scale_columns)),
        };
        cuda::permute_into(&mut scratch, &stream, &input, dest).unwrap();
        let rows = dest_rows.view().to_host(&stream).unwrap();
        assert!(
            rows[..valid * row_bytes] == want.rows[..],
            "permute_into rows, {case:?}"
        );
        assert!(
            rows[valid * row_bytes..].iter().all(|&b| b == POISON),
            "unwritten rows, {case:?}"
        );
        if case.scale_columns > 0 {
            let scales = dest_scales.view().to_host(&stream).unwrap();
            let split = valid * case.scale_columns;
            assert_eq!(
                &scales[..split],
                &want.scales[..],
                "permute_into scales, {case:?}"
            );
            assert!(
                scales[split..].iter().all(|s| s.to_bits() == 0x7fc0_dead),
                "{case:?}"
            );
        }

        // A second call returns views of the same memory.
        let again = cuda::permute(&mut scratch, &stream, &input).unwrap();
        assert_eq!(again.permuted_hidden_states.bytes().address(), addresses);

        let aligned =
            cuda::align(&mut scratch, &stream, &input.topk_ids, input.expert_map).unwrap();
        let got = aligned.sorted_ids.to_host(&stream).unwrap();
        assert_eq!(got, want.sorted_ids, "sorted_ids, {case:?}");
        let got = aligned.block_expert_ids.to_host(&stream).unwrap();
        assert_eq!(got, want.block_expert_ids, "block_expert_ids, {case:?}");
        let got = aligned.num_rows_post_padded.to_host(&stream).unwrap();
        assert_eq!(
            got,
            vec![want.padded_rows as i32],
            "num_rows_post_padded, {case:?}"
        );

        // The allocating path gives the same.
        let owned =
            cuda::allocating::permute(&device, &stream, &input, case.experts, case.local).unwrap();
        let out = owned.output().unwrap();
        let got = out.permuted_idx.to_host(&stream).unwrap();
        assert_eq!(got, want.permuted_idx, "allocating::permute, {case:?}");
        let rows = out.permuted_hidden_states.bytes().to_host(&stream).unwrap();
        assert!(
            rows[..valid * row_bytes] == want.rows[..],
            "allocating::permute rows, {case:?}"
        );
    }
}

/// Whether `a` and `b` are at most one unit in the last place apart.
fn within_one_ulp(dtype: DType, a: &[u8], b: &[u8]) -> bool {
    fn ordered(bits: i64, sign: i64) -> i64 {
        if bits & sign != 0 { sign - bits } else { bits }
    }
    let width = dtype.size_bytes();
    a.chunks(width).zip(b.chunks(width)).all(|(a, b)| {
        let (x, y, sign) = match width {
            4 => (
                u32::from_le_bytes(a.try_into().unwrap()) as i64,
                u32::from_le_bytes(b.try_into().unwrap()) as i64,
                1i64 << 31,
            ),
            _ => (
                u16::from_le_bytes(a.try_into().unwrap()) as i64,
                u16::from_le_bytes(b.try_into().unwrap()) as i64,
                1i64 << 15,
            ),
        };
        (ordered(x, sign) - ordered(y, sign)).abs() <= 1
    })
}

fn host_unpermute(
    case: &Case,
    host: &HostInputs,
    rows: &[u8],
    routing: (&[i32], &[i64]),
) -> Vec<u8> {
    fn run<T: moe_runtime::Accumulate>(
        case: &Case,
        host: &HostInputs,
        rows: &[u8],
        routing: (&[i32], &[i64]),
    ) -> Vec<u8> {
        // Copied into elements of `T`: a byte vector need not be aligned for them.
        let rows: Vec<T> = bytemuck::pod_collect_to_vec(rows);
        let out = cpu::allocating::unpermute(&UnpermuteInput {
            permuted_hidden_states: &rows,
            hidden_size: case.hidden,
            inv_permuted_idx: routing.0,
            expert_first_token_offset: routing.1,
            topk_weights: &host.weights,
            topk: case.topk,
        })
        .unwrap();
        Rows::new(&out, case.hidden).unwrap().as_bytes().to_vec()
    }
    match case.dtype {
        DType::F32 => run::<f32>(case, host, rows, routing),
        DType::F16 => run::<f16>(case, host, rows, routing),
        _ => run::<bf16>(case, host, rows, routing),
    }
}

#[test]
fn unpermute_matches_the_cpu_within_one_ulp() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let status = StatusBuffer::new(&device).unwrap();
    for mut case in cases() {
        if !matches!(case.dtype, DType::F32 | DType::F16 | DType::BF16) {
            case.dtype = DType::BF16;
        }
        let host = inputs(&case);
        let want = expected(&case, &host);
        let valid = *want.offsets.last().unwrap() as usize;
        // Expert outputs: random rows, a few more than the valid ones.
        let mut rng = Rng(case.seed ^ 0xfeed);
        let rows = valid + rng.below(4);
        let expert_out = random_bytes(&mut rng, case.dtype, rows * case.hidden);
        let cpu_out = host_unpermute(&case, &host, &expert_out, (&want.inv, &want.offsets));

        let d_rows = upload(&device, &expert_out);
        let d_inv = upload(&device, &want.inv);
        let d_offsets = upload(&device, &want.offsets);
        let d_weights = upload(&device, &host.weights);
        let out_len = case.tokens * case.hidden * case.dtype.size_bytes();
        let mut d_out = upload(&device, &vec![POISON; out_len.max(1)]);
        let input = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::from_bytes(
                d_rows.view().prefix(expert_out.len()),
                case.dtype,
                case.hidden,
            )
            .unwrap(),
            inv_permuted_idx: d_inv.view().prefix(want.inv.len()),
            expert_first_token_offset: d_offsets.view(),
            topk_weights: d_weights.view().prefix(host.weights.len()),
            topk: case.topk,
            status: status.view(),
        };
        let out =
            DeviceRowsMut::from_bytes(d_out.view_mut().prefix(out_len), case.dtype, case.hidden)
                .unwrap();
        cuda::unpermute_into(&stream, &input, out).unwrap();
        let got = d_out.view().prefix(out_len).to_host(&stream).unwrap();
        assert!(
            within_one_ulp(case.dtype, &got, &cpu_out),
            "unpermute, {case:?}"
        );
        if got != cpu_out {
            eprintln!("unpermute within 1 ulp but not identical: {case:?}");
        }
        status.view().check(&stream).unwrap();

        if case.dtype == DType::BF16 {
            let owned = cuda::allocating::unpermute::<bf16>(&stream, &input).unwrap();
            assert_ne!(owned.view().address(), 0);
            let got = owned.view().to_host(&stream).unwrap();
            let got = Rows::new(&got[..case.tokens * case.hidden], case.hidden)
                .unwrap()
                .as_bytes()
                .to_vec();
            assert!(
                within_one_ulp(case.dtype, &got, &cpu_out),
                "allocating unpermute, {case:?}"
            );
        }
    }
}

/// The case every graph and stream test uses: a layer of 300 tokens, top-8 of 64
/// experts, 48 of them local.
fn layer_case() -> Case {
    Case {
        seed: 11,
        tokens: 300,
        topk: 8,
        experts: 64,
        local: 48,
        hidden: 512,
        dtype: DType::BF16,
        ids64: false,
        map: true,
        scale_columns: 1,
        block_size: 16,
    }
}

/// A layer's shuffle on `stream`: permute, identity experts, unpermute into `out`.
fn layer(
    scratch: &mut PermuteScratch,
    stream: &Stream<'_>,
    case: &Case,
    host: &HostInputs,
    inputs: &DeviceInputs,
    out: &mut DeviceBuffer<u8>,
) -> Result<(), MoeError> {
    let input = inputs.permute_input(case, host);
    let routed = cuda::permute(scratch, stream, &input)?;
    let combine = DeviceUnpermuteInput {
        permuted_hidden_states: routed.permuted_hidden_states,
        inv_permuted_idx: routed.inv_permuted_idx,
        expert_first_token_offset: routed.expert_first_token_offset,
        topk_weights: inputs.weights.view().prefix(case.tokens * case.topk),
        topk: case.topk,
        status: routed.status,
    };
    let out_len = case.tokens * case.hidden * case.dtype.size_bytes();
    let dest = DeviceRowsMut::from_bytes(out.view_mut().prefix(out_len), case.dtype, case.hidden)?;
    cuda::unpermute_into(stream, &combine, dest)
}

/// The CPU's result of [`layer`].
fn layer_on_cpu(case: &Case, host: &HostInputs) -> Vec<u8> {
    let want = expected(case, host);
    host_unpermute(case, host, &want.rows, (&want.inv, &want.offsets))
}

#[test]
fn a_graph_captured_on_a_side_stream_replays_permute_and_unpermute_on_new_inputs() {
    let Some((device, _)) = gpu() else { return };
    // The calls run on the stream PyTorch would capture on: a side stream, not the
    // one the warm-up ran on. The scratch moves there, ordered, before the capture.
    let (warm, side) = (device.new_stream().unwrap(), device.new_stream().unwrap());
    let (warm_stream, side_stream) = (device.stream(&warm).unwrap(), device.stream(&side).unwrap());
    let case = layer_case();
    let mut host = inputs(&case);
    let mut inputs = DeviceInputs::new(&device, &host);
    let mut scratch =
        PermuteScratch::with_cuda_device(config(&case, device.device()), device.clone()).unwrap();
    let out_len = case.tokens * case.hidden * 2;
    let mut d_out = upload(&device, &vec![POISON; out_len]);

    layer(
        &mut scratch,
        &warm_stream,
        &case,
        &host,
        &inputs,
        &mut d_out,
    )
    .unwrap();
    assert!(within_one_ulp(
        DType::BF16,
        &d_out.view().to_host(&warm_stream).unwrap(),
        &layer_on_cpu(&case, &host)
    ));
    // The scratch is bound to the warm-up stream: the side stream is refused...
    let refused = layer(
        &mut scratch,
        &side_stream,
        &case,
        &host,
        &inputs,
        &mut d_out,
    );
    assert!(
        matches!(
            refused,
            Err(MoeError::Scratch(
                moe_runtime::ScratchMismatch::Stream { .. }
            ))
        ),
        "{refused:?}"
    );
    // ...until it is moved there.
    scratch.switch_stream(&warm_stream, &side_stream).unwrap();
    side.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .unwrap();
    layer(
        &mut scratch,
        &side_stream,
        &case,
        &host,
        &inputs,
        &mut d_out,
    )
    .unwrap();
    let graph = side
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded the calls");

    for round in 0..3u64 {
        // New inputs in the same device buffers, a poisoned output, then a replay.
        host = inputs_for_round(&case, round);
        inputs.refill(&side_stream, &host);
        d_out
            .copy_from_host(&side_stream, &vec![POISON; out_len])
            .unwrap();
        graph.launch().unwrap();
        side_stream.synchronize().unwrap();
        let got = d_out.view().to_host(&side_stream).unwrap();
        assert!(
            within_one_ulp(DType::BF16, &got, &layer_on_cpu(&case, &host)),
            "replay {round}"
        );
        // The routing the replay wrote is the new inputs' (checked through a direct call).
        let want = expected(&case, &host);
        let out = cuda::permute(
            &mut scratch,
            &side_stream,
            &inputs.permute_input(&case, &host),
        )
        .unwrap();
        let idx = out.permuted_idx.to_host(&side_stream).unwrap();
        assert_eq!(idx, want.permuted_idx, "replay {round} routing");
        assert!(*want.offsets.last().unwrap() > 0);
    }
    scratch.check_status(&side_stream).unwrap();
}

#[test]
fn one_scratch_serves_two_streams_ordered_by_the_callers_events() {
    let Some((device, _)) = gpu() else { return };
    let (a, b) = (device.new_stream().unwrap(), device.new_stream().unwrap());
    let (stream_a, stream_b) = (device.stream(&a).unwrap(), device.stream(&b).unwrap());
    let case = layer_case();
    let mut scratch =
        PermuteScratch::with_cuda_device(config(&case, device.device()), device.clone()).unwrap();
    let out_len = case.tokens * case.hidden * 2;
    // Layers alternate between the streams, each with its own inputs and output; the
    // caller orders each hand-over with an event of its own, as a serving stack that
    // overlaps two micro-batches does.
    let rounds: Vec<(HostInputs, DeviceInputs)> = (0..6)
        .map(|round| {
            let host = inputs_for_round(&case, 100 + round);
            let device_inputs = DeviceInputs::new(&device, &host);
            (host, device_inputs)
        })
        .collect();
    let mut outs: Vec<DeviceBuffer<u8>> = (0..6)
        .map(|_| upload(&device, &vec![POISON; out_len]))
        .collect();
    for (round, ((host, inputs), out)) in rounds.iter().zip(&mut outs).enumerate() {
        let (stream, cu) = if round % 2 == 0 {
            (&stream_a, &a)
        } else {
            (&stream_b, &b)
        };
        if round > 0 {
            let previous = if round % 2 == 0 { &b } else { &a };
            let event = previous.record_event(None).unwrap();
            cu.wait(&event).unwrap();
            // SAFETY: the new stream waits for everything the previous one queued
            // (the event just recorded there), and both streams outlive the scratch.
            unsafe { scratch.assume_stream(stream).unwrap() };
        }
        layer(&mut scratch, stream, &case, host, inputs, out).unwrap();
    }
    for (round, ((host, _), out)) in rounds.iter().zip(&outs).enumerate() {
        let stream = if round % 2 == 0 { &stream_a } else { &stream_b };
        let got = out.view().to_host(stream).unwrap();
        assert!(
            within_one_ulp(DType::BF16, &got, &layer_on_cpu(&case, host)),
            "round {round}"
        );
    }
    scratch.check_status(&stream_b).unwrap();
}

#[test]
fn a_scratch_in_caller_memory_gives_what_an_owning_scratch_gives() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let case = layer_case();
    let config = config(&case, device.device());
    let layout = PermuteScratch::cuda_memory_layout(&config).unwrap();
    assert_eq!(layout.alignment, cuda::SCRATCH_ALIGNMENT);
    // The caller's allocator: a cudarc slice on the call's stream, a little larger.
    let mut memory = cu_stream.alloc_zeros::<u8>(layout.bytes + 4096).unwrap();
    let address = DeviceView::new(&memory).address();
    assert_eq!(address % layout.alignment as u64, 0);

    // Too small, or misaligned: refused before anything is touched.
    // SAFETY: the region lies in `memory`, which outlives every scratch over it, is
    // used by nothing else, and whose zeroing was queued on the same stream.
    let small = unsafe {
        PermuteScratch::in_cuda_memory(
            config.clone(),
            device.clone(),
            address,
            layout.bytes - 1,
            &stream,
        )
    };
    assert!(
        matches!(
            small,
            Err(MoeError::Shape {
                tensor: "scratch memory",
                ..
            })
        ),
        "{small:?}"
    );
    // SAFETY: as above.
    let misaligned = unsafe {
        PermuteScratch::in_cuda_memory(
            config.clone(),
            device.clone(),
            address + 16,
            layout.bytes,
            &stream,
        )
    };
    assert!(
        matches!(misaligned, Err(MoeError::MemoryAlignment { .. })),
        "{misaligned:?}"
    );

    let host = inputs(&case);
    let inputs = DeviceInputs::new(&device, &host);
    let out_len = case.tokens * case.hidden * 2;
    let mut d_out = upload(&device, &vec![POISON; out_len]);
    {
        // SAFETY: as above.
        let mut scratch = unsafe {
            PermuteScratch::in_cuda_memory(
                config.clone(),
                device.clone(),
                address,
                layout.bytes,
                &stream,
            )
        }
        .unwrap();
        assert_eq!(scratch.bound_stream(), Some(stream.id()));
        layer(&mut scratch, &stream, &case, &host, &inputs, &mut d_out).unwrap();
        let out =
            cuda::permute(&mut scratch, &stream, &inputs.permute_input(&case, &host)).unwrap();
        // The scratch's buffers are carved from the caller's region.
        let rows = out.permuted_hidden_states.bytes().address();
        assert!(rows >= address && rows < address + layout.bytes as u64);
        assert_eq!(
            out.permuted_idx.to_host(&stream).unwrap(),
            expected(&case, &host).permuted_idx
        );
        scratch.check_status(&stream).unwrap();
    }
    let got = d_out.view().to_host(&stream).unwrap();
    assert!(within_one_ulp(
        DType::BF16,
        &got,
        &layer_on_cpu(&case, &host)
    ));
    // The region is still the caller's: writable through its own slice.
    cu_stream.memset_zeros(&mut memory).unwrap();
}

#[test]
fn views_are_refused_on_a_stream_they_are_not_bound_to() {
    let Some((device, a)) = gpu() else { return };
    let b = device.new_stream().unwrap();
    let (stream_a, stream_b) = (device.stream(&a).unwrap(), device.stream(&b).unwrap());
    let case = layer_case();
    let host = inputs(&case);
    // cudarc slices of stream `a`: their views are bound to it.
    let hidden = a.clone_htod(&host.hidden).unwrap();
    let ids: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
    let ids = a.clone_htod(&ids).unwrap();
    let map = a.clone_htod(host.map.as_deref().unwrap()).unwrap();
    let input = DevicePermuteInput::new(
        DeviceRows::from_bytes(DeviceView::new(&hidden), case.dtype, case.hidden).unwrap(),
        DeviceTopkIds::new(DeviceExpertIds::I32(DeviceView::new(&ids)), case.topk).unwrap(),
    )
    .with_expert_map(DeviceView::new(&map));
    let config = ScratchConfig::new(
        case.tokens,
        case.topk,
        case.experts,
        case.local,
        device.device(),
    )
    .with_rows(case.hidden, case.dtype);
    let mut scratch = PermuteScratch::with_cuda_device(config.clone(), device.clone()).unwrap();
    let refused = cuda::permute(&mut scratch, &stream_b, &input);
    assert!(
        matches!(
            refused,
            Err(MoeError::StreamMismatch {
                tensor: "hidden_states",
                ..
            })
        ),
        "{refused:?}"
    );
    // On their own stream they are used, and the outputs are bound to it.
    let mut scratch = PermuteScratch::with_cuda_device(config, device.clone()).unwrap();
    let out = cuda::permute(&mut scratch, &stream_a, &input).unwrap();
    assert_eq!(out.permuted_idx.stream(), Some(stream_a.id()));
    assert!(matches!(
        out.permuted_idx.to_host(&stream_b),
        Err(MoeError::StreamMismatch { .. })
    ));
    let want = expected(&case, &host);
    assert_eq!(
        out.permuted_idx.to_host(&stream_a).unwrap(),
        want.permuted_idx
    );
}

#[test]
fn cudarc_orders_its_own_work_on_other_streams_after_the_call() {
    let Some((device, a)) = gpu() else { return };
    // cudarc's default: the context tracks events once it has several streams.
    let b = device.new_stream().unwrap();
    assert!(device.context().is_event_tracking());
    let stream_a = device.stream(&a).unwrap();
    let case = Case {
        scale_columns: 0,
        ..layer_case()
    };
    let host = inputs(&case);
    let want = expected(&case, &host);
    let row_bytes = case.hidden * 2;
    let entries = case.tokens * case.topk;
    let hidden = a.clone_htod(&host.hidden).unwrap();
    let ids: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
    let ids = a.clone_htod(&ids).unwrap();
    let map = a.clone_htod(host.map.as_deref().unwrap()).unwrap();
    let mut dest = a.alloc_zeros::<u8>(entries * row_bytes).unwrap();
    // Keep stream `a` busy, so that the permute runs well after this thread moves on.
    let big = a.alloc_zeros::<u8>(256 << 20).unwrap();
    let mut big_copy = a.alloc_zeros::<u8>(256 << 20).unwrap();
    for _ in 0..8 {
        a.memcpy_dtod(&big, &mut big_copy).unwrap();
    }
    let mut scratch = PermuteScratch::with_cuda_device(
        ScratchConfig::new(
            case.tokens,
            case.topk,
            case.experts,
            case.local,
            device.device(),
        ),
        device.clone(),
    )
    .unwrap();
    let input = DevicePermuteInput::new(
        DeviceRows::from_bytes(DeviceView::new(&hidden), case.dtype, case.hidden).unwrap(),
        DeviceTopkIds::new(DeviceExpertIds::I32(DeviceView::new(&ids)), case.topk).unwrap(),
    )
    .with_expert_map(DeviceView::new(&map));
    let rows =
        DeviceRowsMut::from_bytes(cuda::DeviceViewMut::new(&mut dest), case.dtype, case.hidden)
            .unwrap();
    let dest_view = DevicePermuteDest {
        hidden_states: rows,
        scales: None,
    };
    cuda::permute_into(&mut scratch, &stream_a, &input, dest_view).unwrap();
    // cudarc, on the other stream, waits for the slice's last write: the permute's,
    // recorded after its kernels, not the zeroing before it.
    let got = b.clone_dtoh(&dest).unwrap();
    let valid = *want.offsets.last().unwrap() as usize;
    assert!(valid > 0);
    assert!(got[..valid * row_bytes] == want.rows[..]);
}

fn inputs_for_round(case: &Case, round: u64) -> HostInputs {
    inputs(&Case {
        seed: case.seed + 1000 * (round + 1),
        ..case.clone()
    })
}

#[test]
fn without_a_gpu_the_error_is_clear_and_the_cpu_is_chosen() {
    let (device, reason) = Device::best_available();
    match cuda::CudaDevice::new(0) {
        Ok(_) => assert_eq!((device, reason.is_none()), (Device::Cuda(0), true)),
        Err(error) => {
            assert!(
                matches!(error, MoeError::DeviceUnavailable { .. }),
                "{error}"
            );
            assert_eq!(device, Device::Cpu);
            assert!(reason.is_some());
            let scratch = PermuteScratch::new(ScratchConfig::new(4, 2, 8, 8, Device::Cuda(0)));
            assert!(matches!(scratch, Err(MoeError::DeviceUnavailable { .. })));
        }
    }
}

#[test]
fn index_overflow_is_reported_before_the_shapes() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    // 2^31 ids of top-2 (8 GiB, never read): N*K does not fit in i32. The hidden states
    // hold one row, which is wrong too: docs/contract.md puts IndexOverflow first.
    let ids = DeviceBuffer::<i32>::zeros(&device, 1 << 31).unwrap();
    let ids = DeviceTopkIds::new(DeviceExpertIds::I32(ids.view()), 2).unwrap();
    let hidden = upload(&device, &[0u8; 16]);
    let rows = DeviceRows::from_bytes(hidden.view(), DType::BF16, 8).unwrap();
    let input = DevicePermuteInput::new(rows, ids);
    let config = ScratchConfig::new(4, 2, 4, 4, device.device()).with_rows(8, DType::BF16);
    let mut scratch = PermuteScratch::with_cuda_device(config, device.clone()).unwrap();
    assert_eq!(
        cuda::permute(&mut scratch, &stream, &input).unwrap_err(),
        MoeError::Scratch(ScratchMismatch::IndexOverflow {
            num_tokens: 1 << 30,
            topk: 2
        })
    );
}

#[test]
fn the_device_loads_the_newest_kernel_module_unless_told_otherwise() {
    let Some((device, _)) = gpu() else {
        return;
    };
    let (major, minor) = device.context().compute_capability().unwrap();
    let expected = match std::env::var(cuda::KERNEL_MODULE_ENV) {
        Ok(name) => cuda::KernelModule::from_name(name.trim()).unwrap(),
        Err(_) => cuda::KernelModule::for_compute_capability(major as u32, minor as u32).unwrap(),
    };
    eprintln!(
        "compute capability {major}.{minor}: the {} module",
        device.kernel_module().name()
    );
    assert_eq!(device.kernel_module(), expected);
    // A second device on the same context shares the loaded module.
    let again = cuda::CudaDevice::from_context(device.context().clone()).unwrap();
    assert_eq!(again.kernel_module(), expected);
}
