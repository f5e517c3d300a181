//! `cargo xtask`: the project's own build tasks (see `USAGE`).
//!
//! `build-ptx`: compile the device side of `crates/moe-kernels` to PTX with rustc's
//! `nvptx64-nvidia-cuda` target, commit it under `kernels-gpu/`, and check it with
//! NVIDIA's `ptxas` (`docs/gpu-toolchain.md` describes the whole pipeline). `tidy`: the
//! checks that keep the docs true to the code (they also run as this crate's tests).
//!
//! Architecture invariant: the only files this writes outside `target/` are the two in
//! `kernels-gpu/`, and only `build-ptx` without `--check` writes them.

mod build_ptx;
mod manifest;
mod ptxas;
mod tidy;
mod toolchain;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  build-ptx           compile crates/moe-kernels for nvptx64-nvidia-cuda (sm_80, PTX 7.8)
                      into kernels-gpu/moe_kernels.ptx and kernels-gpu/manifest.json, then
                      check the PTX with `ptxas -v` for sm_80 and sm_90 (errors or spills fail)
  build-ptx --check   write nothing: rebuild in target/ptx-check, fail when the committed
                      kernels-gpu/ is stale, then check the committed PTX with ptxas
  tidy                check that the docs' links resolve and the constants they quote
                      are the code's, and that every public item and file is documented
                      (also run by `cargo test`)
  help                print this message

environment:
  MOE_PTX_RUSTC, MOE_PTX_CARGO   the device toolchain (default /usr/bin/rustc, /usr/bin/cargo)
  PTXAS                          ptxas (default target/tools/cuda-nvcc/bin/ptxas, then PATH)

Install both with `xtask/setup-gpu-toolchain.sh` (Debian 12, as root); see docs/gpu-toolchain.md.";

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Help,
    BuildPtx(build_ptx::Mode),
    Tidy,
}

/// Parses the arguments after `cargo xtask`; the error is a one-line reason, printed
/// above the usage.
fn parse_args(args: &[String]) -> Result<Task, String> {
    let Some((task, rest)) = args.split_first() else {
        return Err("no task given".to_owned());
    };
    match task.as_str() {
        "help" | "--help" | "-h" => Ok(Task::Help),
        "tidy" if rest.is_empty() => Ok(Task::Tidy),
        "tidy" => Err(format!("unexpected arguments to tidy: {}", rest.join(" "))),
        "build-ptx" => match rest {
            [] => Ok(Task::BuildPtx(build_ptx::Mode::Write)),
            [flag] if flag == "--check" => Ok(Task::BuildPtx(build_ptx::Mode::Check)),
            [flag] if flag == "--help" || flag == "-h" => Ok(Task::Help),
            _ => Err(format!(
                "unexpected arguments to build-ptx: {}",
                rest.join(" ")
            )),
        },
        other => Err(format!("unknown task `{other}`")),
    }
}

/// The workspace root: this crate lives in `<root>/xtask`. `cargo run` sets
/// `CARGO_MANIFEST_DIR` for the program too; that value wins over the compile-time one,
/// which a target directory shared by two checkouts can leave pointing at the other.
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .expect("xtask's manifest directory has a parent")
        .to_path_buf()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let task = match parse_args(&args) {
        Ok(task) => task,
        Err(reason) => {
            eprintln!("error: {reason}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match task {
        Task::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Task::BuildPtx(mode) => build_ptx::run(&workspace_root(), mode),
        Task::Tidy => tidy::run(&workspace_root()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The messages are written for people; no backtrace even if RUST_BACKTRACE is set.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_ptx::Mode;

    fn check(args: &[&str], expected: Result<Task, &str>) {
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        assert_eq!(
            parse_args(&args),
            expected.map_err(str::to_owned),
            "{args:?}"
        );
    }

    #[test]
    fn parses_tasks() {
        check(&["build-ptx"], Ok(Task::BuildPtx(Mode::Write)));
        check(&["build-ptx", "--check"], Ok(Task::BuildPtx(Mode::Check)));
        check(&["build-ptx", "--help"], Ok(Task::Help));
        check(&["help"], Ok(Task::Help));
        check(&["-h"], Ok(Task::Help));
    }

    #[test]
    fn rejects_unknown_arguments() {
        check(&[], Err("no task given"));
        check(&["build"], Err("unknown task `build`"));
        check(
            &["build-ptx", "--chek"],
            Err("unexpected arguments to build-ptx: --chek"),
        );
        check(
            &["build-ptx", "--check", "--check"],
            Err("unexpected arguments to build-ptx: --check --check"),
        );
    }
}
