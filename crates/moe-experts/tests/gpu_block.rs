//! The MoE block on a CUDA device against the CPU block, on random weights and
//! inputs; and the lazy, shared permute scratch on the device.
//!
//! Without a GPU every test prints why and passes; with `MOE_REQUIRE_GPU=1` a missing
//! GPU fails them.

use half::bf16;
use moe_experts::cuda::{add_bf16, router_grouped, router_topk, silu_mul};
use moe_experts::{
    CpuMoeBlock, CudaMoeBlock, ExpertsError, ExpertsKind, GroupedRouting, MoeConfig, MoeWeights,
    Routing, SharedWorkspace,
};
use moe_runtime::cuda::{
    self, DeviceBuffer, DeviceExpertIds, DevicePermuteInput, DeviceRows, DeviceTopkIds,
};

mod support;
use support::gpu;

fn random_hidden(tokens: usize, h: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed | 1;
    (0..tokens * h)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn configs() -> Vec<MoeConfig> {
    vec![
        MoeConfig {
            hidden_size: 256,
            intermediate_size: 512,
            num_experts: 8,
            top_k: 2,
            norm_topk_prob: true,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        MoeConfig {
            hidden_size: 128,
            intermediate_size: 96,
            num_experts: 64,
            top_k: 8,
            norm_topk_prob: true,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        MoeConfig {
            hidden_size: 256,
            intermediate_size: 128,
            num_experts: 128,
            top_k: 8,
            norm_topk_prob: false,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        // DeepSeek-V3's design at a small size: grouped routing with a score
        // correction, and a shared expert.
        MoeConfig {
            hidden_size: 192,
            intermediate_size: 64,
            num_experts: 64,
            top_k: 6,
            norm_topk_prob: true,
            routing: Routing::Grouped(GroupedRouting {
                n_group: 8,
                topk_group: 3,
                routed_scaling_factor: 2.5,
            }),
            shared_intermediate_size: 128,
        },
    ]
}

#[test]
fn the_gpu_block_matches_the_cpu_block() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    for (c, config) in configs().into_iter().enumerate() {
        let weights = MoeWeights::random(&config, 40 + c as u64).unwrap();
        for kind in [
            ExpertsKind::Grouped,
            ExpertsKind::Humming,
            ExpertsKind::HummingIndexed { block_size: 64 },
        ] {
            let mut cpu_block =
                CpuMoeBlock::new(config.clone(), &weights, kind, SharedWorkspace::new(), 64)
                    .unwrap();
            let workspace = SharedWorkspace::on_cuda_device(device.clone());
            let mut gpu_block = CudaMoeBlock::new(
                config.clone(),
                &weights,
                kind,
                device.clone(),
                workspace,
                64,
            )
            .unwrap();
            for tokens in [0usize, 1, 33, 600] {
                let h = config.hidden_size;
                let k = config.top_k;
                let hidden = random_hidden(tokens, h, (c * 100 + tokens) as u64 + 7);
                let want = cpu_block.forward(&hidden).unwrap();
                let got = gpu_block.forward(&stream, &hidden).unwrap();
                assert_eq!(got.hidden_states.len(), tokens * h);
                let (same, diff, norm) = routed_alike(&got, &want, h, k);
                assert!(
                    same * 100 >= tokens * 98,
                    "{kind:?} {config:?}: {same}/{tokens} routed alike"
                );
                if tokens > 0 {
                    let error = (diff / norm).sqrt();
                    assert!(
                        error < 1e-2,
                        "{kind:?} {config:?} N={tokens}: relative error {error}"
                    );
                    eprintln!(
                        "{kind:?} H{h} E{} K{k} N={tokens}: relative error {error:.2e}, {same}/{tokens} routed alike",
                        config.num_experts
                    );
                }
            }
        }
    }
}

#[test]
fn the_indexed_backend_needs_align_blocks_of_the_gemm_tile_on_the_gpu() {
    let Some((device, _)) = gpu() else { return };
    let config = &configs()[0];
    let error = CudaMoeBlock::new(
        config.clone(),
        &MoeWeights::random(config, 1).unwrap(),
        ExpertsKind::HummingIndexed { block_size: 16 },
        device.clone(),
        SharedWorkspace::on_cuda_device(device),
        16,
    )
    .unwrap_err();
    assert!(matches!(error, ExpertsError::Unsupported { .. }), "{error}");
}

#[test]
fn the_device_scratch_is_built_lazily_once_and_shared_by_layers() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let config = &configs()[1];
    let workspace = SharedWorkspace::on_cuda_device(device.clone());
    let mut layers: Vec<CudaMoeBlock> = (0..3)
        .map(|l| {
            CudaMoeBlock::new(
                config.clone(),
                &MoeWeights::random(config, l).unwrap(),
                ExpertsKind::Humming,
                device.clone(),
                workspace.clone(),
                64,
            )
            .unwrap()
        })
        .collect();
    assert!(
        workspace.lock().scratch().is_none(),
        "no scratch before the first call"
    );
    let hidden = random_hidden(50, config.hidden_size, 3);
    let mut bytes = Vec::new();
    for layer in &mut layers {
        layer.forward(&stream, &hidden).unwrap();
        bytes.push(workspace.lock().scratch().unwrap().allocated_bytes());
    }
    assert!(bytes.iter().all(|&b| b == bytes[0]), "{bytes:?}");

    // The same device memory for every call of every layer.
    let d_hidden = DeviceBuffer::from_host(&device, &hidden).unwrap();
    let ids: Vec<i32> = (0..50 * 8).map(|i| i * 7 % 64).collect();
    let d_ids = DeviceBuffer::from_host(&device, &ids).unwrap();
    let address = |layer: &CudaMoeBlock| {
        let mut scratch = layer.get_permute_scratch(50).unwrap();
        let input = DevicePermuteInput::new(
            DeviceRows::new(d_hidden.view(), config.hidden_size).unwrap(),
            DeviceTopkIds::new(DeviceExpertIds::I32(d_ids.view()), 8).unwrap(),
        );
        let out = cuda::permute(&mut scratch, &stream, &input).unwrap();
        out.permuted_hidden_states.bytes().address()
    };
    let first = address(&layers[0]);
    assert_eq!(first, address(&layers[0]));
    assert_eq!(first, address(&layers[2]));
}

#[test]
fn the_router_and_activation_kernels_match_the_cpu() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut unit = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for (tokens, experts, top_k, norm) in [
        (1, 8, 2, true),
        (300, 128, 8, true),
        (77, 256, 8, false),
        (5, 1000, 32, true),
    ] {
        let logits: Vec<f32> = (0..tokens * experts).map(|_| unit() * 8.0 - 4.0).collect();
        let (mut ids, mut weights) = (vec![0i32; tokens * top_k], vec![0f32; tokens * top_k]);
        moe_experts::route(&logits, experts, top_k, norm, &mut ids, &mut weights).unwrap();
        let d_logits = DeviceBuffer::from_host(&device, &logits).unwrap();
        let mut d_ids = DeviceBuffer::<i32>::zeros(&device, tokens * top_k).unwrap();
        let mut d_weights = DeviceBuffer::<f32>::zeros(&device, tokens * top_k).unwrap();
        router_topk(
            &stream,
            d_logits.view(),
            experts,
            top_k,
            norm,
            d_ids.view_mut(),
            d_weights.view_mut(),
        )
        .unwrap();
        assert_eq!(
            d_ids.view().to_host(&stream).unwrap(),
            ids,
            "E{experts} K{top_k}"
        );
        let got = d_weights.view().to_host(&stream).unwrap();
        for (g, w) in got.iter().zip(&weights) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "{g} vs {w}");
        }
    }
    // SiLU(gate) * up, rounded once to bf16.
    let (rows, columns) = (37, 96);
    let gate_up: Vec<bf16> = (0..rows * 2 * columns)
        .map(|_| bf16::from_f32(unit() * 12.0 - 6.0))
        .collect();
    let d_gate_up = DeviceBuffer::from_host(&device, &gate_up).unwrap();
    let mut d_out = DeviceBuffer::<bf16>::zeros(&device, rows * columns).unwrap();
    silu_mul(&stream, d_gate_up.view(), rows, columns, d_out.view_mut()).unwrap();
    let got = d_out.view().to_host(&stream).unwrap();
    for r in 0..rows {
        for c in 0..columns {
            let g = gate_up[r * 2 * columns + c].to_f32();
            let u = gate_up[r * 2 * columns + columns + c].to_f32();
            let want = g / (1.0 + (-g).exp()) * u;
            let got = got[r * columns + c].to_f32();
            assert!(
                (got - want).abs() <= 1e-2 * want.abs().max(1e-2),
                "{got} vs {want}"
            );
        }
    }
}

/// Random f32 values in `[0, 1)`, from a seed.
fn units(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[test]
fn the_grouped_router_gives_the_cpu_routers_bits() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let mut unit = units(0x5eed_f6a0_u64);
    // DeepSeek-V3 (256 experts in 8 groups, 4 kept, top-8), Kimi-K2's 384 in one
    // group, the kernel's limits, and small odd shapes.
    for (tokens, e, n_group, topk_group, k, norm, coarse) in [
        (1, 256, 8, 4, 8, true, false),
        (1000, 256, 8, 4, 8, true, false),
        (333, 256, 8, 4, 8, false, true),
        (64, 384, 1, 1, 8, true, false),
        (50, 1024, 32, 7, 32, true, true),
        (200, 12, 3, 2, 5, true, true),
        (9, 2, 1, 1, 2, false, false),
    ] {
        let routing = GroupedRouting {
            n_group,
            topk_group,
            routed_scaling_factor: 2.5,
        };
        // Logits on a coarse grid make scores tie within and across groups.
        let mut logits: Vec<f32> = (0..tokens * e)
            .map(|_| {
                let x = unit() * 16.0 - 8.0;
                if coarse { (x * 2.0).round() / 2.0 } else { x }
            })
            .collect();
        if tokens > 3 {
            // A token whose logits are not all numbers (a NaN from a broken layer).
            logits[2 * e] = f32::NAN;
            logits[2 * e + 1] = f32::INFINITY;
            logits[2 * e + 2] = f32::NEG_INFINITY;
        }
        let bias: Vec<f32> = (0..e).map(|_| (unit() - 0.5) * 0.2).collect();
        let (mut ids, mut weights) = (vec![0i32; tokens * k], vec![0f32; tokens * k]);
        moe_experts::route_grouped(&logits, &bias, e, k, &routing, norm, &mut ids, &mut weights)
            .unwrap();
        let d_logits = DeviceBuffer::from_host(&device, &logits).unwrap();
        let d_bias = DeviceBuffer::from_host(&device, &bias).unwrap();
        let mut d_ids = DeviceBuffer::<i32>::zeros(&device, tokens * k).unwrap();
        let mut d_weights = DeviceBuffer::<f32>::zeros(&device, tokens * k).unwrap();
        router_grouped(
            &stream,
            d_logits.view(),
            d_bias.view(),
            e,
            k,
            &routing,
            norm,
            d_ids.view_mut(),
            d_weights.view_mut(),
        )
        .unwrap();
        let what = format!("E{e} groups {n_group}/{topk_group} K{k} norm {norm}");
        assert_eq!(d_ids.view().to_host(&stream).unwrap(), ids, "{what}");
        // The bits, except that a NaN is any NaN (the GPU writes its canonical one).
        let bits = |w: &f32| if w.is_nan() { u32::MAX } else { w.to_bits() };
        let got: Vec<u32> = d_weights
            .view()
            .to_host(&stream)
            .unwrap()
            .iter()
            .map(bits)
            .collect();
        let want: Vec<u32> = weights.iter().map(bits).collect();
        assert_eq!(got, want, "{what}");
        eprintln!("{what}: {tokens} tokens, ids and weights bit for bit");
    }
    // Settings the kernel cannot take are refused before launch.
    let d_logits = DeviceBuffer::<f32>::zeros(&device, 64).unwrap();
    let d_bias = DeviceBuffer::<f32>::zeros(&device, 64).unwrap();
    let mut d_ids = DeviceBuffer::<i32>::zeros(&device, 8).unwrap();
    let mut d_weights = DeviceBuffer::<f32>::zeros(&device, 8).unwrap();
    for (n_group, topk_group, k, bias_len) in
        [(64, 1, 1, 64), (8, 9, 1, 64), (8, 1, 9, 64), (8, 2, 2, 63)]
    {
        let routing = GroupedRouting {
            n_group,
            topk_group,
            routed_scaling_factor: 1.0,
        };
        let error = router_grouped(
            &stream,
            d_logits.view(),
            d_bias.view().prefix(bias_len),
            64,
            k,
            &routing,
            true,
            d_ids.view_mut(),
            d_weights.view_mut(),
        )
        .unwrap_err();
        assert!(
            matches!(error, ExpertsError::Config(_) | ExpertsError::Shape { .. }),
            "{error}"
        );
    }
}

#[test]
fn two_bf16_tensors_add_with_one_rounding() {
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let mut unit = units(77);
    let len = 100_003;
    let a: Vec<bf16> = (0..len)
        .map(|_| bf16::from_f32(unit() * 8.0 - 4.0))
        .collect();
    let b: Vec<bf16> = (0..len)
        .map(|_| bf16::from_f32(unit() * 8.0 - 4.0))
        .collect();
    let d_a = DeviceBuffer::from_host(&device, &a).unwrap();
    let mut d_b = DeviceBuffer::from_host(&device, &b).unwrap();
    add_bf16(&stream, d_a.view(), d_b.view_mut()).unwrap();
    let got = d_b.view().to_host(&stream).unwrap();
    for ((g, a), b) in got.iter().zip(&a).zip(&b) {
        assert_eq!(*g, bf16::from_f32(a.to_f32() + b.to_f32()), "{a} + {b}");
    }
}

/// The tokens the two blocks route alike, and over those tokens the squared L2
/// distance of the outputs and the squared norm of `want`'s. Logits from two GEMM
/// libraries differ in their last bits, so a token whose K-th and (K+1)-th experts are
/// nearly tied may route differently; such tokens are only counted.
fn routed_alike(
    got: &moe_experts::BlockOutput,
    want: &moe_experts::BlockOutput,
    h: usize,
    k: usize,
) -> (usize, f64, f64) {
    let tokens = want.topk_ids.len() / k;
    let (mut same, mut diff, mut norm) = (0usize, 0f64, 0f64);
    for t in 0..tokens {
        let mut a = got.topk_ids[t * k..][..k].to_vec();
        let mut b = want.topk_ids[t * k..][..k].to_vec();
        a.sort();
        b.sort();
        if a != b {
            continue;
        }
        same += 1;
        for (g, w) in got.hidden_states[t * h..][..h]
            .iter()
            .zip(&want.hidden_states[t * h..][..h])
        {
            diff += (g.to_f32() as f64 - w.to_f32() as f64).powi(2);
            norm += (w.to_f32() as f64).powi(2);
        }
    }
    (same, diff, norm)
}

/// Fraction of tokens routed alike by the two blocks, and the relative L2 error of the
/// tokens that are.
fn compare(
    got: &moe_experts::BlockOutput,
    want: &moe_experts::BlockOutput,
    h: usize,
    k: usize,
) -> (f64, f64) {
    let tokens = want.topk_ids.len() / k;
    let (same, diff, norm) = routed_alike(got, want, h, k);
    (
        same as f64 / tokens.max(1) as f64,
        (diff / norm.max(1e-30)).sqrt(),
    )
}

#[test]
fn the_whole_block_replays_as_one_cuda_graph_on_new_inputs() {
    use moe_experts::cuda::ExpertGemm;
    use moe_runtime::cuda::cudarc::driver::sys;
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    let all = configs();
    let kinds = [
        ExpertsKind::Grouped,
        ExpertsKind::HummingIndexed { block_size: 64 },
    ];
    for (config, kind) in [&all[1], &all[2], &all[3]]
        .into_iter()
        .flat_map(|c| kinds.map(|k| (c, k)))
    {
        let weights = MoeWeights::random(config, 77).unwrap();
        let (h, k) = (config.hidden_size, config.top_k);
        let tokens = 40;
        let mut cpu_block = CpuMoeBlock::new(
            config.clone(),
            &weights,
            kind,
            SharedWorkspace::new(),
            tokens,
        )
        .unwrap();
        let mut gpu_block = CudaMoeBlock::new(
            config.clone(),
            &weights,
            kind,
            device.clone(),
            SharedWorkspace::on_cuda_device(device.clone()),
            tokens,
        )
        .unwrap();
        assert_eq!(gpu_block.expert_gemm(), ExpertGemm::Auto);
        gpu_block.set_expert_gemm(ExpertGemm::Grouped).unwrap();
        let mut input = DeviceBuffer::<bf16>::zeros(&device, tokens * h).unwrap();
        // A first call builds the scratch and the activations (allocations a capture
        // cannot hold); then one forward is captured.
        gpu_block.forward_device(&stream, input.view()).unwrap();
        cu_stream.synchronize().unwrap();
        cu_stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = gpu_block.forward_device(&stream, input.view());
        let graph = cu_stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("the capture holds the block's work");
        captured.unwrap();
        for round in 0..3u64 {
            let hidden = random_hidden(tokens, h, 900 + round);
            input.copy_from_host(&stream, &hidden).unwrap();
            graph.launch().unwrap();
            let out = gpu_block.output(tokens).unwrap().to_host(&stream).unwrap();
            let want = cpu_block.forward(&hidden).unwrap();
            // The routing of the replay is not returned: route the same input eagerly
            // to know which tokens to compare, and check the replay equals it.
            let eager = gpu_block.forward(&stream, &hidden).unwrap();
            assert_eq!(out, eager.hidden_states, "the replay is the eager forward");
            let (alike, error) = compare(&eager, &want, h, k);
            assert!(alike >= 0.97, "{kind:?} {config:?}: {alike} routed alike");
            assert!(error < 1e-2, "{kind:?} {config:?}: relative error {error}");
            eprintln!(
                "graph replay {kind:?} H{h} E{} K{k}: relative error {error:.2e}, {:.0}% routed alike",
                config.num_experts,
                alike * 100.0
            );
        }
    }
}

#[test]
fn both_expert_gemm_paths_give_the_same_block() {
    use moe_experts::cuda::ExpertGemm;
    let Some((device, cu_stream)) = gpu() else {
        return;
    };
    let stream = device.stream(&cu_stream).unwrap();
    for (c, config) in configs().into_iter().enumerate() {
        let weights = MoeWeights::random(&config, 5 + c as u64).unwrap();
        let mut block = CudaMoeBlock::new(
            config.clone(),
            &weights,
            ExpertsKind::Grouped,
            device.clone(),
            SharedWorkspace::on_cuda_device(device.clone()),
            300,
        )
        .unwrap();
        let hidden = random_hidden(300, config.hidden_size, 31 + c as u64);
        block.set_expert_gemm(ExpertGemm::Grouped).unwrap();
        let grouped = block.forward(&stream, &hidden).unwrap();
        block.set_expert_gemm(ExpertGemm::Cublas).unwrap();
        let cublas = block.forward(&stream, &hidden).unwrap();
        // The router is the same cuBLAS GEMM on both paths: identical routing.
        assert_eq!(grouped.topk_ids, cublas.topk_ids);
        let (alike, error) = compare(&grouped, &cublas, config.hidden_size, config.top_k);
        assert_eq!(alike, 1.0);
        assert!(error < 1e-2, "{config:?}: relative error {error}");
        eprintln!("grouped vs cuBLAS expert GEMMs, config {c}: relative error {error:.2e}");
    }
}
