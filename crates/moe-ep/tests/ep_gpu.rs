//! The expert-parallel block on several GPUs, one process per GPU as serving stacks
//! run it: each test starts this same binary once per rank (`rank_process`), with the
//! NCCL id in the environment, and checks every rank passed.
//!
//! Skips without two GPUs or without NCCL; with `MOE_REQUIRE_GPU=1` those fail
//! instead. `MOE_EP_SANITIZER=/path/to/compute-sanitizer` runs rank 0 under memcheck.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use moe_ep::launch::{RankEnv, spawn_ranks};
use moe_ep::{Communicator, EpError, EpMoeBlock, ExchangeMode, ExpertPlacement};
use moe_experts::cuda::ExpertGemm;
use moe_experts::{
    CudaMoeBlock, ExpertsKind, GroupedRouting, MoeConfig, MoeWeights, Routing, SharedWorkspace,
};
use moe_runtime::cuda::{CudaDevice, DeviceBuffer};

/// Ranks for the tests: every GPU here, at most 4 (or `MOE_EP_WORLD`); `None` (after
/// saying why) when fewer than two or no NCCL, unless `MOE_REQUIRE_GPU=1`.
fn world() -> Option<usize> {
    let required = std::env::var("MOE_REQUIRE_GPU").as_deref() == Ok("1");
    let gpus = CudaDevice::count().unwrap_or(0);
    let nccl = moe_ep::nccl::check_library();
    let why = if gpus < 2 {
        format!("{gpus} GPUs, expert parallelism needs 2")
    } else if let Err(error) = &nccl {
        error.to_string()
    } else {
        // MOE_EP_WORLD picks fewer ranks than GPUs (2 on a 4-GPU machine).
        let wanted = std::env::var("MOE_EP_WORLD")
            .ok()
            .and_then(|w| w.parse().ok());
        return Some(wanted.unwrap_or(4).clamp(2, gpus));
    };
    assert!(!required, "MOE_REQUIRE_GPU=1 but: {why}");
    eprintln!("skipping: {why}");
    None
}

/// Runs `case` on every rank and checks each rank said it passed.
fn run_case(case: &str) {
    run_case_with(case, &[]);
}

/// [`run_case`] with more variables in every rank's environment.
fn run_case_with(case: &str, env: &[(&str, &str)]) {
    let Some(world) = world() else {
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let sanitizer = std::env::var("MOE_EP_SANITIZER").ok();
    let outputs = spawn_ranks(world, Duration::from_secs(240), |rank| {
        let mut command = match (&sanitizer, rank) {
            (Some(tool), 0) => {
                let mut command = Command::new(tool);
                command.args([
                    "--tool",
                    "memcheck",
                    "--report-api-errors",
                    "no",
                    "--error-exitcode",
                    "3",
                ]);
                command.arg(&exe);
                command
            }
            _ => Command::new(&exe),
        };
        command
            .args(["rank_process", "--exact", "--nocapture", "--test-threads=1"])
            .env("MOE_EP_CASE", case)
            .envs(env.iter().copied());
        command
    })
    .unwrap();
    for (rank, output) in outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("--- rank {rank} of {world}, {case}\n{stdout}{stderr}");
        assert!(output.status.success(), "rank {rank} failed {case}");
        assert!(
            stdout.contains(&format!("rank {rank} passed {case}")),
            "rank {rank} did not run {case}"
        );
        if sanitizer.is_some() && rank == 0 {
            assert!(
                stdout.contains("ERROR SUMMARY: 0 errors")
                    || stderr.contains("ERROR SUMMARY: 0 errors"),
                "memcheck on rank 0 of {case}"
            );
        }
    }
}

#[test]
fn the_ep_block_matches_one_gpu_in_exact_mode() {
    run_case("matches-exact");
}

#[test]
fn the_ep_block_matches_one_gpu_in_capacity_mode() {
    run_case("matches-capacity");
}

#[test]
fn ranks_that_disagree_on_top_k_all_get_the_error() {
    run_case("disagree-top-k");
}

#[test]
fn ranks_that_disagree_on_the_experts_all_get_the_error() {
    run_case("disagree-experts");
}

#[test]
fn an_expert_on_two_ranks_is_an_error_on_every_rank() {
    run_case("two-owners");
}

#[test]
fn a_call_too_large_on_one_rank_fails_without_a_hang() {
    run_case("too-many-tokens");
}

#[test]
fn fp8_rows_travel_with_their_scales_in_both_modes() {
    run_case("fp8-scales");
}

#[test]
fn each_rank_loads_its_experts_from_one_checkpoint() {
    if world().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("moe-ep-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("layer.safetensors");
    write_checkpoint(&path, &MoeWeights::random(&configs()[0], 71).unwrap());
    run_case_with(
        "checkpoint",
        &[("MOE_EP_CHECKPOINT", path.to_str().unwrap())],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `weights` as a Mixtral layer `model.layers.0` in a safetensors file.
fn write_checkpoint(path: &std::path::Path, weights: &MoeWeights) {
    use moe_experts::Layout;
    use safetensors::{Dtype, tensor::TensorView};
    let prefix = "model.layers.0";
    let (h, i) = (weights.hidden_size, weights.intermediate_size);
    let mut tensors = vec![(
        Layout::Mixtral.router(prefix),
        vec![weights.num_experts, h],
        &weights.router[..],
    )];
    for e in 0..weights.num_experts {
        let [gate, up, down] = Layout::Mixtral.expert(prefix, e);
        tensors.push((gate, vec![i, h], &weights.gate_proj[e * i * h..][..i * h]));
        tensors.push((up, vec![i, h], &weights.up_proj[e * i * h..][..i * h]));
        tensors.push((down, vec![h, i], &weights.down_proj[e * h * i..][..h * i]));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            (
                name,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes.iter().map(|(name, shape, bytes)| {
        (
            name.clone(),
            TensorView::new(Dtype::BF16, shape.clone(), bytes).unwrap(),
        )
    });
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn capacity_mode_replays_as_a_cuda_graph() {
    run_case("graph-capacity");
}

/// The child side: runs the case in `MOE_EP_CASE` as its rank (a no-op when this
/// binary was not started as a rank).
#[test]
fn rank_process() {
    let Some(env) = RankEnv::from_env().unwrap() else {
        return;
    };
    let case = std::env::var("MOE_EP_CASE").unwrap();
    let device = CudaDevice::new(env.rank).unwrap();
    let comm = Arc::new(Communicator::new(device.clone(), &env.id, env.rank, env.world).unwrap());
    let rank = Rank {
        rank: env.rank,
        world: env.world,
        device,
        comm,
    };
    match case.as_str() {
        "matches-exact" => rank.matches_one_gpu(ExchangeMode::Exact),
        "matches-capacity" => rank.matches_one_gpu(ExchangeMode::Capacity),
        "disagree-top-k" => rank.disagree(
            |config, rank| {
                if rank == 1 {
                    config.top_k = 3;
                }
            },
            "top-k",
        ),
        "disagree-experts" => rank.disagree(
            |config, rank| {
                if rank == 1 {
                    config.num_experts = 16;
                }
            },
            "the number of experts",
        ),
        "two-owners" => rank.two_owners(),
        "too-many-tokens" => rank.too_many_tokens(),
        "graph-capacity" => rank.graph_capacity(),
        "checkpoint" => rank.checkpoint(),
        "fp8-scales" => {
            rank.fp8_scales(ExchangeMode::Exact);
            rank.fp8_scales(ExchangeMode::Capacity);
        }
        other => panic!("no case {other}"),
    }
    println!("rank {} passed {case}", env.rank);
}

struct Rank {
    rank: usize,
    world: usize,
    device: Arc<CudaDevice>,
    comm: Arc<Communicator>,
}

fn random_hidden(tokens: usize, h: usize, seed: u64, positive: bool) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..tokens * h)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let unit = (s >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32(if positive {
                0.1 + unit
            } else {
                2.0 * unit - 1.0
            })
        })
        .collect()
}

fn configs() -> Vec<MoeConfig> {
    vec![
        MoeConfig {
            hidden_size: 256,
            intermediate_size: 128,
            num_experts: 8,
            top_k: 2,
            norm_topk_prob: true,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        },
        // DeepSeek-V3's design at a small size: grouped routing, a shared expert.
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

/// Every token's largest difference, relative to its largest reference value.
fn worst_error(got: &[bf16], want: &[bf16], h: usize) -> f32 {
    got.chunks(h)
        .zip(want.chunks(h))
        .map(|(g, w)| {
            let scale = w.iter().map(|v| v.to_f32().abs()).fold(0.0, f32::max);
            assert!(scale > 0.0, "a token's reference output is all zeros");
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
                .fold(0.0, f32::max);
            diff / scale
        })
        .fold(0.0, f32::max)
}

/// The global id of token `t` of `rank`, which its row bytes and scales encode.
fn token_id(rank: usize, t: usize) -> usize {
    rank * 1000 + t
}

fn fp8_row(id: usize, h: usize) -> Vec<u8> {
    (0..h).map(|j| ((id * 7 + j * 13) % 251) as u8).collect()
}

/// Experts that check every row they are given came with its own scales (both
/// encode the token), then answer each row with its global expert's id in every
/// column: what comes back, weighted, tells which experts each token reached.
struct CheckingExperts {
    local_experts: Vec<usize>,
    hidden_size: usize,
    rows_seen: usize,
}

impl moe_ep::LocalExperts for CheckingExperts {
    fn run(
        &mut self,
        stream: &moe_runtime::cuda::Stream<'_>,
        rows: moe_runtime::cuda::DeviceRows<'_>,
        scales: Option<moe_runtime::cuda::DeviceScales<'_>>,
        offsets: moe_runtime::cuda::DeviceView<'_, i64>,
        out: moe_runtime::cuda::DeviceViewMut<'_, bf16>,
    ) -> moe_ep::Result<()> {
        let h = self.hidden_size;
        assert_eq!(rows.dtype(), moe_runtime::DType::Fp8E4M3);
        let bytes = rows.bytes().to_host(stream)?;
        let scales = scales
            .expect("the exchange carries scales")
            .data()
            .to_host(stream)?;
        let offsets = offsets.to_host(stream)?;
        let mut answer = vec![bf16::ZERO; out.len()];
        for (local, bounds) in offsets.windows(2).enumerate() {
            for r in bounds[0] as usize..bounds[1] as usize {
                let id = scales[2 * r] as usize;
                assert_eq!(scales[2 * r + 1], -(id as f32), "row {r}'s scales");
                assert_eq!(
                    &bytes[r * h..][..h],
                    &fp8_row(id, h)[..],
                    "row {r} of token {id}"
                );
                let expert = self.local_experts[local] as f32;
                answer[r * h..][..h].fill(bf16::from_f32(expert));
                self.rows_seen += 1;
            }
        }
        let device = CudaDevice::new(stream.device().ordinal())?;
        DeviceBuffer::from_host(&device, &answer)?
            .view()
            .copy_into(out, stream)?;
        Ok(())
    }
}

impl Rank {
    fn stream(&self) -> Arc<moe_runtime::cuda::CudaStream> {
        self.device.new_stream().unwrap()
    }

    /// The single-GPU block with every expert, on this rank's GPU.
    fn reference(&self, config: &MoeConfig, weights: &MoeWeights, max: usize) -> CudaMoeBlock {
        let mut block = CudaMoeBlock::new(
            config.clone(),
            weights,
            ExpertsKind::Grouped,
            self.device.clone(),
            SharedWorkspace::on_cuda_device(self.device.clone()),
            max,
        )
        .unwrap();
        block.set_expert_gemm(ExpertGemm::Grouped).unwrap();
        block
    }

    fn ep_block(
        &self,
        config: &MoeConfig,
        weights: &MoeWeights,
        mode: ExchangeMode,
        max: usize,
    ) -> Result<EpMoeBlock, EpError> {
        let map = ExpertPlacement::contiguous(config.num_experts, self.world)
            .unwrap()
            .expert_map(self.rank);
        EpMoeBlock::new(self.comm.clone(), config.clone(), weights, &map, mode, max)
    }

    /// The EP block equals the one-GPU block on this rank's tokens: identical routing,
    /// outputs within bf16 rounding; with tokens spread unevenly (rank 1 has none),
    /// one token, and every token routed to rank 0's experts.
    fn matches_one_gpu(&self, mode: ExchangeMode) {
        let cu_stream = self.stream();
        let stream = self.device.stream(&cu_stream).unwrap();
        let max = 64;
        for (c, config) in configs().iter().enumerate() {
            let h = config.hidden_size;
            for skewed in [false, true] {
                let mut weights = MoeWeights::random(config, 500 + c as u64).unwrap();
                let rank0_experts = config.num_experts / self.world;
                if skewed {
                    // Positive tokens and router rows: positive for rank 0's experts,
                    // negative for the others, so every token picks rank 0's experts.
                    for (row, expert_row) in weights.router.chunks_mut(h).enumerate() {
                        let sign = if row < rank0_experts { 1.0 } else { -1.0 };
                        for w in expert_row {
                            *w = bf16::from_f32(sign * (w.to_f32().abs() + 0.01));
                        }
                    }
                    if let Some(bias) = &mut weights.router_bias {
                        bias.iter_mut().for_each(|b| *b = 0.0);
                    }
                }
                let mut ep = self.ep_block(config, &weights, mode, max).unwrap();
                let mut reference = self.reference(config, &weights, max);
                let counts: [&[usize]; 3] = [&[45, 0, 17, 3], &[1, 1, 1, 1], &[64, 33, 0, 64]];
                for (round, counts) in counts.iter().enumerate() {
                    let tokens = counts[self.rank % counts.len()];
                    let seed = (c * 1000 + round * 10 + self.rank) as u64;
                    let hidden = random_hidden(tokens, h, seed, skewed);
                    let got = ep.forward(&stream, &hidden).unwrap();
                    let want = reference.forward(&stream, &hidden).unwrap();
                    assert_eq!(
                        got.topk_ids, want.topk_ids,
                        "routing, config {c} round {round}"
                    );
                    assert_eq!(got.topk_weights, want.topk_weights);
                    if skewed {
                        assert!(
                            got.topk_ids.iter().all(|&e| (e as usize) < rank0_experts),
                            "the skewed router sends every token to rank 0"
                        );
                    }
                    if tokens > 0 {
                        let error = worst_error(&got.hidden_states, &want.hidden_states, h);
                        println!(
                            "{mode:?} config {c} skewed {skewed} round {round}: {tokens} tokens, \
                             worst relative error {error:.2e}"
                        );
                        assert!(error <= 1.0 / 64.0, "error {error} beyond bf16 rounding");
                    }
                }
            }
        }
    }

    fn disagree(&self, change: impl Fn(&mut MoeConfig, usize), what: &str) {
        let mut config = configs()[0].clone();
        change(&mut config, self.rank);
        let weights = MoeWeights::random(&config, 9).unwrap();
        let map = ExpertPlacement::contiguous(8, self.world)
            .unwrap()
            .expert_map(self.rank);
        let map = if config.num_experts == 8 {
            map
        } else {
            let mut longer = vec![-1; config.num_experts];
            longer[..8].copy_from_slice(&map);
            longer
        };
        let error = EpMoeBlock::new(
            self.comm.clone(),
            config,
            &weights,
            &map,
            ExchangeMode::Exact,
            16,
        )
        .unwrap_err();
        println!("rank {}: {error}", self.rank);
        assert!(
            matches!(&error, EpError::RanksDisagree { what: w, .. } if *w == what),
            "{error:?}"
        );
    }

    fn two_owners(&self) {
        let config = configs()[0].clone();
        let weights = MoeWeights::random(&config, 9).unwrap();
        let mut map = ExpertPlacement::contiguous(8, self.world)
            .unwrap()
            .expert_map(self.rank);
        if self.rank == 1 {
            // Rank 1 also claims expert 0, under a new local id.
            map[0] = map.iter().filter(|&&id| id >= 0).count() as i32;
        }
        let error = EpMoeBlock::new(
            self.comm.clone(),
            config,
            &weights,
            &map,
            ExchangeMode::Capacity,
            16,
        )
        .unwrap_err();
        println!("rank {}: {error}", self.rank);
        assert!(
            matches!(&error, EpError::Placement(text) if text.contains("expert 0 is on two ranks")),
            "{error:?}"
        );
    }

    /// Rank 0 passes more than max_num_tokens: it gets its error, the others finish
    /// (exact mode: with `PeerFailed`), and the next call works everywhere.
    fn too_many_tokens(&self) {
        let cu_stream = self.stream();
        let stream = self.device.stream(&cu_stream).unwrap();
        let config = configs()[0].clone();
        let h = config.hidden_size;
        let weights = MoeWeights::random(&config, 31).unwrap();
        for mode in [ExchangeMode::Exact, ExchangeMode::Capacity] {
            let max = 16;
            let mut ep = self.ep_block(&config, &weights, mode, max).unwrap();
            let mut reference = self.reference(&config, &weights, max + 1);
            let tokens = if self.rank == 0 { max + 1 } else { 5 };
            let hidden = random_hidden(tokens, h, 77 + self.rank as u64, false);
            let result = ep.forward(&stream, &hidden);
            println!("rank {} {mode:?}: {:?}", self.rank, result.as_ref().err());
            match (self.rank, mode) {
                (0, _) => assert!(matches!(result, Err(EpError::Shape(_)))),
                (_, ExchangeMode::Exact) => {
                    assert!(matches!(result, Err(EpError::PeerFailed { rank: 0, .. })))
                }
                (_, ExchangeMode::Capacity) => {
                    let got = result.unwrap();
                    let want = reference.forward(&stream, &hidden).unwrap();
                    assert!(worst_error(&got.hidden_states, &want.hidden_states, h) <= 1.0 / 64.0);
                }
            }
            let hidden = random_hidden(7, h, 99 + self.rank as u64, false);
            let got = ep.forward(&stream, &hidden).unwrap();
            let want = reference.forward(&stream, &hidden).unwrap();
            assert!(worst_error(&got.hidden_states, &want.hidden_states, h) <= 1.0 / 64.0);
        }
    }

    /// fp8 rows and two scales a token through the exchange alone: every row reaches
    /// the experts with its own bytes and scales (checked there), dropped entries
    /// (id -1) reach none, and the weighted sums of the experts' answers come back.
    fn fp8_scales(&self, mode: ExchangeMode) {
        use moe_ep::{EpExchange, ExchangeInput, ExchangeShape};
        use moe_runtime::DType;
        use moe_runtime::cuda::{DeviceRows, DeviceScales};
        let cu_stream = self.stream();
        let stream = self.device.stream(&cu_stream).unwrap();
        let (e, k, h, max) = (8, 2, 64, 16);
        let placement = ExpertPlacement::contiguous(e, self.world).unwrap();
        let shape = ExchangeShape::bf16(e, k, h, max).with_rows(DType::Fp8E4M3, 2);
        let mut exchange =
            EpExchange::new(self.comm.clone(), placement.clone(), shape, mode).unwrap();
        let mut experts = CheckingExperts {
            local_experts: placement.local_experts(self.rank),
            hidden_size: h,
            rows_seen: 0,
        };
        for round in 0..2 {
            let tokens = [[11, 0, 5, 16], [1, 16, 0, 3]][round][self.rank % 4];
            let ids: Vec<i32> = (0..tokens * k)
                .map(|f| {
                    let (t, slot) = (f / k, f % k);
                    if (t + round) % 5 == 3 && slot == 1 {
                        -1 // dropped
                    } else {
                        ((t * 3 + slot * 5 + self.rank + round) % e) as i32
                    }
                })
                .collect();
            let weights: Vec<f32> = (0..tokens * k).map(|f| [0.5, 0.25][f % k]).collect();
            let rows: Vec<u8> = (0..tokens)
                .flat_map(|t| fp8_row(token_id(self.rank, t), h))
                .collect();
            let scales: Vec<f32> = (0..tokens)
                .flat_map(|t| {
                    let id = token_id(self.rank, t) as f32;
                    [id, -id]
                })
                .collect();
            let upload_u8 =
                DeviceBuffer::from_host(&self.device, &[rows.clone(), vec![0]].concat()).unwrap();
            let upload_f32 =
                |v: &[f32]| DeviceBuffer::from_host(&self.device, &[v, &[0.0]].concat()).unwrap();
            let scales_dev = upload_f32(&scales);
            let weights_dev = upload_f32(&weights);
            let ids_dev =
                DeviceBuffer::from_host(&self.device, &[&ids[..], &[0]].concat()).unwrap();
            let mut out = DeviceBuffer::<bf16>::zeros(&self.device, tokens * h + 1).unwrap();
            exchange
                .forward(
                    &stream,
                    ExchangeInput {
                        hidden_states: DeviceRows::from_bytes(
                            upload_u8.view().prefix(tokens * h),
                            DType::Fp8E4M3,
                            h,
                        )
                        .unwrap(),
                        scales: Some(
                            DeviceScales::new(scales_dev.view().prefix(tokens * 2), 2).unwrap(),
                        ),
                        topk_ids: ids_dev.view().prefix(tokens * k),
                        topk_weights: weights_dev.view().prefix(tokens * k),
                    },
                    &mut experts,
                    out.view_mut().prefix(tokens * h),
                )
                .unwrap();
            let got = out.view().prefix(tokens * h).to_host(&stream).unwrap();
            for t in 0..tokens {
                let want: f32 = (0..k)
                    .filter(|&slot| ids[t * k + slot] >= 0)
                    .map(|slot| weights[t * k + slot] * ids[t * k + slot] as f32)
                    .sum();
                for j in 0..h {
                    assert_eq!(
                        got[t * h + j].to_f32(),
                        want,
                        "{mode:?} token {t} column {j}"
                    );
                }
            }
        }
        println!(
            "rank {} {mode:?}: experts saw {} rows",
            self.rank, experts.rows_seen
        );
    }

    /// Every rank loads its experts from one checkpoint and the block equals the
    /// one-GPU block loaded whole; then rank 1 is given a path that does not exist:
    /// it gets the read error, every other rank `PeerFailed`, and none waits.
    fn checkpoint(&self) {
        let path = std::path::PathBuf::from(std::env::var("MOE_EP_CHECKPOINT").unwrap());
        let config = configs()[0].clone();
        let h = config.hidden_size;
        let map = ExpertPlacement::contiguous(config.num_experts, self.world)
            .unwrap()
            .expert_map(self.rank);
        let load = |path: &std::path::Path| {
            EpMoeBlock::load(
                self.comm.clone(),
                path,
                "model.layers.0",
                config.clone(),
                &map,
                ExchangeMode::Capacity,
                32,
            )
        };
        let mut ep = load(&path).unwrap();
        let (whole, _) = MoeWeights::load(&path, "model.layers.0").unwrap();
        let mut reference = self.reference(&config, &whole, 32);
        let cu_stream = self.stream();
        let stream = self.device.stream(&cu_stream).unwrap();
        let hidden = random_hidden(20 + self.rank, h, 5 + self.rank as u64, false);
        let got = ep.forward(&stream, &hidden).unwrap();
        let want = reference.forward(&stream, &hidden).unwrap();
        assert_eq!(got.topk_ids, want.topk_ids);
        assert!(worst_error(&got.hidden_states, &want.hidden_states, h) <= 1.0 / 64.0);

        let missing = path.with_file_name("no-such-layer.safetensors");
        let error = load(if self.rank == 1 { &missing } else { &path }).unwrap_err();
        println!("rank {}: {error}", self.rank);
        if self.rank == 1 {
            assert!(matches!(error, EpError::Experts(_)), "{error:?}");
        } else {
            assert!(
                matches!(error, EpError::PeerFailed { rank: 1, .. }),
                "{error:?}"
            );
        }
    }

    /// Capacity mode captured once in a CUDA graph on every rank, replayed on new
    /// tokens: each replay equals the eager forward bit for bit.
    fn graph_capacity(&self) {
        use moe_runtime::cuda::cudarc::driver::sys;
        let cu_stream = self.stream();
        let stream = self.device.stream(&cu_stream).unwrap();
        let config = configs()[1].clone();
        let h = config.hidden_size;
        let weights = MoeWeights::random(&config, 61).unwrap();
        let tokens = 24;
        let mut ep = self
            .ep_block(&config, &weights, ExchangeMode::Capacity, tokens)
            .unwrap();
        let mut input = DeviceBuffer::<bf16>::zeros(&self.device, tokens * h).unwrap();
        ep.forward_device(&stream, input.view()).unwrap();
        cu_stream.synchronize().unwrap();
        cu_stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = ep.forward_device(&stream, input.view());
        let graph = cu_stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("the capture holds the layer");
        captured.unwrap();
        for round in 0..3u64 {
            let hidden = random_hidden(tokens, h, 300 + round * 7 + self.rank as u64, false);
            input.copy_from_host(&stream, &hidden).unwrap();
            graph.launch().unwrap();
            let replayed = ep.output(tokens).unwrap().to_host(&stream).unwrap();
            let eager = ep.forward(&stream, &hidden).unwrap();
            assert_eq!(
                replayed, eager.hidden_states,
                "replay {round} is the eager forward"
            );
            assert!(replayed.iter().any(|v| v.to_f32() != 0.0));
        }
    }
}
