//! The MoE block on a CUDA device against the CPU block, on random weights and
//! inputs; and the lazy, shared permute scratch on the device.
//!
//! Without a GPU every test prints why and passes; with `MOE_REQUIRE_GPU=1` a missing
//! GPU fails them.

use std::sync::Arc;

use half::bf16;
use moe_experts::cuda::{router_topk, silu_mul};
use moe_experts::{
    CpuMoeBlock, CudaMoeBlock, ExpertsError, ExpertsKind, MoeConfig, MoeWeights, Routing,
    SharedWorkspace,
};
use moe_runtime::cuda::{
    self, CudaDevice, CudaStream, DeviceBuffer, DeviceExpertIds, DevicePermuteInput, DeviceRows,
    DeviceTopkIds,
};

/// The GPU and a stream of it, or `None` (after saying why) when there is none and
/// none is required.
fn gpu() -> Option<(Arc<CudaDevice>, Arc<CudaStream>)> {
    match CudaDevice::new(0) {
        Ok(device) => {
            let stream = device.new_stream().unwrap();
            Some((device, stream))
        }
        Err(error) if std::env::var("MOE_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("MOE_REQUIRE_GPU=1 but no GPU can be used: {error}")
        }
        Err(error) => {
            eprintln!("no GPU found, skipping: {error}");
            None
        }
    }
}

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
        for kind in [ExpertsKind::Grouped, ExpertsKind::Humming] {
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
                // Logits from two GEMM libraries differ in their last bits, so a token
                // whose K-th and (K+1)-th experts are nearly tied may route differently;
                // such tokens are counted, and compared only when routed alike.
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
fn the_indexed_backend_is_refused_on_the_gpu() {
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
