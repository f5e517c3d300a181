//! The CUDA device against the CPU reference, on fresh random inputs across the
//! contract's space: every dtype, i32 and i64 ids, `expert_map` with -1, invalid ids,
//! N from 0 to 16384, K 1..=8, E up to 512; and a CUDA graph of scratch calls,
//! captured once and replayed on new inputs.
//!
//! Without a GPU every test prints why and passes; with `MOE_REQUIRE_GPU=1` a missing
//! GPU fails them. `MOE_GPU_CASES` sets the random cases per test (default 48; fewer
//! under compute-sanitizer).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, sys};
use moe_runtime::cpu::{self, PermuteInput, UnpermuteInput};
use moe_runtime::cuda::{
    self, CudaDevice, DeviceExpertIds, DevicePermuteDest, DevicePermuteInput, DeviceRows,
    DeviceRowsMut, DeviceScales, DeviceTopkIds, DeviceUnpermuteInput, DeviceView, DeviceViewMut,
};
use moe_runtime::{
    DType, Device, MoeError, PermuteScratch, Rows, Scales, ScratchConfig, ScratchMismatch, TopkIds,
    bf16, f16,
};

/// The GPU, or `None` (after saying why) when there is none and none is required.
fn gpu() -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(device) => Some(device),
        Err(error) if std::env::var("MOE_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("MOE_REQUIRE_GPU=1 but no GPU can be used: {error}")
        }
        Err(error) => {
            eprintln!("no GPU found, skipping: {error}");
            None
        }
    }
}

fn case_count() -> usize {
    std::env::var("MOE_GPU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// xorshift64*: reproducible from the seed each case prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0
    }
}

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
        edge(4096 / 8, 8, 512, 128, DType::F16),
        edge(4096 / 8 + 1, 8, 512, 128, DType::F32),
        edge(16384, 8, 256, 256, DType::BF16),
    ];
    cases.extend((0..case_count() as u64).map(|i| random_case(0x9e37_79b9 * (i + 1))));
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

/// A host vector in device memory.
fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> CudaSlice<T> {
    if host.is_empty() {
        return stream.alloc_zeros::<T>(1).unwrap();
    }
    stream.clone_htod(host).unwrap()
}

fn view<T: cudarc::driver::DeviceRepr>(slice: &CudaSlice<T>, len: usize) -> DeviceView<'_, T> {
    DeviceView::new(slice).prefix(len)
}

/// The device copies of a case's inputs.
struct DeviceInputs {
    hidden: CudaSlice<u8>,
    ids32: CudaSlice<i32>,
    ids64: CudaSlice<i64>,
    map: CudaSlice<i32>,
    scales: CudaSlice<f32>,
    weights: CudaSlice<f32>,
}

impl DeviceInputs {
    fn new(stream: &Arc<CudaStream>, host: &HostInputs) -> Self {
        let ids32: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
        Self {
            hidden: upload(stream, &host.hidden),
            ids32: upload(stream, &ids32),
            ids64: upload(stream, &host.ids),
            map: upload(stream, host.map.as_deref().unwrap_or(&[])),
            scales: upload(stream, &host.scales),
            weights: upload(stream, &host.weights),
        }
    }

    fn permute_input<'a>(&'a self, case: &Case, host: &HostInputs) -> DevicePermuteInput<'a> {
        let entries = case.tokens * case.topk;
        let ids = if case.ids64 {
            DeviceExpertIds::I64(view(&self.ids64, entries))
        } else {
            DeviceExpertIds::I32(view(&self.ids32, entries))
        };
        let rows = DeviceRows::from_bytes(
            view(&self.hidden, host.hidden.len()),
            case.dtype,
            case.hidden,
        )
        .unwrap();
        let mut input = DevicePermuteInput::new(rows, DeviceTopkIds::new(ids, case.topk).unwrap());
        if let Some(map) = &host.map {
            input = input.with_expert_map(view(&self.map, map.len()));
        }
        if case.scale_columns > 0 {
            let scales = view(&self.scales, host.scales.len());
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
    let Some(device) = gpu() else { return };
    let stream = device.stream().clone();
    for case in cases() {
        let host = inputs(&case);
        let want = expected(&case, &host);
        let inputs = DeviceInputs::new(&stream, &host);
        let input = inputs.permute_input(&case, &host);
        let mut scratch =
            PermuteScratch::with_cuda_device(config(&case, device.device()), device.clone())
                .unwrap();
        let valid = *want.offsets.last().unwrap() as usize;
        let row_bytes = case.hidden * case.dtype.size_bytes();

        let out = cuda::permute(&mut scratch, &input).unwrap();
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

        // Caller-owned, poisoned destinations: rows after the valid ones stay poison.
        let entries = case.tokens * case.topk;
        let mut dest_rows = upload(&stream, &vec![POISON; entries * row_bytes + 16]);
        let mut dest_scales = upload(
            &stream,
            &vec![f32::from_bits(0x7fc0_dead); entries * case.scale_columns],
        );
        let dest = DevicePermuteDest {
            hidden_states: DeviceRowsMut::from_bytes(
                prefix_mut(&mut dest_rows, entries * row_bytes),
                case.dtype,
                case.hidden,
            )
            .unwrap(),
            scales: (case.scale_columns > 0)
                .then(|| prefix_mut(&mut dest_scales, entries * case.scale_columns)),
        };
        cuda::permute_into(&mut scratch, &input, dest).unwrap();
        let rows = view(&dest_rows, entries * row_bytes + 16)
            .to_host(&stream)
            .unwrap();
        assert!(
            rows[..valid * row_bytes] == want.rows[..],
            "permute_into rows, {case:?}"
        );
        assert!(
            rows[valid * row_bytes..].iter().all(|&b| b == POISON),
            "unwritten rows, {case:?}"
        );
        if case.scale_columns > 0 {
            let scales = view(&dest_scales, entries * case.scale_columns)
                .to_host(&stream)
                .unwrap();
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
        let again = cuda::permute(&mut scratch, &input).unwrap();
        assert_eq!(again.permuted_hidden_states.bytes().address(), addresses);

        let aligned = cuda::align(&mut scratch, &input.topk_ids, input.expert_map).unwrap();
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
        let owned = cuda::allocating::permute(&device, &input, case.experts, case.local).unwrap();
        let out = owned.output().unwrap();
        let got = out.permuted_idx.to_host(&stream).unwrap();
        assert_eq!(got, want.permuted_idx, "permute_alloc, {case:?}");
        let rows = out.permuted_hidden_states.bytes().to_host(&stream).unwrap();
        assert!(
            rows[..valid * row_bytes] == want.rows[..],
            "permute_alloc rows, {case:?}"
        );
    }
}

fn prefix_mut<T: cudarc::driver::DeviceRepr>(
    slice: &mut CudaSlice<T>,
    len: usize,
) -> DeviceViewMut<'_, T> {
    let ordinal = slice.ordinal();
    let address = DeviceViewMut::new(slice).address();
    // SAFETY: the first `len` elements of `slice`, borrowed mutably for the view.
    unsafe { DeviceViewMut::from_raw(address, len, ordinal) }
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
    let Some(device) = gpu() else { return };
    let stream = device.stream().clone();
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

        let d_rows = upload(&stream, &expert_out);
        let d_inv = upload(&stream, &want.inv);
        let d_offsets = upload(&stream, &want.offsets);
        let d_weights = upload(&stream, &host.weights);
        let out_len = case.tokens * case.hidden * case.dtype.size_bytes();
        let mut d_out = upload(&stream, &vec![POISON; out_len.max(1)]);
        let input = DeviceUnpermuteInput {
            permuted_hidden_states: DeviceRows::from_bytes(
                view(&d_rows, expert_out.len()),
                case.dtype,
                case.hidden,
            )
            .unwrap(),
            inv_permuted_idx: view(&d_inv, want.inv.len()),
            expert_first_token_offset: view(&d_offsets, want.offsets.len()),
            topk_weights: view(&d_weights, host.weights.len()),
            topk: case.topk,
        };
        let out =
            DeviceRowsMut::from_bytes(prefix_mut(&mut d_out, out_len), case.dtype, case.hidden)
                .unwrap();
        cuda::unpermute_into(&device, &input, out).unwrap();
        let got = view(&d_out, out_len).to_host(&stream).unwrap();
        assert!(
            within_one_ulp(case.dtype, &got, &cpu_out),
            "unpermute, {case:?}"
        );
        let exact = got == cpu_out;
        if !exact {
            eprintln!("unpermute within 1 ulp but not identical: {case:?}");
        }

        if case.dtype == DType::BF16 {
            let owned: CudaSlice<bf16> = cuda::allocating::unpermute(&device, &input).unwrap();
            let (address, _) = owned.device_ptr(&stream);
            assert_ne!(address, 0);
            let got = stream.clone_dtoh(&owned).unwrap();
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

#[test]
fn a_captured_graph_replays_permute_and_unpermute_on_new_inputs() {
    let Some(device) = gpu() else { return };
    let stream = device.stream().clone();
    let case = Case {
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
    };
    let mut host = inputs(&case);
    let mut inputs = DeviceInputs::new(&stream, &host);
    let mut scratch =
        PermuteScratch::with_cuda_device(config(&case, device.device()), device.clone()).unwrap();
    let out_len = case.tokens * case.hidden * 2;
    let mut d_out = upload(&stream, &vec![POISON; out_len]);

    // Record the whole layer's shuffle: permute, identity experts, unpermute.
    let record = |scratch: &mut PermuteScratch,
                  inputs: &DeviceInputs,
                  d_out: &mut CudaSlice<u8>| {
        let input = inputs.permute_input(&case, &host);
        let out = cuda::permute(scratch, &input).unwrap();
        let combine = DeviceUnpermuteInput {
            permuted_hidden_states: out.permuted_hidden_states,
            inv_permuted_idx: out.inv_permuted_idx,
            expert_first_token_offset: out.expert_first_token_offset,
            topk_weights: view(&inputs.weights, case.tokens * case.topk),
            topk: case.topk,
        };
        let dest = DeviceRowsMut::from_bytes(prefix_mut(d_out, out_len), DType::BF16, case.hidden)
            .unwrap();
        cuda::unpermute_into(&device, &combine, dest).unwrap();
    };
    record(&mut scratch, &inputs, &mut d_out); // warm-up outside the capture
    stream.synchronize().unwrap();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    record(&mut scratch, &inputs, &mut d_out);
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded the calls");

    for round in 0..3u64 {
        // New inputs in the same device buffers, a poisoned output, then a replay.
        host = inputs_for_round(&case, round);
        let ids32: Vec<i32> = host.ids.iter().map(|&id| id as i32).collect();
        stream
            .memcpy_htod(&host.hidden, &mut inputs.hidden)
            .unwrap();
        stream.memcpy_htod(&ids32, &mut inputs.ids32).unwrap();
        stream
            .memcpy_htod(host.map.as_deref().unwrap(), &mut inputs.map)
            .unwrap();
        stream
            .memcpy_htod(&host.scales, &mut inputs.scales)
            .unwrap();
        stream
            .memcpy_htod(&host.weights, &mut inputs.weights)
            .unwrap();
        stream
            .memcpy_htod(&vec![POISON; out_len], &mut d_out)
            .unwrap();
        graph.launch().unwrap();
        stream.synchronize().unwrap();

        let want = expected(&case, &host);
        let valid = *want.offsets.last().unwrap() as usize;
        let permuted = &want.rows;
        let cpu_out = host_unpermute(&case, &host, permuted, (&want.inv, &want.offsets));
        let got = view(&d_out, out_len).to_host(&stream).unwrap();
        assert!(
            within_one_ulp(DType::BF16, &got, &cpu_out),
            "replay {round}"
        );
        // The routing the replay wrote is the new inputs' (checked through a direct call).
        let out = cuda::permute(&mut scratch, &inputs.permute_input(&case, &host)).unwrap();
        let idx = out.permuted_idx.to_host(&stream).unwrap();
        assert_eq!(idx, want.permuted_idx, "replay {round} routing");
        assert!(valid > 0);
    }
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
    match CudaDevice::new(0) {
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
    let Some(device) = gpu() else { return };
    let stream = device.stream().clone();
    // 2^31 ids of top-2 (8 GiB, never read): N*K does not fit in i32. The hidden states
    // hold one row, which is wrong too: docs/contract.md puts IndexOverflow first.
    let ids = stream.alloc_zeros::<i32>(1 << 31).unwrap();
    let ids = DeviceTopkIds::new(DeviceExpertIds::I32(view(&ids, 1 << 31)), 2).unwrap();
    let hidden = upload(&stream, &[0u8; 16]);
    let rows = DeviceRows::from_bytes(view(&hidden, 16), DType::BF16, 8).unwrap();
    let input = DevicePermuteInput::new(rows, ids);
    let config = ScratchConfig::new(4, 2, 4, 4, device.device()).with_rows(8, DType::BF16);
    let mut scratch = PermuteScratch::with_cuda_device(config, device.clone()).unwrap();
    assert_eq!(
        cuda::permute(&mut scratch, &input).unwrap_err(),
        MoeError::Scratch(ScratchMismatch::IndexOverflow {
            num_tokens: 1 << 30,
            topk: 2
        })
    );
}
