//! permute, unpermute and align on candle tensors (CPU, and CUDA with feature `cuda`) against references written with
//! candle's own ops, on random inputs: every row dtype, every id type, views with a
//! layout offset; and the errors a caller gets for what the ops cannot take.

use candle_core::{DType, Device, IndexOp, Tensor};
use moe_candle::{Scratch, align, permute, unpermute};

mod common;

/// xorshift values in `[0, 1)`.
fn units(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `[N, K]` distinct random experts per token.
fn random_ids(n: usize, k: usize, e: usize, seed: u64) -> Vec<u32> {
    let mut unit = units(seed);
    let mut ids = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k {
            let x = (unit() * e as f32) as u32 % e as u32;
            if !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        ids.extend(chosen);
    }
    ids
}

/// The entries `t*K + k` in permute's order: by expert, then by entry.
fn reference_order(ids: &[u32], e: usize) -> Vec<u32> {
    let mut order = Vec::new();
    for x in 0..e as u32 {
        order.extend((0..ids.len() as u32).filter(|&i| ids[i as usize] == x));
    }
    order
}

#[test]
fn permute_groups_rows_as_index_select_does_for_every_dtype_and_id_type() {
    for dev in common::devices() {
        permute_groups_rows_as_index_select_does_for_every_dtype_and_id_type_on(&dev);
    }
}

fn permute_groups_rows_as_index_select_does_for_every_dtype_and_id_type_on(dev: &Device) {
    let (n, k, e, h) = (37, 4, 9, 24);
    let ids = random_ids(n, k, e, 5);
    let order = reference_order(&ids, e);
    let tokens: Vec<u32> = order.iter().map(|&i| i / k as u32).collect();
    let mut unit = units(11);
    // A larger tensor: the call reads a view 3 rows in.
    let big: Vec<f32> = (0..(n + 5) * h).map(|_| unit() * 4.0 - 2.0).collect();
    let big = Tensor::from_vec(big, (n + 5, h), dev).unwrap();
    let mut scratch = Scratch::new(dev, 64, k, e, None).unwrap();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let hidden = big.to_dtype(dtype).unwrap().narrow(0, 3, n).unwrap();
        let want = hidden
            .index_select(&Tensor::new(tokens.as_slice(), dev).unwrap(), 0)
            .unwrap();
        let ids_u32 = Tensor::from_vec(ids.clone(), (n, k), dev).unwrap();
        for id_type in [DType::U32, DType::I64] {
            let topk_ids = ids_u32.to_dtype(id_type).unwrap();
            let out = permute(&mut scratch, &hidden, &topk_ids).unwrap();
            assert_eq!(out.permuted_hidden_states.dtype(), dtype);
            let diff = (out.permuted_hidden_states.to_dtype(DType::F32).unwrap()
                - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert_eq!(diff, 0.0, "{dtype:?} {id_type:?}");
            let permuted_idx = out.permuted_idx.to_vec1::<i32>().unwrap();
            let order_i32: Vec<i32> = order.iter().map(|&i| i as i32).collect();
            assert_eq!(permuted_idx, order_i32);
            let inv = out
                .inv_permuted_idx
                .flatten_all()
                .unwrap()
                .to_vec1::<i32>()
                .unwrap();
            for (row, &entry) in order.iter().enumerate() {
                assert_eq!(inv[entry as usize], row as i32);
            }
            let offsets = out.expert_first_token_offset.to_vec1::<i64>().unwrap();
            for x in 0..e {
                let count = ids.iter().filter(|&&i| i as usize == x).count() as i64;
                assert_eq!(offsets[x + 1] - offsets[x], count);
            }
        }
    }
    // i32 ids too.
    let hidden = big.narrow(0, 0, n).unwrap();
    let topk_ids = Tensor::from_vec(ids.clone(), (n, k), dev)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let a = permute(&mut scratch, &hidden, &topk_ids).unwrap();
    let ids_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let topk_ids = Tensor::from_vec(ids_i32, (n, k), dev).unwrap();
    let b = permute(&mut scratch, &hidden, &topk_ids).unwrap();
    assert_eq!(
        a.permuted_idx.to_vec1::<i32>().unwrap(),
        b.permuted_idx.to_vec1::<i32>().unwrap()
    );
}

#[test]
fn unpermute_is_the_weighted_sum_candle_computes() {
    for dev in common::devices() {
        unpermute_is_the_weighted_sum_candle_computes_on(&dev);
    }
}

fn unpermute_is_the_weighted_sum_candle_computes_on(dev: &Device) {
    let (n, k, e, h) = (29, 3, 7, 40);
    let ids = random_ids(n, k, e, 8);
    let mut unit = units(21);
    let hidden: Vec<f32> = (0..n * h).map(|_| unit() * 4.0 - 2.0).collect();
    let weights: Vec<f32> = (0..n * k).map(|_| unit()).collect();
    let weights = Tensor::from_vec(weights, (n, k), dev).unwrap();
    let mut scratch = Scratch::new(dev, n, k, e, None).unwrap();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let hidden = Tensor::from_vec(hidden.clone(), (n, h), dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let topk_ids = Tensor::from_vec(ids.clone(), (n, k), dev).unwrap();
        let routed = permute(&mut scratch, &hidden, &topk_ids).unwrap();
        // "Expert outputs": the permuted rows scaled by their row number, so every row
        // differs.
        let rows = routed.permuted_hidden_states.dim(0).unwrap();
        let scale: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 / 16.0).collect();
        let expert_out = routed
            .permuted_hidden_states
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&Tensor::from_vec(scale, (rows, 1), dev).unwrap())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let got = unpermute(
            &scratch,
            &expert_out,
            &routed.inv_permuted_idx,
            &routed.expert_first_token_offset,
            &weights,
        )
        .unwrap();
        assert_eq!((got.dims(), got.dtype()), (&[n, h][..], dtype));
        // The reference: gather each token's K rows, weigh them, sum over K, in f32.
        // (candle's CUDA backend has no i32 to u32 cast: through the host.)
        let inv: Vec<u32> = routed
            .inv_permuted_idx
            .flatten_all()
            .unwrap()
            .to_vec1::<i32>()
            .unwrap()
            .iter()
            .map(|&r| r as u32)
            .collect();
        let inv = Tensor::new(inv.as_slice(), dev).unwrap();
        let want = expert_out
            .to_dtype(DType::F32)
            .unwrap()
            .index_select(&inv, 0)
            .unwrap()
            .reshape((n, k, h))
            .unwrap()
            .broadcast_mul(&weights.unsqueeze(2).unwrap())
            .unwrap()
            .sum(1)
            .unwrap();
        let got = got.to_dtype(DType::F32).unwrap();
        // One rounding to the dtype, against a sum in another order: within 2^-7
        // relative for bf16, 2^-10 for f16, 1e-6 for f32.
        let tolerance = match dtype {
            DType::BF16 => 1.0 / 128.0,
            DType::F16 => 1.0 / 1024.0,
            _ => 1e-6,
        };
        let error = ((&got - &want).unwrap().abs().unwrap()
            / (want.abs().unwrap() + 1e-3).unwrap())
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(error <= tolerance, "{dtype:?}: relative error {error}");
        let total = got
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(total > 1.0, "{dtype:?}: the output is not all zeros");
    }
}

#[test]
fn align_pads_each_expert_group_to_the_block_size() {
    for dev in common::devices() {
        align_pads_each_expert_group_to_the_block_size_on(&dev);
    }
}

fn align_pads_each_expert_group_to_the_block_size_on(dev: &Device) {
    let (n, k, e, block) = (21, 2, 5, 4);
    let ids = random_ids(n, k, e, 3);
    let mut scratch = Scratch::new(dev, n, k, e, Some(block)).unwrap();
    let topk_ids = Tensor::from_vec(ids.clone(), (n, k), dev).unwrap();
    let out = align(&mut scratch, &topk_ids).unwrap();
    let sorted = out.sorted_ids.to_vec1::<i32>().unwrap();
    let experts = out.block_expert_ids.to_vec1::<i32>().unwrap();
    let used = out.num_rows_post_padded.to_vec1::<i32>().unwrap()[0] as usize;
    assert_eq!(out.block_size, block);
    assert_eq!(used % block, 0);
    assert!(used >= n * k);
    let mut seen = vec![false; n * k];
    for (b, chunk) in sorted[..used].chunks(block).enumerate() {
        for &entry in chunk {
            if entry as usize == n * k {
                continue;
            }
            assert_eq!(ids[entry as usize] as i32, experts[b], "block {b}");
            assert!(!seen[entry as usize]);
            seen[entry as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "every entry is placed once");
}

#[test]
fn what_the_ops_cannot_take_is_an_error_with_the_reason() {
    for dev in common::devices() {
        what_the_ops_cannot_take_is_an_error_with_the_reason_on(&dev);
    }
}

fn what_the_ops_cannot_take_is_an_error_with_the_reason_on(dev: &Device) {
    let mut scratch = Scratch::new(dev, 8, 2, 4, None).unwrap();
    let hidden = Tensor::ones((8, 16), DType::F32, dev).unwrap();
    let ids = Tensor::from_vec(
        vec![0u32, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
        (8, 2),
        dev,
    )
    .unwrap();
    let message = |r: candle_core::Result<moe_candle::Permuted>| r.unwrap_err().to_string();
    // An id outside 0..E drops its entry (the contract), including u32 ids of 2^31
    // and more: no row, and no share of the output.
    for bad in [4u32, 1 << 31, u32::MAX] {
        let mut v: Vec<u32> = (0..16).map(|i| i % 4).collect();
        v[5] = bad;
        let bad_ids = Tensor::from_vec(v, (8, 2), dev).unwrap();
        let routed = permute(&mut scratch, &hidden, &bad_ids).unwrap();
        let offsets = routed.expert_first_token_offset.to_vec1::<i64>().unwrap();
        assert_eq!(offsets[4], 15, "{bad}: one entry dropped");
        let inv = routed
            .inv_permuted_idx
            .flatten_all()
            .unwrap()
            .to_vec1::<i32>()
            .unwrap();
        assert_eq!(inv[5], 16, "{bad}: the dropped entry's row is N*K");
    }
    // Not contiguous.
    let t = Tensor::ones((16, 8), DType::F32, dev).unwrap().t().unwrap();
    assert!(message(permute(&mut scratch, &t, &ids)).contains("contiguous"));
    // More tokens than the scratch was built for.
    let many = Tensor::ones((9, 16), DType::F32, dev).unwrap();
    let many_ids = Tensor::zeros((9, 2), DType::U32, dev).unwrap();
    assert!(permute(&mut scratch, &many, &many_ids).is_err());
    // Rows and ids that disagree on N; ids of a float type; rows of an integer type.
    assert!(permute(&mut scratch, &hidden.i(..7).unwrap(), &ids).is_err());
    let float_ids = ids.to_dtype(DType::F32).unwrap();
    assert!(message(permute(&mut scratch, &hidden, &float_ids)).contains("topk_ids"));
    let int_rows = hidden.to_dtype(DType::U8).unwrap();
    assert!(message(permute(&mut scratch, &int_rows, &ids)).contains("hidden_states"));
    // unpermute with offsets of the wrong type.
    let routed = permute(&mut scratch, &hidden, &ids).unwrap();
    let weights = Tensor::ones((8, 2), DType::F32, dev).unwrap();
    let offsets = routed
        .expert_first_token_offset
        .to_dtype(DType::U32)
        .unwrap();
    let error = unpermute(
        &scratch,
        &routed.permuted_hidden_states,
        &routed.inv_permuted_idx,
        &offsets,
        &weights,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("expert_first_token_offset"),
        "{error}"
    );
    // A negative row index: an error inline on the CPU; on CUDA the device records it
    // in the scratch's status block, read by check_status, or inline in checked mode,
    // with the CPU's message.
    let mut inv = routed
        .inv_permuted_idx
        .flatten_all()
        .unwrap()
        .to_vec1::<i32>()
        .unwrap();
    inv[3] = -2;
    let bad_inv = Tensor::from_vec(inv, (8, 2), dev).unwrap();
    let call = |scratch: &Scratch, on: &Device| {
        let to = |t: &Tensor| t.to_device(on).unwrap();
        unpermute(
            scratch,
            &to(&routed.permuted_hidden_states),
            &to(&bad_inv),
            &to(&routed.expert_first_token_offset),
            &to(&weights),
        )
    };
    let cpu_scratch = Scratch::new(&Device::Cpu, 8, 2, 4, None).unwrap();
    let cpu_error = common::message(&call(&cpu_scratch, &Device::Cpu).unwrap_err());
    assert!(cpu_error.contains("inv_permuted_idx"), "{cpu_error}");
    if dev.is_cuda() {
        call(&scratch, dev).unwrap();
        let recorded = common::message(&scratch.check_status().unwrap_err());
        assert_eq!(recorded, cpu_error);
        scratch.check_status().unwrap();
        scratch.set_checked(true);
        assert_eq!(
            common::message(&call(&scratch, dev).unwrap_err()),
            cpu_error
        );
        scratch.set_checked(false);
        // A tensor on another device than the scratch.
        let on_cpu = hidden.to_device(&Device::Cpu).unwrap();
        assert!(message(permute(&mut scratch, &on_cpu, &ids)).contains("hidden_states is on"));
    }
}
