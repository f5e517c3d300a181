//! Every error a call or a scratch configuration can return, each triggered once.

use moe_runtime::cpu::{
    self, PermuteDest, PermuteInput, UnpermuteInput, align, permute, permute_into,
};
use moe_runtime::{
    CallShape, ConfigError, DType, Device, MoeError, PermuteScratch, RowSpec, Rows, RowsMut,
    Scales, ScratchConfig, ScratchMismatch, TopkIds, bf16,
};

const H: usize = 8;

/// A CPU scratch for up to 4 tokens of top-2 over 6 experts, 4 of them local.
fn config() -> ScratchConfig {
    ScratchConfig::new(4, 2, 6, 4, Device::Cpu)
}

fn hidden(num_tokens: usize) -> Vec<bf16> {
    (0..num_tokens * H)
        .map(|i| bf16::from_f32(i as f32 * 0.5 - 3.0))
        .collect()
}

const MAP: [i32; 6] = [0, -1, 1, 2, -1, 3];

fn scratch_mismatch(result: Result<impl Sized, MoeError>) -> ScratchMismatch {
    match result {
        Err(MoeError::Scratch(mismatch)) => mismatch,
        Err(other) => panic!("expected a scratch mismatch, got {other}"),
        Ok(_) => panic!("expected a scratch mismatch, the call succeeded"),
    }
}

fn error(result: Result<impl Sized, MoeError>) -> MoeError {
    match result {
        Err(error) => error,
        Ok(_) => panic!("expected an error, the call succeeded"),
    }
}

/// A permute into the scratch's own rows with `num_tokens` tokens of `topk`.
fn permute_with(
    scratch: &mut PermuteScratch,
    num_tokens: usize,
    topk: usize,
    map: Option<&[i32]>,
) -> Result<usize, MoeError> {
    let data = hidden(num_tokens);
    let ids: Vec<i32> = (0..num_tokens * topk).map(|i| (i % 6) as i32).collect();
    let mut input = PermuteInput::new(Rows::new(&data, H)?, TopkIds::new(&ids, topk)?);
    if let Some(map) = map {
        input = input.with_expert_map(map);
    }
    permute(scratch, &input).map(|out| out.num_valid_rows())
}

#[test]
fn a_matching_call_succeeds() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    // Ids cycle 0..6 over 8 entries: 0,1,2,3,4,5,0,1; experts 1 and 4 are remote.
    assert_eq!(permute_with(&mut scratch, 4, 2, Some(&MAP)).unwrap(), 5);
}

#[test]
fn too_many_tokens() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 5, 2, Some(&MAP))),
        ScratchMismatch::TooManyTokens {
            num_tokens: 5,
            max_num_tokens: 4
        }
    );
}

#[test]
fn wrong_topk() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 3, Some(&MAP))),
        ScratchMismatch::Topk {
            expected: 2,
            got: 3
        }
    );
}

#[test]
fn expert_map_of_the_wrong_length() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 2, Some(&MAP[..5]))),
        ScratchMismatch::NumExperts {
            expected: 6,
            got: 5
        }
    );
}

#[test]
fn missing_expert_map_with_fewer_local_experts() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 2, None)),
        ScratchMismatch::MissingExpertMap {
            num_experts: 6,
            num_local_experts: 4
        }
    );
}

#[test]
fn expert_map_entry_out_of_range() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    let map = [0, -1, 1, 4, -1, 3];
    assert_eq!(
        error(permute_with(&mut scratch, 2, 2, Some(&map))),
        MoeError::ExpertMapEntry {
            index: 3,
            value: 4,
            num_local_experts: 4
        }
    );
    let map = [0, -2, 1, 2, -1, 3];
    assert!(matches!(
        error(permute_with(&mut scratch, 2, 2, Some(&map))),
        MoeError::ExpertMapEntry { index: 1, .. }
    ));
}

#[test]
fn wrong_hidden_size() {
    let mut scratch = PermuteScratch::new(config().with_rows(H + 8, DType::BF16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 2, Some(&MAP))),
        ScratchMismatch::HiddenSize {
            expected: H + 8,
            got: H
        }
    );
}

#[test]
fn wrong_dtype() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::F16)).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 2, Some(&MAP))),
        ScratchMismatch::Dtype {
            expected: DType::F16,
            got: DType::BF16
        }
    );
}

#[test]
fn wrong_scale_columns() {
    let config = config().with_rows(H, DType::BF16).with_scale_columns(2);
    let mut scratch = PermuteScratch::new(config).unwrap();
    let data = hidden(2);
    let ids = [0i64, 2, 3, 5];
    let scales = [0.5f32, 0.25];
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), TopkIds::new(&ids, 2).unwrap())
        .with_expert_map(&MAP)
        .with_scales(Scales::new(&scales, 1).unwrap());
    assert_eq!(
        scratch_mismatch(permute(&mut scratch, &input)),
        ScratchMismatch::ScaleColumns {
            expected: 2,
            got: 1
        }
    );
}

#[test]
fn no_row_buffer_and_no_destination() {
    let mut scratch = PermuteScratch::new(config()).unwrap();
    assert_eq!(
        scratch_mismatch(permute_with(&mut scratch, 2, 2, Some(&MAP))),
        ScratchMismatch::NoRowBuffer
    );
}

#[test]
fn align_without_align_buffers() {
    let mut scratch = PermuteScratch::new(config()).unwrap();
    let ids = [0i32, 2];
    assert_eq!(
        scratch_mismatch(align(
            &mut scratch,
            &TopkIds::new(&ids, 2).unwrap(),
            Some(&MAP)
        )),
        ScratchMismatch::NoAlignBuffers
    );
}

#[test]
fn tensors_on_another_device() {
    let on_gpu = ScratchConfig::new(4, 2, 6, 4, Device::Cuda(0));
    let call = CallShape {
        num_tokens: 2,
        topk: 2,
        expert_map_len: Some(6),
        rows: None,
        align: false,
        devices: &[("hidden_states", Device::Cpu), ("topk_ids", Device::Cpu)],
    };
    assert_eq!(
        on_gpu.validate(&call),
        Err(ScratchMismatch::Device {
            tensor: "hidden_states",
            expected: Device::Cuda(0),
            got: Device::Cpu
        })
    );
    let call = CallShape {
        devices: &[
            ("hidden_states", Device::Cuda(0)),
            ("topk_ids", Device::Cuda(1)),
        ],
        ..call
    };
    assert!(matches!(
        on_gpu.validate(&call),
        Err(ScratchMismatch::Device {
            tensor: "topk_ids",
            ..
        })
    ));
}

#[test]
fn a_cuda_scratch_without_a_gpu_is_an_error_not_a_panic() {
    let scratch = PermuteScratch::new(ScratchConfig::new(4, 2, 6, 4, Device::Cuda(0)));
    match moe_runtime::cuda::CudaDevice::count() {
        Ok(count) if count > 0 => assert!(scratch.is_ok()),
        _ => assert!(matches!(
            scratch.unwrap_err(),
            MoeError::DeviceUnavailable {
                device: Device::Cuda(0),
                ..
            }
        )),
    }
    // An ordinal past the last device is unavailable on every machine.
    let scratch = PermuteScratch::new(ScratchConfig::new(4, 2, 6, 4, Device::Cuda(4096)));
    assert!(matches!(
        scratch.unwrap_err(),
        MoeError::DeviceUnavailable { .. }
    ));
}

#[test]
fn entries_over_i32_are_refused_before_the_token_limit() {
    // 2^30 tokens of top-2: N*K = 2^31 does not fit in i32. The shape alone is checked,
    // so no tensor of that size is needed.
    let call = CallShape {
        num_tokens: 1 << 30,
        topk: 2,
        expert_map_len: Some(6),
        rows: None,
        align: false,
        devices: &[],
    };
    assert_eq!(
        config().validate(&call),
        Err(ScratchMismatch::IndexOverflow {
            num_tokens: 1 << 30,
            topk: 2
        })
    );
    let call = CallShape {
        num_tokens: usize::MAX / 2,
        topk: 3,
        ..call
    };
    assert!(matches!(
        config().validate(&call),
        Err(ScratchMismatch::IndexOverflow { .. })
    ));
}

#[test]
fn configurations_that_cannot_be_built() {
    let check = |config: ScratchConfig| PermuteScratch::new(config).unwrap_err();
    let cpu = Device::Cpu;
    assert_eq!(
        check(ScratchConfig::new(4, 0, 6, 6, cpu)),
        ConfigError::ZeroTopk.into()
    );
    assert_eq!(
        check(ScratchConfig::new(4, 2, 0, 0, cpu)),
        ConfigError::ZeroExperts.into()
    );
    assert_eq!(
        check(ScratchConfig::new(4, 2, 6, 7, cpu)),
        ConfigError::LocalExperts {
            local: 7,
            global: 6
        }
        .into()
    );
    assert_eq!(
        check(ScratchConfig::new(4, 2, 6, 0, cpu)),
        ConfigError::LocalExperts {
            local: 0,
            global: 6
        }
        .into()
    );
    assert_eq!(
        check(ScratchConfig::new(4, 2, 1 << 31, 1, cpu)),
        ConfigError::TooManyExperts(1 << 31).into()
    );
    assert_eq!(
        check(config().with_rows(0, DType::F32)),
        ConfigError::ZeroHiddenSize.into()
    );
    assert_eq!(
        check(config().with_align_block_size(0)),
        ConfigError::ZeroBlockSize.into()
    );
    // 2^30 tokens of top-2 overflow i32 by themselves...
    assert_eq!(
        check(ScratchConfig::new(1 << 30, 2, 6, 4, cpu)),
        ConfigError::IndexOverflow { rows: 1 << 31 }.into()
    );
    // ...and 2^30 - 4 of top-2 fit, until align's padding is added.
    assert_eq!(
        check(ScratchConfig::new((1 << 30) - 4, 2, 6, 4, cpu).with_align_block_size(4)),
        ConfigError::IndexOverflow {
            rows: (1 << 31) - 8 + 4 * 3
        }
        .into()
    );
}

#[test]
fn a_scratch_larger_than_memory_is_an_error_not_an_abort() {
    // 2^20 rows of 2^30 f32: 4 PiB.
    let config = ScratchConfig::new(1 << 20, 1, 4, 4, Device::Cpu).with_rows(1 << 30, DType::F32);
    assert_eq!(
        PermuteScratch::new(config).unwrap_err(),
        MoeError::OutOfMemory {
            buffer: "permuted_hidden_states",
            bytes: 1 << 52
        }
    );
    // More bytes than usize can count: refused before anything is allocated.
    let config = ScratchConfig::new(1 << 20, 1, 4, 4, Device::Cpu).with_rows(1 << 62, DType::F32);
    assert_eq!(
        PermuteScratch::new(config).unwrap_err(),
        MoeError::SizeOverflow {
            quantity: "permuted_hidden_states bytes (rows * hidden_size * dtype size)",
            factors: vec![1 << 20, 1 << 62, 4]
        }
    );
    // Fits in usize, but more than any allocation may have.
    let config = ScratchConfig::new(1 << 20, 1, 4, 4, Device::Cpu).with_rows(1 << 41, DType::F32);
    assert_eq!(
        PermuteScratch::new(config).unwrap_err(),
        MoeError::OutOfMemory {
            buffer: "permuted_hidden_states",
            bytes: 1 << 63
        }
    );
}

#[test]
fn inconsistent_input_shapes() {
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    let data = hidden(3);
    let ids = [0i32, 2, 3, 5];
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), TopkIds::new(&ids, 2).unwrap())
        .with_expert_map(&MAP);
    assert!(matches!(
        error(permute(&mut scratch, &input)),
        MoeError::Shape {
            tensor: "hidden_states",
            len: 3,
            ..
        }
    ));
    // Scales the scratch was built for (the scratch is checked first), of 3 tokens.
    let config = config().with_rows(H, DType::BF16).with_scale_columns(1);
    let mut scratch = PermuteScratch::new(config).unwrap();
    let data = hidden(2);
    let scales = [1.0f32; 3];
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), TopkIds::new(&ids, 2).unwrap())
        .with_expert_map(&MAP)
        .with_scales(Scales::new(&scales, 1).unwrap());
    assert!(matches!(
        error(permute(&mut scratch, &input)),
        MoeError::Shape {
            tensor: "scales",
            ..
        }
    ));
}

#[test]
fn destinations_that_do_not_fit() {
    let mut scratch = PermuteScratch::new(config()).unwrap();
    let data = hidden(2);
    let ids = [0i32, 2, 3, 5];
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), TopkIds::new(&ids, 2).unwrap())
        .with_expert_map(&MAP);

    let mut small = vec![bf16::ZERO; 3 * H];
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut small, H).unwrap(),
        scales: None,
    };
    assert!(matches!(
        error(permute_into(&mut scratch, &input, dest)),
        MoeError::Shape {
            tensor: "permuted_hidden_states",
            ..
        }
    ));

    let mut other_dtype = vec![0.0f32; 4 * H];
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut other_dtype, H).unwrap(),
        scales: None,
    };
    assert!(matches!(
        error(permute_into(&mut scratch, &input, dest)),
        MoeError::Dtype {
            expected: DType::BF16,
            got: DType::F32,
            ..
        }
    ));

    let mut rows = vec![bf16::ZERO; 4 * H];
    let mut scales = vec![0.0f32; 4];
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut rows, H).unwrap(),
        scales: Some(&mut scales),
    };
    assert!(matches!(
        error(permute_into(&mut scratch, &input, dest)),
        MoeError::Shape {
            tensor: "permuted_scales",
            ..
        }
    ));
}

#[test]
fn misaligned_bytes_cannot_be_viewed_as_wider_elements() {
    let floats = [1.5f32, 2.5, 3.5, 4.5, 5.5];
    let bytes = Rows::new(&floats, 1).unwrap().as_bytes();
    let rows = Rows::from_bytes(&bytes[2..18], DType::F32, 2).unwrap();
    assert_eq!(
        rows.as_slice::<f32>().unwrap_err(),
        MoeError::Misaligned {
            tensor: "rows",
            dtype: DType::F32
        }
    );
}

#[test]
fn unpermute_refuses_bad_indices_and_shapes() {
    let permuted: Vec<f32> = (0..4 * H).map(|i| i as f32 + 0.5).collect();
    let inv = [0i32, 1, 2, 3];
    let weights = [0.5f32, 0.25, 0.125, 1.0];
    let offsets = [0i64, 2, 4];
    let base = UnpermuteInput {
        permuted_hidden_states: &permuted,
        hidden_size: H,
        inv_permuted_idx: &inv,
        expert_first_token_offset: &offsets,
        topk_weights: &weights,
        topk: 2,
    };
    assert_eq!(cpu::allocating::unpermute(&base).unwrap().len(), 2 * H);

    let negative = [0i32, -1, 2, 3];
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            inv_permuted_idx: &negative,
            ..base
        })),
        MoeError::IndexOutOfRange {
            tensor: "inv_permuted_idx",
            position: 1,
            value: -1,
            ..
        }
    ));
    let too_many_valid = [0i64, 2, 5];
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            expert_first_token_offset: &too_many_valid,
            ..base
        })),
        MoeError::IndexOutOfRange {
            tensor: "expert_first_token_offset",
            value: 5,
            ..
        }
    ));
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            expert_first_token_offset: &[],
            ..base
        })),
        MoeError::Shape {
            tensor: "expert_first_token_offset",
            ..
        }
    ));
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            topk_weights: &weights[..3],
            ..base
        })),
        MoeError::Shape {
            tensor: "topk_weights",
            ..
        }
    ));
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            topk: 3,
            ..base
        })),
        MoeError::Shape {
            tensor: "inv_permuted_idx",
            ..
        }
    ));
    assert!(matches!(
        error(cpu::allocating::unpermute(&UnpermuteInput {
            hidden_size: 3,
            ..base
        })),
        MoeError::Shape {
            tensor: "permuted_hidden_states",
            ..
        }
    ));
    let mut out = vec![0.0f32; H];
    assert!(matches!(
        error(cpu::unpermute_into(&base, &mut out)),
        MoeError::Shape {
            tensor: "output",
            ..
        }
    ));
}

const ROW_BYTES: &str = "row bytes (hidden_size * dtype size)";

fn row_overflow(hidden_size: usize, dtype: DType) -> MoeError {
    MoeError::SizeOverflow {
        quantity: ROW_BYTES,
        factors: vec![hidden_size, dtype.size_bytes()],
    }
}

#[test]
fn views_refuse_a_row_size_that_overflows() {
    // Empty data is whole rows of any size: only the row's byte count can refuse it.
    let mut empty = [0.0f32; 0];
    let mut no_bytes = [0u8; 0];
    assert_eq!(
        Rows::new(&empty, usize::MAX).unwrap_err(),
        row_overflow(usize::MAX, DType::F32)
    );
    assert_eq!(
        RowsMut::new(&mut empty, usize::MAX / 2).unwrap_err(),
        row_overflow(usize::MAX / 2, DType::F32)
    );
    assert_eq!(
        Rows::from_bytes(&no_bytes, DType::BF16, usize::MAX / 2 + 1).unwrap_err(),
        row_overflow(usize::MAX / 2 + 1, DType::BF16)
    );
    assert_eq!(
        RowsMut::from_bytes(&mut no_bytes, DType::F16, usize::MAX).unwrap_err(),
        row_overflow(usize::MAX, DType::F16)
    );
    // A spec can be built by hand: its row bytes are checked too.
    let spec = RowSpec {
        hidden_size: usize::MAX,
        dtype: DType::F32,
        scale_columns: 0,
    };
    assert_eq!(
        spec.row_bytes().unwrap_err(),
        row_overflow(usize::MAX, DType::F32)
    );
    assert_eq!(
        RowSpec {
            hidden_size: 3,
            ..spec
        }
        .row_bytes(),
        Ok(12)
    );

    // The largest rows that fit are views like any other: every accessor answers.
    let rows = Rows::from_bytes(&no_bytes, DType::F32, usize::MAX / 4).unwrap();
    assert_eq!((rows.num_rows(), rows.row_bytes()), (0, usize::MAX / 4 * 4));
    let rows = RowsMut::from_bytes(&mut no_bytes, DType::Fp8E4M3, usize::MAX).unwrap();
    assert_eq!((rows.num_rows(), rows.hidden_size()), (0, usize::MAX));
}

#[test]
fn a_call_of_no_tokens_with_the_largest_rows_moves_nothing() {
    let h = usize::MAX / 4;
    let no_rows: [f32; 0] = [];
    let no_ids: [i32; 0] = [];
    let input = PermuteInput::new(
        Rows::new(&no_rows, h).unwrap(),
        TopkIds::new(&no_ids, 2).unwrap(),
    );
    // A scratch for no tokens owns no row bytes, however wide its rows.
    let config = ScratchConfig::new(0, 2, 4, 4, Device::Cpu).with_rows(h, DType::F32);
    let mut scratch = PermuteScratch::new(config).unwrap();
    let out = permute(&mut scratch, &input).unwrap();
    assert_eq!(out.permuted_hidden_states.num_rows(), 0);
    assert_eq!(out.expert_first_token_offset, &[0; 5]);
    assert!(out.inv_permuted_idx.is_empty() && out.permuted_idx.is_empty());
    let mut dest: [f32; 0] = [];
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut dest, h).unwrap(),
        scales: None,
    };
    let out = permute_into(&mut scratch, &input, dest).unwrap();
    assert_eq!(out.num_valid_rows(), 0);
    // A scratch for tokens of those rows would need more bytes than usize counts.
    let config = ScratchConfig::new(4, 2, 4, 4, Device::Cpu).with_rows(h, DType::F32);
    assert_eq!(
        PermuteScratch::new(config).unwrap_err(),
        MoeError::SizeOverflow {
            quantity: "permuted_hidden_states bytes (rows * hidden_size * dtype size)",
            factors: vec![8, h, 4]
        }
    );
}

#[test]
fn max_entries_is_checked_for_any_configuration() {
    assert_eq!(config().max_entries(), Ok(8));
    let huge = ScratchConfig::new(usize::MAX, 2, 6, 4, Device::Cpu);
    assert_eq!(
        huge.max_entries(),
        Err(MoeError::SizeOverflow {
            quantity: "max entries (max_num_tokens * topk)",
            factors: vec![usize::MAX, 2]
        })
    );
    assert_eq!(
        huge.check(),
        Err(ConfigError::IndexOverflow {
            rows: usize::MAX as u128 * 2
        })
    );
    // Every count at its largest: the check answers instead of overflowing.
    let largest = ScratchConfig::new(
        usize::MAX,
        usize::MAX,
        i32::MAX as usize,
        i32::MAX as usize,
        Device::Cpu,
    )
    .with_align_block_size(usize::MAX);
    assert_eq!(
        largest.check(),
        Err(ConfigError::IndexOverflow { rows: u128::MAX })
    );
    assert!(matches!(
        PermuteScratch::new(largest).unwrap_err(),
        MoeError::Config(ConfigError::IndexOverflow { .. })
    ));
}

/// An unpermute of `num_tokens` tokens of top-1, all dropped, with rows of
/// `hidden_size` f32: no expert output at all, so any `hidden_size` is consistent.
fn dropped_tokens<'a>(
    inv: &'a [i32],
    weights: &'a [f32],
    hidden_size: usize,
) -> UnpermuteInput<'a, f32> {
    UnpermuteInput {
        permuted_hidden_states: &[],
        hidden_size,
        inv_permuted_idx: inv,
        expert_first_token_offset: &[0, 0],
        topk_weights: weights,
        topk: 1,
    }
}

#[test]
fn an_unpermute_output_too_large_to_count_or_allocate_is_an_error() {
    let (inv, weights) = ([0i32, 0], [0.5f32, 0.5]);
    // N*H = 2 * usize::MAX does not fit in usize.
    let input = dropped_tokens(&inv, &weights, usize::MAX);
    let overflow = MoeError::SizeOverflow {
        quantity: "unpermute output elements (N * H)",
        factors: vec![2, usize::MAX],
    };
    assert_eq!(error(cpu::unpermute_into(&input, &mut [])), overflow);
    assert_eq!(error(cpu::allocating::unpermute(&input)), overflow);
    // It fits, but no machine has the memory: an error, as from a scratch, not an
    // abort.
    assert_eq!(
        error(cpu::allocating::unpermute(&dropped_tokens(
            &inv,
            &weights,
            1 << 49
        ))),
        MoeError::OutOfMemory {
            buffer: "the unpermute output",
            bytes: 1 << 52
        }
    );
    assert!(matches!(
        error(cpu::allocating::unpermute(&dropped_tokens(
            &inv,
            &weights,
            1 << 61
        ))),
        MoeError::OutOfMemory { .. }
    ));
    // And the allocating path still computes: all dropped, all zeros.
    let out = cpu::allocating::unpermute(&dropped_tokens(&inv, &weights, 3)).unwrap();
    assert_eq!(out, [0.0; 6]);
}

/// `len` zero values of `T` in read-only pages of their own that are never touched:
/// address space, neither memory nor swap (Linux does not account read-only private
/// mappings, so this works on machines with less memory than `len` values take).
#[cfg(unix)]
struct ZeroPages {
    address: *mut libc::c_void,
    bytes: usize,
}

#[cfg(unix)]
impl ZeroPages {
    fn new(bytes: usize) -> Self {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; no memory
        // the program uses is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED, "mapping {bytes} bytes of zeros");
        Self { address, bytes }
    }

    fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        // SAFETY: the mapping is readable, zero-filled (a valid value of any `Pod`
        // type), page-aligned (aligned for any `T`), `bytes` long, and lives as long
        // as `self`.
        unsafe { std::slice::from_raw_parts(self.address.cast(), self.bytes / size_of::<T>()) }
    }
}

#[cfg(unix)]
impl Drop for ZeroPages {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, which no borrow outlives.
        unsafe { libc::munmap(self.address, self.bytes) };
    }
}

#[test]
#[cfg(unix)]
fn index_overflow_is_reported_before_the_shapes() {
    // 2^31 ids of top-2: N = 2^30, N*K = 2^31 does not fit in i32. The hidden states
    // hold one row, which is wrong too: docs/contract.md puts IndexOverflow first.
    let pages = ZeroPages::new(size_of::<i32>() << 31);
    let ids = TopkIds::new(pages.as_slice::<i32>(), 2).unwrap();
    assert_eq!(ids.num_tokens(), 1 << 30);
    let data = hidden(1);
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), ids).with_expert_map(&MAP);
    let overflow = ScratchMismatch::IndexOverflow {
        num_tokens: 1 << 30,
        topk: 2,
    };
    let mut scratch = PermuteScratch::new(config().with_rows(H, DType::BF16)).unwrap();
    assert_eq!(scratch_mismatch(permute(&mut scratch, &input)), overflow);
    let mut rows = vec![bf16::ZERO; 8 * H];
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut rows, H).unwrap(),
        scales: None,
    };
    assert_eq!(
        scratch_mismatch(permute_into(&mut scratch, &input, dest)),
        overflow
    );
    // With the row count right, the shape is the first mismatch of a call that fits.
    let ids = [0i32, 2, 3, 5];
    let input = PermuteInput::new(Rows::new(&data, H).unwrap(), TopkIds::new(&ids, 2).unwrap())
        .with_expert_map(&MAP);
    assert!(matches!(
        error(permute(&mut scratch, &input)),
        MoeError::Shape {
            tensor: "hidden_states",
            len: 1,
            ..
        }
    ));
}

#[test]
fn device_views_and_layouts_refuse_sizes_that_overflow() {
    use moe_runtime::cuda::{DeviceRows, DeviceView};
    // SAFETY: a view of no elements: there is nothing it could read.
    let nothing = unsafe { DeviceView::<u8>::from_raw(0, 0, 0) };
    assert!(matches!(
        DeviceRows::from_bytes(nothing, DType::BF16, usize::MAX),
        Err(MoeError::SizeOverflow { .. })
    ));
    // A CUDA scratch's layout is computed without a GPU: rows whose bytes overflow are
    // refused as they are when a scratch is built.
    let config =
        ScratchConfig::new(4, 2, 6, 6, Device::Cuda(0)).with_rows(usize::MAX / 2, DType::F32);
    assert!(matches!(
        PermuteScratch::cuda_memory_layout(&config),
        Err(MoeError::SizeOverflow { .. })
    ));
    let fits = ScratchConfig::new(4, 2, 6, 6, Device::Cuda(0)).with_rows(8, DType::BF16);
    let layout = PermuteScratch::cuda_memory_layout(&fits).unwrap();
    assert_eq!(layout.alignment, moe_runtime::cuda::SCRATCH_ALIGNMENT);
    // At least the rows (8 entries of 16 bytes) and the index buffers.
    assert!(layout.bytes >= 8 * 16 + 2 * 8 * 4, "{layout:?}");
}
