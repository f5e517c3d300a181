//! `moe`: the project's front door. `moe info` says what the machine has, `moe bench`
//! measures permute, unpermute and the whole MoE block, `moe run` runs one MoE block
//! from checkpoint weights, `moe ep-bench` measures expert parallelism's exchange on
//! several GPUs.

mod bench;
mod ep_bench;
mod info;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "moe",
    version,
    about = "MoE token shuffles (permute / unpermute) on GPU and CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceChoice {
    /// The first GPU if there is one, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Devices found, driver and card, the PTX this binary carries, the build.
    Info,
    /// Benchmark permute, unpermute and the MoE block over the shapes serving stacks use.
    Bench(bench::BenchArgs),
    /// Run one MoE block from checkpoint weights on the `hidden_states` of an input file.
    Run(RunArgs),
    /// Benchmark expert parallelism's dispatch + combine over NCCL, one process per GPU.
    EpBench(ep_bench::EpBenchArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The checkpoint holding the layer's weights: a safetensors file, a sharded
    /// checkpoint's directory, or its `model.safetensors.index.json`.
    #[arg(long, value_name = "W.safetensors")]
    weights: PathBuf,
    /// The layer's tensor-name prefix, e.g. `model.layers.3` (or its MoE module's,
    /// `model.layers.3.mlp`).
    #[arg(long, value_name = "P")]
    prefix: String,
    /// A safetensors file with a `hidden_states` tensor `[N, H]` (bf16 or f32).
    #[arg(long, value_name = "X.safetensors")]
    input: PathBuf,
    /// Where to write `hidden_states`, `topk_ids` and `topk_weights`.
    #[arg(long, value_name = "Y.safetensors")]
    output: PathBuf,
    /// The checkpoint's `config.json`, for `num_experts_per_tok` and `norm_topk_prob`
    /// (default: the `config.json` beside the weights, when there is one).
    #[arg(long, value_name = "config.json")]
    config: Option<PathBuf>,
    /// Experts per token (instead of, or overriding, the config's).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Renormalise the top-k probabilities (Mixtral always does).
    #[arg(long)]
    norm_topk_prob: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            match error.kind() {
                // --help, --version and a bare `moe` print what was asked for.
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => error.exit(),
                // A bad argument: one line, and where to look.
                _ => {
                    let message = error.to_string();
                    let first = message.lines().next().unwrap_or("bad arguments");
                    let first = first.trim_start_matches("error: ");
                    eprintln!("moe: error: {first} (see moe --help)");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let result = match cli.command {
        Command::Info => info::run(),
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::EpBench(args) => ep_bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes.
            let causes: Vec<String> = error.chain().map(|e| e.to_string()).collect();
            eprintln!("moe: error: {}", causes.join(": "));
            ExitCode::FAILURE
        }
    }
}
