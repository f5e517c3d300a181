//! The MoE block on the CPU against a naive reference written here (plain loops), for
//! every backend, on random weights and inputs; and the lazy, shared permute scratch.

// The reference is plain index loops on purpose: it should read like the definition.
#![allow(clippy::needless_range_loop)]

use half::bf16;
use moe_experts::cpu::{CpuExperts, GroupedExperts, HummingExperts, IndexedExperts};
use moe_experts::{
    CpuMoeBlock, CpuWeights, ExpertsError, ExpertsKind, GroupedRouting, MoeConfig, MoeWeights,
    Routing, SharedWorkspace,
};
use moe_runtime::cpu::{self, PermuteInput};
use moe_runtime::{MoeError, Rows, TopkIds};

fn round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// The block, written from its definition: router logits in f32, softmax, top-k by
/// logit (ties to the lower id), optional renormalisation; each expert's
/// `down(SiLU(gate x) * up x)` with bf16 rounding after each GEMM and the activation;
/// the weighted sum in f32 over ascending k, rounded once.
fn reference(config: &MoeConfig, w: &MoeWeights, hidden: &[bf16]) -> (Vec<f32>, Vec<i32>) {
    let (h, e) = (config.hidden_size, config.num_experts);
    let f = |v: &[bf16], idx: usize| v[idx].to_f32();
    let tokens = hidden.len() / h;
    let mut out = vec![0.0f32; tokens * h];
    let mut all_ids = Vec::new();
    for t in 0..tokens {
        let x: Vec<f32> = (0..h).map(|c| f(hidden, t * h + c)).collect();
        let logits: Vec<f32> = (0..e)
            .map(|ex| (0..h).map(|c| x[c] * f(&w.router, ex * h + c)).sum())
            .collect();
        let (ids, weights) = match &config.routing {
            Routing::Softmax => softmax_routing(config, &logits),
            Routing::Grouped(g) => grouped_routing(config, g, w, &logits),
        };
        let mut acc = vec![0.0f32; h];
        for (slot, &ex) in ids.iter().enumerate() {
            let weight = weights[slot];
            for (acc, y) in acc.iter_mut().zip(expert_mlp(config, w, ex, &x)) {
                *acc += weight * y;
            }
            all_ids.push(ex as i32);
        }
        for c in 0..h {
            out[t * h + c] = round(acc[c]);
        }
        // The shared expert's output, added to the routed one as two bf16 tensors add.
        if let Some(shared) = &w.shared {
            let y = mlp(
                &x,
                h,
                shared.intermediate_size,
                &shared.gate_proj,
                &shared.up_proj,
                &shared.down_proj,
            );
            for c in 0..h {
                out[t * h + c] = round(out[t * h + c] + y[c]);
            }
        }
    }
    (out, all_ids)
}

/// Softmax over the logits, the `K` largest (ties to the lower id), their
/// probabilities, renormalised when the config says so.
fn softmax_routing(config: &MoeConfig, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut ids: Vec<usize> = Vec::new();
    for _ in 0..config.top_k {
        let mut best = usize::MAX;
        for ex in 0..logits.len() {
            if !ids.contains(&ex) && (best == usize::MAX || logits[ex] > logits[best]) {
                best = ex;
            }
        }
        ids.push(best);
    }
    let probs: Vec<f32> = ids.iter().map(|&ex| (logits[ex] - max).exp()).collect();
    let denominator = if config.norm_topk_prob {
        probs.iter().sum()
    } else {
        total
    };
    (ids, probs.iter().map(|p| p / denominator).collect())
}

/// DeepSeek-V3's routing: sigmoid scores, corrected by the bias for the choice; the
/// `topk_group` groups with the largest sums of their two best corrected scores; the
/// `K` best corrected scores in them; weights the uncorrected scores, renormalised
/// (plus 1e-20) when asked, scaled. Ties to the lower group and id.
fn grouped_routing(
    config: &MoeConfig,
    g: &GroupedRouting,
    w: &MoeWeights,
    logits: &[f32],
) -> (Vec<usize>, Vec<f32>) {
    let bias = w.router_bias.as_ref().expect("grouped routing has a bias");
    let e = logits.len();
    let size = e / g.n_group;
    let s: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
    let c: Vec<f32> = (0..e).map(|x| s[x] + bias[x]).collect();
    let ranked = |values: &[f32], mut among: Vec<usize>| {
        among.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        among
    };
    let sums: Vec<f32> = (0..g.n_group)
        .map(|grp| {
            let best = ranked(&c, (grp * size..(grp + 1) * size).collect());
            c[best[0]] + c[best[1]]
        })
        .collect();
    let groups = ranked(&sums, (0..g.n_group).collect());
    let allowed = (0..e)
        .filter(|x| groups[..g.topk_group].contains(&(x / size)))
        .collect();
    let ids: Vec<usize> = ranked(&c, allowed).into_iter().take(config.top_k).collect();
    let total: f32 = ids.iter().map(|&x| s[x]).sum();
    let weights = ids
        .iter()
        .map(|&x| {
            let w = if config.norm_topk_prob {
                s[x] / (total + 1e-20)
            } else {
                s[x]
            };
            w * g.routed_scaling_factor
        })
        .collect();
    (ids, weights)
}

/// Expert `ex`'s `down(SiLU(gate x) * up x)` on one token `x`, with bf16 rounding after
/// each GEMM and the activation.
fn expert_mlp(config: &MoeConfig, w: &MoeWeights, ex: usize, x: &[f32]) -> Vec<f32> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let slice = |v: &[bf16]| v[ex * i * h..(ex + 1) * i * h].to_vec();
    mlp(
        x,
        h,
        i,
        &slice(&w.gate_proj),
        &slice(&w.up_proj),
        &slice(&w.down_proj),
    )
}

/// `down(SiLU(gate x) * up x)` of one MLP (`[i, h]`, `[i, h]`, `[h, i]`) on one token.
fn mlp(x: &[f32], h: usize, i: usize, gate: &[bf16], up: &[bf16], down: &[bf16]) -> Vec<f32> {
    let mut act = vec![0.0f32; i];
    for r in 0..i {
        let mut g = 0.0f32;
        let mut u = 0.0f32;
        for c in 0..h {
            g += x[c] * gate[r * h + c].to_f32();
            u += x[c] * up[r * h + c].to_f32();
        }
        let (g, u) = (round(g), round(u));
        act[r] = round(g / (1.0 + (-g).exp()) * u);
    }
    (0..h)
        .map(|c| {
            let mut y = 0.0f32;
            for r in 0..i {
                y += act[r] * down[c * i + r].to_f32();
            }
            round(y)
        })
        .collect()
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

fn relative_error(got: &[bf16], want: &[f32]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g.to_f32() as f64 - *w as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

const KINDS: [ExpertsKind; 3] = [
    ExpertsKind::Grouped,
    ExpertsKind::Humming,
    ExpertsKind::HummingIndexed { block_size: 16 },
];

fn configs() -> Vec<MoeConfig> {
    vec![
        // Mixtral-like: few experts, top-2, always renormalised.
        MoeConfig {
            hidden_size: 64,
            intermediate_size: 96,
            num_experts: 8,
            top_k: 2,
            norm_topk_prob: true,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        // Qwen3-MoE-like: many experts, top-4, renormalised.
        MoeConfig {
            hidden_size: 48,
            intermediate_size: 32,
            num_experts: 32,
            top_k: 4,
            norm_topk_prob: true,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        // DeepSeek-V3-like: grouped sigmoid routing with a score correction, scaled, and
        // a shared expert.
        MoeConfig {
            hidden_size: 32,
            intermediate_size: 16,
            num_experts: 16,
            top_k: 4,
            norm_topk_prob: true,
            routing: Routing::Grouped(GroupedRouting {
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
            }),
            shared_intermediate_size: 24,
        },
        // Qwen2-MoE-like: without renormalisation.
        MoeConfig {
            hidden_size: 40,
            intermediate_size: 24,
            num_experts: 16,
            top_k: 3,
            norm_topk_prob: false,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
    ]
}

#[test]
fn every_backend_matches_the_naive_block() {
    for (c, config) in configs().into_iter().enumerate() {
        let weights = MoeWeights::random(&config, 100 + c as u64).unwrap();
        for kind in KINDS {
            let mut block =
                CpuMoeBlock::new(config.clone(), &weights, kind, SharedWorkspace::new(), 64)
                    .unwrap();
            for (n, tokens) in [0usize, 1, 7, 100].into_iter().enumerate() {
                let hidden = random_hidden(tokens, config.hidden_size, (c * 10 + n) as u64 + 1);
                let got = block.forward(&hidden).unwrap();
                let (want, want_ids) = reference(&config, &weights, &hidden);
                assert_eq!(got.topk_ids, want_ids, "{kind:?} {config:?} N={tokens}");
                assert_eq!(got.hidden_states.len(), tokens * config.hidden_size);
                if tokens > 0 {
                    let error = relative_error(&got.hidden_states, &want);
                    assert!(error < 5e-3, "{kind:?} {config:?} N={tokens}: {error}");
                    assert!(got.hidden_states.iter().any(|v| v.to_f32() != 0.0));
                }
                let scale = match &config.routing {
                    Routing::Grouped(g) => g.routed_scaling_factor,
                    Routing::Softmax => 1.0,
                };
                for row in got.topk_weights.chunks(config.top_k) {
                    let sum: f32 = row.iter().sum::<f32>() / scale;
                    assert!(sum > 0.0 && sum <= 1.0 + 1e-5, "{row:?}");
                    if config.norm_topk_prob {
                        assert!((sum - 1.0).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

#[test]
fn the_scratch_is_built_lazily_once_and_shared_by_layers() {
    let config = &configs()[0];
    let workspace = SharedWorkspace::new();
    let layers: Vec<MoeWeights> = (0..3)
        .map(|l| MoeWeights::random(config, l).unwrap())
        .collect();
    let mut blocks: Vec<CpuMoeBlock> = layers
        .iter()
        .map(|w| {
            CpuMoeBlock::new(
                config.clone(),
                w,
                ExpertsKind::Humming,
                workspace.clone(),
                32,
            )
            .unwrap()
        })
        .collect();
    // Nothing is allocated before the first call.
    assert!(workspace.lock().scratch().is_none());

    let hidden = random_hidden(20, config.hidden_size, 9);
    let mut outputs = Vec::new();
    let mut bytes = Vec::new();
    for block in &mut blocks {
        outputs.push(block.forward(&hidden).unwrap().hidden_states);
        bytes.push(workspace.lock().scratch().unwrap().allocated_bytes());
    }
    // One scratch for all layers: built by the first, then reused as it was.
    assert!(bytes.iter().all(|&b| b == bytes[0]), "{bytes:?}");
    // Different weights, different outputs: the layers really ran.
    assert_ne!(outputs[0], outputs[1]);

    // The scratch a backend gets is the same memory, call after call and across the
    // backends of different layers.
    let address = |backend: &HummingExperts| {
        let mut scratch = backend.get_permute_scratch(20).unwrap();
        let ids: Vec<i32> = (0..40).map(|i| i % 8).collect();
        let input = PermuteInput::new(
            Rows::new(&hidden, config.hidden_size).unwrap(),
            TopkIds::new(&ids, 2).unwrap(),
        );
        let out = cpu::permute(&mut scratch, &input).unwrap();
        out.permuted_hidden_states.as_bytes().as_ptr() as usize
    };
    let first = HummingExperts::new(config, workspace.clone(), 32);
    let second = HummingExperts::new(config, workspace.clone(), 16);
    assert_eq!(address(&first), address(&first));
    assert_eq!(address(&first), address(&second));
}

#[test]
fn a_locked_workspace_refuses_a_larger_batch() {
    let config = &configs()[0];
    let workspace = SharedWorkspace::new();
    let weights = MoeWeights::random(config, 5).unwrap();
    let mut block = CpuMoeBlock::new(
        config.clone(),
        &weights,
        ExpertsKind::Grouped,
        workspace.clone(),
        8,
    )
    .unwrap();
    block
        .forward(&random_hidden(8, config.hidden_size, 1))
        .unwrap();
    workspace.lock().lock();
    block
        .forward(&random_hidden(4, config.hidden_size, 2))
        .unwrap();
    let error = block
        .forward(&random_hidden(9, config.hidden_size, 3))
        .unwrap_err();
    assert!(error.to_string().contains("locked"), "{error}");
}

/// The three CPU backends, each with a workspace of its own.
fn backends(config: &MoeConfig) -> Vec<Box<dyn CpuExperts>> {
    vec![
        Box::new(GroupedExperts::new(config, SharedWorkspace::new(), 8)),
        Box::new(HummingExperts::new(config, SharedWorkspace::new(), 8)),
        Box::new(IndexedExperts::new(config, SharedWorkspace::new(), 8, 16)),
    ]
}

/// The error every backend gives for one call: the same from all three.
fn same_error(
    backends: &mut [Box<dyn CpuExperts>],
    weights: &CpuWeights,
    hidden: &[bf16],
    ids: &[i32],
    topk_weights: &[f32],
    out_len: usize,
) -> ExpertsError {
    let mut errors: Vec<ExpertsError> = backends
        .iter_mut()
        .map(|backend| {
            let mut out = vec![bf16::ZERO; out_len];
            backend
                .apply(weights, hidden, ids, topk_weights, &mut out)
                .expect_err(backend.name())
        })
        .collect();
    let first = errors.remove(0);
    for other in &errors {
        assert_eq!(other.to_string(), first.to_string());
    }
    first
}

#[test]
fn every_backend_refuses_the_same_calls_that_do_not_fit_it() {
    let config = configs()[1].clone();
    let (h, k) = (config.hidden_size, config.top_k);
    let weights = MoeWeights::random(&config, 21).unwrap();
    let cpu_weights = CpuWeights::new(&weights);
    let tokens = 5;
    let hidden = random_hidden(tokens, h, 4);
    // Any ids: one out of range (dropped), repeats across tokens.
    let ids: Vec<i32> = (0..tokens * k).map(|f| (f * 7 % 33) as i32).collect();
    let topk_weights: Vec<f32> = (0..tokens * k).map(|f| 0.1 + f as f32 / 40.0).collect();
    let mut want = vec![0.0f32; tokens * h];
    for t in 0..tokens {
        let x: Vec<f32> = hidden[t * h..][..h].iter().map(|v| v.to_f32()).collect();
        for slot in 0..k {
            let ex = ids[t * k + slot] as usize;
            if ex < config.num_experts {
                for (c, y) in expert_mlp(&config, &weights, ex, &x)
                    .into_iter()
                    .enumerate()
                {
                    want[t * h + c] += topk_weights[t * k + slot] * y;
                }
            }
        }
    }
    let mut backends = backends(&config);
    for backend in &mut backends {
        let mut out = vec![bf16::ZERO; tokens * h];
        backend
            .apply(&cpu_weights, &hidden, &ids, &topk_weights, &mut out)
            .unwrap();
        let error = relative_error(&out, &want);
        assert!(error < 5e-3, "{}: {error}", backend.name());
    }

    let shape = |error: ExpertsError| match error {
        ExpertsError::Shape { tensor, len, .. } => (tensor, len),
        other => panic!("expected a shape error, got {other}"),
    };
    let n_h = tokens * h;
    let mut check = |hidden: &[bf16], ids: &[i32], topk_weights: &[f32], out_len: usize| {
        same_error(
            &mut backends,
            &cpu_weights,
            hidden,
            ids,
            topk_weights,
            out_len,
        )
    };
    // A row fewer, a row more than topk_ids has tokens.
    let fewer = &hidden[..n_h - h];
    assert_eq!(
        shape(check(fewer, &ids, &topk_weights, n_h)),
        ("hidden_states", n_h - h)
    );
    let more = random_hidden(tokens + 1, h, 5);
    assert_eq!(
        shape(check(&more, &ids, &topk_weights, n_h)),
        ("hidden_states", n_h + h)
    );
    // Weights and output of the wrong length.
    let short = &topk_weights[1..];
    assert_eq!(
        shape(check(&hidden, &ids, short, n_h)),
        ("topk_weights", tokens * k - 1)
    );
    assert_eq!(
        shape(check(&hidden, &ids, &topk_weights, n_h + 1)),
        ("output", n_h + 1)
    );
    // topk_ids that are not whole tokens.
    assert!(matches!(
        check(&hidden, &ids[1..], &topk_weights, n_h),
        ExpertsError::Runtime(MoeError::Shape {
            tensor: "topk_ids",
            ..
        })
    ));

    // Weights of another block: another hidden size, another expert count.
    for other in [
        MoeConfig {
            hidden_size: h + 8,
            ..config.clone()
        },
        MoeConfig {
            num_experts: config.num_experts - 1,
            ..config.clone()
        },
    ] {
        let other = CpuWeights::new(&MoeWeights::random(&other, 22).unwrap());
        let error = same_error(&mut backends, &other, &hidden, &ids, &topk_weights, n_h);
        assert!(matches!(error, ExpertsError::Config(_)), "{error}");
    }
    // Weights whose tensors do not hold what their sizes say.
    let mut truncated = weights.clone();
    truncated.down_proj.pop();
    let truncated = CpuWeights::new(&truncated);
    assert_eq!(
        shape(same_error(
            &mut backends,
            &truncated,
            &hidden,
            &ids,
            &topk_weights,
            n_h
        )),
        ("down_proj", weights.down_proj.len() - 1)
    );
}

#[test]
fn sizes_that_overflow_or_cannot_be_had_are_errors() {
    // E*I*H = 2^65 does not fit in usize.
    let config = MoeConfig {
        hidden_size: 1 << 32,
        intermediate_size: 1 << 32,
        num_experts: 2,
        top_k: 1,
        norm_topk_prob: true,
        routing: Routing::Softmax,
        shared_intermediate_size: 0,
    };
    let overflow = MoeError::SizeOverflow {
        quantity: "expert weights (E * I * H)",
        factors: vec![2, 1 << 32, 1 << 32],
    };
    match MoeWeights::random(&config, 1).unwrap_err() {
        ExpertsError::Runtime(error) => assert_eq!(error, overflow),
        other => panic!("{other}"),
    }
    let empty = MoeWeights {
        hidden_size: 1 << 32,
        intermediate_size: 1 << 32,
        num_experts: 2,
        router: Vec::new(),
        gate_proj: Vec::new(),
        up_proj: Vec::new(),
        down_proj: Vec::new(),
        router_bias: None,
        shared: None,
    };
    let block = CpuMoeBlock::new(
        config,
        &empty,
        ExpertsKind::Grouped,
        SharedWorkspace::new(),
        4,
    );
    match block.unwrap_err() {
        ExpertsError::Runtime(error) => assert_eq!(error, overflow),
        other => panic!("{other}"),
    }
    // 2^52 values of one expert's gate fit in usize, not in memory: an error, not an
    // abort.
    let config = MoeConfig {
        hidden_size: 1,
        intermediate_size: 1 << 52,
        num_experts: 1,
        top_k: 1,
        norm_topk_prob: true,
        routing: Routing::Softmax,
        shared_intermediate_size: 0,
    };
    match MoeWeights::repeating(&config, 1).unwrap_err() {
        ExpertsError::Runtime(error) => assert_eq!(
            error,
            MoeError::OutOfMemory {
                buffer: "gate_proj",
                bytes: 1 << 53
            }
        ),
        other => panic!("{other}"),
    }
}
