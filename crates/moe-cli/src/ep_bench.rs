//! Dispatch + combine time per MoE layer on W GPUs, one process per GPU, against
//! the bytes each rank moves divided by the all-to-all bandwidth NCCL reaches on the
//! same GPUs in the same run.
//!
//! `moe ep-bench [--world W] [--out FILE]` starts W ranks of itself (every GPU by
//! default), one process per GPU, and writes a JSON report (rank 0's figures; every
//! rank's are printed). The experts are skipped: the time is the exchange's alone
//! (both permutes and unpermutes, the count exchange and its host wait in exact mode,
//! and the NCCL transfers).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use moe_ep::launch::{RankEnv, spawn_ranks};
use moe_ep::{
    Communicator, EpExchange, ExchangeInput, ExchangeMode, ExchangeShape, ExpertPlacement,
    LocalExperts,
};
use moe_runtime::cuda::{
    CudaDevice, DeviceBuffer, DeviceRows, DeviceScales, DeviceView, DeviceViewMut, Stream,
};

/// Skips the experts: what is timed is the exchange.
struct NoExperts;

impl LocalExperts for NoExperts {
    fn run(
        &mut self,
        _: &Stream<'_>,
        _: DeviceRows<'_>,
        _: Option<DeviceScales<'_>>,
        _: DeviceView<'_, i64>,
        _: DeviceViewMut<'_, bf16>,
    ) -> moe_ep::Result<()> {
        Ok(())
    }
}

const SHAPES: [(&str, usize, usize, usize); 2] = [
    // (name, H, E, K)
    ("deepseek-v3", 7168, 256, 8),
    ("qwen3-30b-a3b", 2048, 128, 8),
];
const WARMUP: usize = 3;
const ITERATIONS: usize = 15;

#[derive(clap::Args, Debug)]
pub(crate) struct EpBenchArgs {
    /// Ranks, one GPU each (default: every GPU here).
    #[arg(long, value_name = "W")]
    world: Option<usize>,
    /// Tokens per rank, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512,2048,8192")]
    tokens: Vec<usize>,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE", default_value = "ep-bench.json")]
    out: PathBuf,
}

/// `moe ep-bench`: the launcher, or (when it started this process) one rank.
pub(crate) fn run(args: EpBenchArgs) -> anyhow::Result<()> {
    match RankEnv::from_env()? {
        Some(env) => rank_main(env, &args.tokens),
        None => launch(args),
    }
}

fn launch(args: EpBenchArgs) -> anyhow::Result<()> {
    let world = match args.world {
        Some(world) => world,
        None => CudaDevice::count()?,
    };
    anyhow::ensure!(
        world >= 2,
        "{world} GPUs: expert parallelism needs 2 or more"
    );
    let exe = std::env::current_exe()?;
    let tokens: Vec<String> = args.tokens.iter().map(usize::to_string).collect();
    let outputs = spawn_ranks(world, Duration::from_secs(1200), |_| {
        let mut command = Command::new(&exe);
        command.args(["ep-bench", "--tokens", &tokens.join(",")]);
        command
    })?;
    let mut report = None;
    for (rank, output) in outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!(
            "--- rank {rank}\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        anyhow::ensure!(output.status.success(), "rank {rank} failed");
        if rank == 0 {
            report = stdout
                .lines()
                .find_map(|line| line.strip_prefix("REPORT "))
                .map(str::to_owned);
        }
    }
    let report = report.ok_or_else(|| anyhow::anyhow!("rank 0 wrote no report"))?;
    std::fs::write(&args.out, &report)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn random_u64(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Median seconds of `step` over the iterations, each ended by a stream sync.
fn time(stream: &Stream<'_>, mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        stream.synchronize()?;
        let start = Instant::now();
        step()?;
        stream.synchronize()?;
        if i >= WARMUP {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// NCCL's all-to-all bandwidth: each rank sends `bytes` to every other rank (grouped
/// sends and receives); bytes received per rank over the time.
fn all_to_all_bandwidth(
    comm: &Communicator,
    stream: &Stream<'_>,
    device: &Arc<CudaDevice>,
) -> anyhow::Result<f64> {
    let (w, rank) = (comm.world(), comm.rank());
    let chunk = 64 << 20; // bf16 elements: 128 MiB per peer
    let send = DeviceBuffer::<bf16>::zeros(device, chunk * w)?;
    let mut recv = DeviceBuffer::<bf16>::zeros(device, chunk * w)?;
    let seconds = time(stream, || {
        comm.group(|comm| {
            for peer in (0..w).filter(|&p| p != rank) {
                comm.send(
                    stream,
                    send.view().range("send", peer * chunk, chunk)?,
                    peer,
                )?;
                comm.recv(
                    stream,
                    recv.view_mut().range("recv", peer * chunk, chunk)?,
                    peer,
                )?;
            }
            Ok(())
        })?;
        Ok(())
    })?;
    Ok(((w - 1) * chunk * 2) as f64 / seconds)
}

/// The time of NCCL's smallest useful step: an all-gather of one bf16 row of 7168.
fn small_all_gather(
    comm: &Communicator,
    stream: &Stream<'_>,
    device: &Arc<CudaDevice>,
) -> anyhow::Result<f64> {
    let row = 7168;
    let send = DeviceBuffer::<bf16>::zeros(device, row)?;
    let mut gathered = DeviceBuffer::<bf16>::zeros(device, row * comm.world())?;
    time(stream, || {
        comm.all_gather(stream, send.view(), gathered.view_mut())?;
        Ok(())
    })
}

fn rank_main(env: RankEnv, token_counts: &[usize]) -> anyhow::Result<()> {
    let device = CudaDevice::new(env.rank)?;
    let comm = Arc::new(Communicator::new(
        device.clone(),
        &env.id,
        env.rank,
        env.world,
    )?);
    let cu_stream = device.new_stream()?;
    let stream = device.stream(&cu_stream)?;
    let w = env.world;
    let bandwidth = all_to_all_bandwidth(&comm, &stream, &device)?;
    println!(
        "rank {}: NCCL all-to-all {:.1} GB/s received per rank",
        env.rank,
        bandwidth / 1e9
    );
    let latency = small_all_gather(&comm, &stream, &device)?;
    println!(
        "rank {}: NCCL all-gather of one 7168-wide bf16 row: {:.1} us",
        env.rank,
        latency * 1e6
    );
    let mut rows = Vec::new();
    for (name, h, e, k) in SHAPES {
        let placement = ExpertPlacement::contiguous(e, w)?;
        for mode in [ExchangeMode::Exact, ExchangeMode::Capacity] {
            for &tokens in token_counts {
                let shape = ExchangeShape::bf16(e, k, h, tokens);
                let mut exchange = EpExchange::new(comm.clone(), placement.clone(), shape, mode)?;
                // Uniform routing: K distinct experts per token.
                let mut state = 0x5eed ^ ((env.rank as u64 + 1) * 0x9e37_79b9);
                let mut ids = Vec::with_capacity(tokens * k);
                for _ in 0..tokens {
                    let mut chosen = Vec::with_capacity(k);
                    while chosen.len() < k {
                        let id = (random_u64(&mut state) % e as u64) as i32;
                        if !chosen.contains(&id) {
                            chosen.push(id);
                        }
                    }
                    ids.extend(chosen);
                }
                let weights: Vec<f32> = (0..tokens * k).map(|i| 1.0 / (1 + i % k) as f32).collect();
                let hidden: Vec<bf16> = (0..tokens * h)
                    .map(|i| bf16::from_f32((i % 251) as f32 / 251.0 - 0.5))
                    .collect();
                let hidden = DeviceBuffer::from_host(&device, &hidden)?;
                let ids = DeviceBuffer::from_host(&device, &ids)?;
                let weights = DeviceBuffer::from_host(&device, &weights)?;
                let mut out = DeviceBuffer::<bf16>::zeros(&device, tokens * h)?;
                let seconds = time(&stream, || {
                    exchange.forward(
                        &stream,
                        ExchangeInput {
                            hidden_states: DeviceRows::new(hidden.view(), h)?,
                            scales: None,
                            topk_ids: ids.view(),
                            topk_weights: weights.view(),
                        },
                        &mut NoExperts,
                        out.view_mut(),
                    )?;
                    Ok(())
                })?;
                // Bytes this rank receives from other ranks, both ways.
                let row = (h * 2) as f64;
                let others = (w - 1) as f64;
                let bytes = match mode {
                    // Uniform routing: (W-1)/W of the entries go to other ranks, with
                    // a 4-byte id; as many results come back.
                    ExchangeMode::Exact => {
                        2.0 * (tokens * k) as f64 * others / w as f64 * row
                            + (tokens * k) as f64 * others / w as f64 * 4.0
                    }
                    // All-gather of every rank's M rows and ids, reduce-scatter of
                    // W * M * K rows.
                    ExchangeMode::Capacity => {
                        others * tokens as f64 * (row + (k * 4) as f64)
                            + others * (tokens * k) as f64 * row
                    }
                };
                let floor = bytes / bandwidth;
                println!(
                    "rank {} {name} {} {tokens:>5} tokens/rank: {:>9.1} us, floor {:>8.1} us ({:.2}x)",
                    env.rank,
                    mode.name(),
                    seconds * 1e6,
                    floor * 1e6,
                    seconds / floor
                );
                rows.push(format!(
                    "{{\"shape\":\"{name}\",\"mode\":\"{}\",\"tokens_per_rank\":{tokens},\"us\":{:.2},\"bytes_per_rank\":{bytes:.0},\"floor_us\":{:.2}}}",
                    mode.name(),
                    seconds * 1e6,
                    floor * 1e6
                ));
            }
        }
    }
    let card = device.name()?;
    println!(
        "REPORT {{\"world\":{w},\"card\":\"{card}\",\"nccl\":\"{}\",\"all_to_all_gbps\":{:.1},\"small_all_gather_us\":{:.1},\"rows\":[{}]}}",
        moe_ep::nccl::check_library()?,
        bandwidth / 1e9,
        latency * 1e6,
        rows.join(",")
    );
    Ok(())
}
