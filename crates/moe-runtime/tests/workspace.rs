//! One scratch shared by many layers: it grows while unlocked and never once locked.

use moe_runtime::cpu::{self, PermuteDest, PermuteInput};
use moe_runtime::{
    ConfigError, DType, Device, MoeError, Rows, RowsMut, ScratchConfig, ScratchWorkspace, TopkIds,
    bf16,
};

const H: usize = 64;

fn layer_config(max_num_tokens: usize) -> ScratchConfig {
    ScratchConfig::new(max_num_tokens, 2, 8, 8, Device::Cpu).with_rows(H, DType::BF16)
}

/// Permutes `num_tokens` tokens through the workspace's scratch; returns the address
/// of the permuted rows and the first valid row's source token.
fn run_layer(
    workspace: &mut ScratchWorkspace,
    config: &ScratchConfig,
    num_tokens: usize,
    seed: u32,
) -> Result<(usize, Vec<bf16>, Vec<bf16>), MoeError> {
    let hidden: Vec<bf16> = (0..num_tokens * H)
        .map(|i| {
            bf16::from_f32(
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 7.0 - 50.0,
            )
        })
        .collect();
    let ids: Vec<i32> = (0..num_tokens * 2)
        .map(|i| ((i as u32).wrapping_mul(40503).wrapping_add(seed) % 8) as i32)
        .collect();
    let scratch = workspace.get(config)?;
    let input = PermuteInput::new(Rows::new(&hidden, H)?, TopkIds::new(&ids, 2)?);
    let out = cpu::permute(scratch, &input)?;
    let first_token = out.permuted_idx[0] as usize / 2;
    let first_row = out.permuted_hidden_states.as_slice::<bf16>()?[..H].to_vec();
    Ok((
        out.permuted_hidden_states.as_bytes().as_ptr() as usize,
        first_row,
        hidden[first_token * H..(first_token + 1) * H].to_vec(),
    ))
}

#[test]
fn layers_share_one_scratch_and_its_memory() {
    let mut workspace = ScratchWorkspace::new();
    let config = layer_config(32);
    let mut addresses = Vec::new();
    for layer in 0..6 {
        let (address, row, expected) = run_layer(&mut workspace, &config, 32, layer).unwrap();
        assert_eq!(row, expected, "layer {layer}");
        addresses.push(address);
    }
    assert!(
        addresses.iter().all(|&a| a == addresses[0]),
        "{addresses:x?}"
    );
    let scratch = workspace.scratch().unwrap();
    assert_eq!(scratch.config(), &config);
    // One scratch's worth of memory, however many layers used it.
    assert!(scratch.allocated_bytes() >= 32 * 2 * H * 2);
    assert!(scratch.allocated_bytes() < 2 * 32 * 2 * H * 2);
}

#[test]
fn grows_while_unlocked_and_refuses_once_locked() {
    let mut workspace = ScratchWorkspace::new();
    run_layer(&mut workspace, &layer_config(16), 16, 1).unwrap();
    let small = workspace.scratch().unwrap().allocated_bytes();

    // Warm-up meets a larger batch: the scratch is rebuilt for it.
    let (_, row, expected) = run_layer(&mut workspace, &layer_config(64), 64, 2).unwrap();
    assert_eq!(row, expected);
    assert_eq!(workspace.scratch().unwrap().config().max_num_tokens, 64);
    assert!(workspace.scratch().unwrap().allocated_bytes() > small);

    // A smaller request is served by the larger scratch without a rebuild.
    let (before, ..) = run_layer(&mut workspace, &layer_config(64), 64, 3).unwrap();
    workspace.lock();
    assert!(workspace.is_locked());
    let (after, row, expected) = run_layer(&mut workspace, &layer_config(8), 8, 4).unwrap();
    assert_eq!(row, expected);
    assert_eq!(before, after);

    // Growth after locking is an error; the scratch is kept as it was.
    let error = run_layer(&mut workspace, &layer_config(65), 65, 5).unwrap_err();
    assert!(matches!(error, MoeError::WorkspaceLocked { .. }), "{error}");
    assert_eq!(workspace.scratch().unwrap().config().max_num_tokens, 64);

    workspace.unlock();
    run_layer(&mut workspace, &layer_config(65), 65, 6).unwrap();
    assert_eq!(workspace.scratch().unwrap().config().max_num_tokens, 65);
}

#[test]
fn locked_before_any_scratch_was_built() {
    let mut workspace = ScratchWorkspace::new();
    workspace.lock();
    assert!(matches!(
        workspace.get(&layer_config(4)).unwrap_err(),
        MoeError::WorkspaceLocked { .. }
    ));
}

#[test]
fn users_with_different_buffers_get_their_union() {
    let mut workspace = ScratchWorkspace::new();
    let index_only = ScratchConfig::new(100, 2, 8, 8, Device::Cpu).with_align_block_size(16);
    workspace.get(&index_only).unwrap();
    workspace.get(&layer_config(40)).unwrap();
    let config = workspace.scratch().unwrap().config().clone();
    assert_eq!(config.max_num_tokens, 100);
    assert_eq!(config.align_block_size, Some(16));
    assert_eq!(config.rows, layer_config(40).rows);
    assert!(config.covers(&index_only) && config.covers(&layer_config(40)));
}

#[test]
fn users_that_disagree_are_refused() {
    let mut workspace = ScratchWorkspace::new();
    workspace.get(&layer_config(16)).unwrap();
    let other_topk = ScratchConfig::new(16, 4, 8, 8, Device::Cpu);
    assert_eq!(
        workspace.get(&other_topk).unwrap_err(),
        MoeError::WorkspaceConflict {
            field: "topk",
            current: "2".into(),
            requested: "4".into()
        }
    );
    let other_rows = ScratchConfig::new(16, 2, 8, 8, Device::Cpu).with_rows(H, DType::F16);
    assert!(matches!(
        workspace.get(&other_rows).unwrap_err(),
        MoeError::WorkspaceConflict { field: "rows", .. }
    ));
    let other_block = layer_config(16).with_align_block_size(8);
    workspace.get(&other_block).unwrap();
    assert!(matches!(
        workspace
            .get(&layer_config(16).with_align_block_size(4))
            .unwrap_err(),
        MoeError::WorkspaceConflict {
            field: "align_block_size",
            ..
        }
    ));
}

/// Permutes 3 tokens of top-2 into caller-owned rows through the workspace's scratch;
/// returns the address of its `inv_permuted_idx` and the permuted rows.
fn run_into(workspace: &mut ScratchWorkspace, config: &ScratchConfig) -> (usize, Vec<f32>) {
    let hidden: Vec<f32> = (0..3 * 4).map(|i| i as f32).collect();
    // Token 0 to experts 5 and 1, token 1 to 1 and 9 (dropped), token 2 to 0 and 5.
    let ids = [5i64, 1, 1, 9, 0, 5];
    let mut rows = vec![0.0f32; 6 * 4];
    let scratch = workspace.get(config).unwrap();
    let input = PermuteInput::new(
        Rows::new(&hidden, 4).unwrap(),
        TopkIds::new(&ids, 2).unwrap(),
    );
    let dest = PermuteDest {
        hidden_states: RowsMut::new(&mut rows, 4).unwrap(),
        scales: None,
    };
    let out = cpu::permute_into(scratch, &input, dest).unwrap();
    assert_eq!(out.expert_first_token_offset, &[0, 1, 3, 3, 3, 3, 5, 5, 5]);
    let address = out.inv_permuted_idx.as_ptr() as usize;
    (address, rows[..5 * 4].to_vec())
}

#[test]
fn a_request_that_cannot_be_served_leaves_the_scratch_to_the_others() {
    let mut workspace = ScratchWorkspace::new();
    let shared = ScratchConfig::new(16, 2, 8, 8, Device::Cpu);
    let (address, rows) = run_into(&mut workspace, &shared);
    // Rows by expert: 0 <- token 2; 1 <- tokens 0, 1; 5 <- tokens 0, 2.
    let expected: Vec<f32> = [2, 0, 1, 0, 2]
        .iter()
        .flat_map(|&t| (0..4).map(move |c| (t * 4 + c) as f32))
        .collect();
    assert_eq!(rows, expected);

    // Configurations that cannot be built are refused while the scratch is in place:
    // the other users keep the very same memory.
    let zero_block = ScratchConfig::new(32, 2, 8, 8, Device::Cpu).with_align_block_size(0);
    assert_eq!(
        workspace.get(&zero_block).unwrap_err(),
        ConfigError::ZeroBlockSize.into()
    );
    let too_many = ScratchConfig::new(1 << 40, 2, 8, 8, Device::Cpu);
    assert_eq!(
        workspace.get(&too_many).unwrap_err(),
        ConfigError::IndexOverflow { rows: 1 << 41 }.into()
    );
    let wide_rows =
        ScratchConfig::new(16, 2, 8, 8, Device::Cpu).with_rows(usize::MAX / 2, DType::F32);
    assert!(matches!(
        workspace.get(&wide_rows).unwrap_err(),
        MoeError::SizeOverflow { .. }
    ));
    assert_eq!(workspace.scratch().unwrap().config(), &shared);
    assert_eq!(
        run_into(&mut workspace, &shared),
        (address, expected.clone())
    );

    // A configuration that can be built but not had (4 PiB of rows): the old scratch
    // was released to make room, and is built again for the others.
    let huge_rows = ScratchConfig::new(16, 2, 8, 8, Device::Cpu).with_rows(1 << 45, DType::F32);
    assert_eq!(
        workspace.get(&huge_rows).unwrap_err(),
        MoeError::OutOfMemory {
            buffer: "permuted_hidden_states",
            bytes: 1 << 52
        }
    );
    assert_eq!(workspace.scratch().unwrap().config(), &shared);
    assert_eq!(run_into(&mut workspace, &shared).1, expected);
}
