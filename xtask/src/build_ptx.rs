//! `cargo xtask build-ptx [--check]`: compile the device side of `crates/moe-kernels`
//! into its PTX modules ([`MODULES`]: `kernels-gpu/moe_kernels.ptx` for sm_80,
//! `kernels-gpu/moe_kernels_sm90.ptx` for sm_90), or check that the committed ones are
//! current; then check each with `ptxas` either way.
//!
//! The compile is `cargo rustc --profile ptx --target nvptx64-nvidia-cuda
//! -Zbuild-std=core --crate-type cdylib -- --emit=asm`, run by the device toolchain
//! (see `toolchain.rs`) with `RUSTC_BOOTSTRAP=1`. Fat LTO (the `ptx` profile) leaves the
//! whole module, `core` included, in `deps/moe_kernels.s`. rustc would then run
//! `llvm-bitcode-linker`, which Debian does not ship; the `.s` is all we need, so the
//! link step is `/bin/true`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::manifest::{
    self, KERNELS_CRATE, Manifest, ModuleRecord, SourceFile, collect_sources, first_difference,
    per_file_sha256, sources_sha256,
};
use crate::ptxas;
use crate::toolchain::{DeviceToolchain, Ptxas, first_line};

/// Write the files, or only compare with the committed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Write,
    Check,
}

pub(crate) const TARGET: &str = "nvptx64-nvidia-cuda";

/// One PTX module: the kernels crate compiled for one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Module {
    /// `-C target-cpu`, also the module's name.
    pub(crate) cpu: &'static str,
    /// The PTX ISA version, and the target feature that selects it.
    pub(crate) ptx_isa: &'static str,
    feature: &'static str,
    /// A `--cfg` the kernels are compiled with, for code only this module has.
    cfg: Option<&'static str>,
    /// Where it is committed, relative to the workspace root.
    pub(crate) file: &'static str,
    /// The architectures `ptxas` checks it for.
    ptxas_archs: &'static [&'static str],
}

/// The modules, in build order. sm_80 runs everywhere (Ampere on); the sm_90 module is
/// the same kernels, each waiting for the grid before it first (`cfg(moe_sm90)`), which
/// the runtime loads on Hopper and later to overlap launches.
pub(crate) const MODULES: [Module; 2] = [
    Module {
        cpu: "sm_80",
        ptx_isa: "7.8",
        feature: "+ptx78",
        cfg: None,
        file: "kernels-gpu/moe_kernels.ptx",
        ptxas_archs: &["sm_80", "sm_90"],
    },
    Module {
        cpu: "sm_90",
        ptx_isa: "8.0",
        feature: "+ptx80",
        cfg: Some("moe_sm90"),
        file: "kernels-gpu/moe_kernels_sm90.ptx",
        ptxas_archs: &["sm_90"],
    },
];

const OUT_DIR: &str = "kernels-gpu";
const MANIFEST_FILE: &str = "kernels-gpu/manifest.json";
/// Cargo target directories (relative to the root) of the build and of `--check`'s
/// rebuild, kept apart so a check never reuses the build's outputs; each module builds
/// in a directory of its own below them (its flags differ).
const BUILD_TARGET_DIR: &str = "target/ptx";
const CHECK_TARGET_DIR: &str = "target/ptx-check";

const STALE: &str = "kernels-gpu/ is stale: run `cargo xtask build-ptx` and commit";

pub(crate) fn run(root: &Path, mode: Mode) -> Result<()> {
    // Find ptxas first: better to learn it is missing before a minute of compiling.
    let ptxas = Ptxas::find(root)?;
    match mode {
        Mode::Write => write(root, &ptxas),
        Mode::Check => check(root, &ptxas),
    }
}

fn write(root: &Path, ptxas: &Ptxas) -> Result<()> {
    let toolchain = DeviceToolchain::find()?;
    let sources = collect_sources(root)?;
    let mut built = Vec::new();
    for module in MODULES {
        built.push((module, compile(root, &toolchain, BUILD_TARGET_DIR, module)?));
    }
    let manifest = manifest_for(&toolchain, &sources, &built);

    fs::create_dir_all(root.join(OUT_DIR))
        .with_context(|| format!("could not create {OUT_DIR}"))?;
    for (module, ptx) in &built {
        write_if_changed(root, module.file, ptx)?;
        eprintln!(
            "wrote {} ({} lines, sha256 {})",
            module.file,
            ptx.lines().count(),
            &manifest::sha256(ptx.as_bytes())[..16],
        );
    }
    write_if_changed(root, MANIFEST_FILE, &manifest.to_json())?;
    eprintln!("wrote {MANIFEST_FILE}");
    for module in MODULES {
        check_with_ptxas(root, ptxas, module)?;
    }
    Ok(())
}

fn check(root: &Path, ptxas: &Ptxas) -> Result<()> {
    let committed_json = read_committed(root, MANIFEST_FILE)?;
    let committed = Manifest::from_json(&committed_json)
        .with_context(|| format!("could not read {MANIFEST_FILE}; {STALE}"))?;
    let mut committed_ptx = Vec::new();
    for module in MODULES {
        let ptx = read_committed(root, module.file)?;
        let Some(record) = committed.modules.iter().find(|m| m.file == module.file) else {
            bail!("{MANIFEST_FILE} does not list {}\n{STALE}", module.file);
        };
        if manifest::sha256(ptx.as_bytes()) != record.ptx_sha256 {
            bail!(
                "{} does not match its ptx_sha256 in {MANIFEST_FILE} (edited by hand, or \
                 committed without its manifest?)\n{STALE}",
                module.file
            );
        }
        committed_ptx.push((module, ptx));
    }

    // (a) The sources: no compiler needed to see that they changed.
    let sources = collect_sources(root)?;
    if sources_sha256(&sources) != committed.sources_sha256 {
        let mut message = format!(
            "{STALE}\n  the sources of {KERNELS_CRATE} changed since {MANIFEST_FILE} was written:"
        );
        for change in manifest::source_changes(&committed.sources, &per_file_sha256(&sources)) {
            write!(message, "\n    {change}").unwrap();
        }
        bail!(message);
    }

    let toolchain = DeviceToolchain::find()?;
    if toolchain.version != committed.compiler {
        // (b) Another compiler may well make other PTX of the same sources: say so, and
        // check what is committed.
        eprintln!(
            "{}",
            compiler_changed_warning(&committed.compiler, &toolchain.version)
        );
    } else {
        // (c) Same sources, same compiler: each rebuild must be byte-for-byte the same.
        let mut rebuilt = Vec::new();
        for (module, committed) in &committed_ptx {
            let ptx = compile(root, &toolchain, CHECK_TARGET_DIR, *module)?;
            if let Some((line, old, new)) = first_difference(committed, &ptx) {
                bail!(
                    "{STALE}\n  {} makes different PTX of these sources than the committed \
                     {}; first difference at line {line}:\n    committed: {}\n    \
                     rebuilt:   {}",
                    toolchain.release_line(),
                    module.file,
                    shorten(old),
                    shorten(new),
                );
            }
            rebuilt.push((*module, ptx));
        }
        let manifest_json = manifest_for(&toolchain, &sources, &rebuilt).to_json();
        if let Some((line, old, new)) = first_difference(&committed_json, &manifest_json) {
            bail!(
                "{STALE}\n  {MANIFEST_FILE} differs from the one this xtask writes; first \
                 difference at line {line}:\n    committed: {}\n    rebuilt:   {}",
                shorten(old),
                shorten(new),
            );
        }
        eprintln!("{OUT_DIR}/ is up to date: the rebuilt PTX is identical to the committed PTX");
    }
    for module in MODULES {
        check_with_ptxas(root, ptxas, module)?;
    }
    Ok(())
}

/// The warning for `--check` when the installed compiler is not the recorded one.
fn compiler_changed_warning(recorded: &str, installed: &str) -> String {
    let mut warning = format!(
        "warning: the installed device compiler is not the one that generated {OUT_DIR}/\n  \
         recorded in {MANIFEST_FILE}: {}\n  installed:  {}",
        first_line(recorded),
        first_line(installed),
    );
    if first_line(recorded) == first_line(installed) {
        for (old, new) in recorded
            .lines()
            .zip(installed.lines())
            .filter(|(a, b)| a != b)
        {
            write!(warning, "\n  ({old} -> {new})").unwrap();
        }
    }
    write!(
        warning,
        "\n  The sources are unchanged, so the committed PTX in {OUT_DIR}/ is what the \
         recorded compiler makes of them; it was not rebuilt (another compiler may emit \
         different PTX). To regenerate it with the installed compiler, run `cargo xtask \
         build-ptx`, review the ptxas tables, and commit {OUT_DIR}/. ptxas now checks the \
         committed PTX."
    )
    .unwrap();
    warning
}

fn manifest_for(
    toolchain: &DeviceToolchain,
    sources: &[SourceFile],
    built: &[(Module, String)],
) -> Manifest {
    Manifest {
        generator: "cargo xtask build-ptx".to_owned(),
        compiler: toolchain.version.clone(),
        target: TARGET.to_owned(),
        sources_sha256: sources_sha256(sources),
        modules: built
            .iter()
            .map(|(module, ptx)| ModuleRecord {
                file: module.file.to_owned(),
                target_cpu: module.cpu.to_owned(),
                ptx_isa: module.ptx_isa.to_owned(),
                ptx_sha256: manifest::sha256(ptx.as_bytes()),
            })
            .collect(),
        sources: per_file_sha256(sources),
    }
}

/// Compiles the kernels crate for `module` below `target_dir` and returns the PTX to
/// commit.
fn compile(
    root: &Path,
    toolchain: &DeviceToolchain,
    target_dir: &str,
    module: Module,
) -> Result<String> {
    let target_dir = format!("{target_dir}/{}", module.cpu);
    let target_dir = target_dir.as_str();
    eprintln!(
        "compiling moe-kernels for nvptx64 ({}, PTX {}) with {} in {target_dir}...",
        module.cpu,
        module.ptx_isa,
        toolchain.release_line()
    );
    let start = Instant::now();

    // These flags go to every crate, `core` included (`cargo rustc -- ...` would reach
    // only moe-kernels). The standard library source is remapped to `/rustc/<commit>`,
    // as in rustup's builds, so no host path ends up in panic locations; the workspace's
    // own paths are already relative, as cargo passes them.
    let mut rustflags = vec![
        "-C".to_owned(),
        format!("target-cpu={}", module.cpu),
        "-C".to_owned(),
        format!("target-feature={}", module.feature),
    ];
    if let Some(cfg) = module.cfg {
        rustflags.extend(["--cfg".to_owned(), cfg.to_owned()]);
    }
    let virtual_src = format!("/rustc/{}", toolchain.commit_hash());
    let mut src_dirs = vec![toolchain.rust_src.clone()];
    if let Ok(real) = toolchain.rust_src.canonicalize() {
        if real != toolchain.rust_src {
            src_dirs.push(real);
        }
    }
    for dir in &src_dirs {
        rustflags.push(format!(
            "--remap-path-prefix={}={virtual_src}",
            dir.display()
        ));
    }

    let mut command = Command::new(&toolchain.cargo);
    command
        .current_dir(root)
        .args([
            "rustc",
            "--package",
            "moe-kernels",
            "--locked",
            "--profile",
            "ptx",
        ])
        .args([
            "--target",
            TARGET,
            "-Zbuild-std=core",
            "--crate-type",
            "cdylib",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--", "--emit=asm", "-C", "linker=/bin/true"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", &toolchain.rustc)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        .stdin(Stdio::null());
    // The outer `cargo xtask` (another toolchain) and the user's environment must not
    // leak into the device build: they would change its flags or its outputs' place.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if UNSET_ENV.contains(&key)
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_TARGET_")
        {
            command.env_remove(key);
        }
    }

    let status = wait_with_heartbeat(&mut command, "compiling", start)?;
    if !status.success() {
        bail!(
            "compiling {KERNELS_CRATE} for {TARGET} failed ({status}); cargo's output is above. \
             The device side is the `#[cfg(target_arch = \"nvptx64\")]` code of the crate."
        );
    }
    let asm: PathBuf = root
        .join(target_dir)
        .join(TARGET)
        .join("ptx/deps/moe_kernels.s");
    let raw = fs::read_to_string(&asm).with_context(|| {
        format!(
            "cargo succeeded but left no PTX at {}; remove {target_dir} to force a rebuild",
            asm.display()
        )
    })?;
    eprintln!("compiled in {:.1} s", start.elapsed().as_secs_f64());

    let ptx = manifest::with_header(&raw);
    let mut host_paths = vec![root.display().to_string()];
    host_paths.extend(src_dirs.iter().map(|dir| dir.display().to_string()));
    for var in ["HOME", "CARGO_HOME"] {
        if let Some(value) = std::env::var_os(var) {
            let value = value.to_string_lossy().trim_end_matches('/').to_owned();
            // A home of `/` would match every path.
            if value.len() > 1 {
                host_paths.push(value);
            }
        }
    }
    let found = manifest::embedded_paths(&ptx, &host_paths);
    if !found.is_empty() {
        bail!(
            "the PTX embeds host paths ({}), which would make it differ between machines; \
             look for a `.file` directive or a string constant (a panic location?) in {}",
            found.join(", "),
            asm.display()
        );
    }
    Ok(ptx)
}

/// Environment variables removed from the device build's environment.
const UNSET_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_INCREMENTAL",
    "CARGO_INCREMENTAL",
    "CARGO",
    "RUSTUP_TOOLCHAIN",
    "RUSTDOC",
];

/// Runs `command` (its output passes through), printing a line every 15 s so that a
/// long step does not look hung.
fn wait_with_heartbeat(
    command: &mut Command,
    doing: &str,
    start: Instant,
) -> Result<std::process::ExitStatus> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .with_context(|| format!("could not run `{program}`"))?;
    let mut next_beat = Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().context("waiting for cargo")? {
            return Ok(status);
        }
        if start.elapsed() >= next_beat {
            eprintln!("  ... still {doing} ({} s)", start.elapsed().as_secs());
            next_beat += Duration::from_secs(15);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs ptxas on `module` for each of its architectures, prints the table, and fails
/// on errors or spills.
fn check_with_ptxas(root: &Path, ptxas: &Ptxas, module: Module) -> Result<()> {
    let ptx = module.file;
    eprintln!(
        "checking {ptx} with {} ({}) for {}...",
        ptxas.path.display(),
        ptxas.version,
        module.ptxas_archs.join(", ")
    );
    let start = Instant::now();
    let mut reports = Vec::new();
    for &arch in module.ptxas_archs {
        reports.push(ptxas::run(ptxas, root, &root.join(ptx), arch)?);
    }
    eprintln!("ptxas done in {:.1} s", start.elapsed().as_secs_f64());
    print!("{}", ptxas::table(&reports));
    for report in &reports {
        for warning in &report.warnings {
            eprintln!("{} ({}): {warning}", ptx, report.arch);
        }
    }
    let problems = ptxas::problems(&reports);
    if !problems.is_empty() {
        let mut message = format!("ptxas rejects {ptx}:");
        for problem in problems {
            write!(message, "\n  - {problem}").unwrap();
        }
        bail!(message);
    }
    Ok(())
}

fn read_committed(root: &Path, file: &str) -> Result<String> {
    fs::read_to_string(root.join(file)).with_context(|| {
        format!("could not read {file}: run `cargo xtask build-ptx` and commit {OUT_DIR}/")
    })
}

/// Writes `contents` unless the file already holds exactly that (keeps its mtime).
fn write_if_changed(root: &Path, file: &str, contents: &str) -> Result<()> {
    let path = root.join(file);
    if fs::read(&path).is_ok_and(|old| old == contents.as_bytes()) {
        return Ok(());
    }
    fs::write(&path, contents).with_context(|| format!("could not write {file}"))
}

/// A line for a message: `(end of file)` for none, long lines cut.
fn shorten(line: Option<&str>) -> String {
    const MAX: usize = 160;
    match line {
        None => "(end of file)".to_owned(),
        Some(line) if line.chars().count() > MAX => {
            format!("{}...", line.chars().take(MAX).collect::<String>())
        }
        Some(line) => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_warning_names_both_versions() {
        let recorded = "rustc 1.96.0 (ac68faa20 2026-05-25)\nrelease: 1.96.0";
        let installed = "rustc 1.97.0 (0123456789 2026-07-09)\nrelease: 1.97.0";
        let warning = compiler_changed_warning(recorded, installed);
        assert!(warning.contains("recorded in kernels-gpu/manifest.json: rustc 1.96.0"));
        assert!(warning.contains("installed:  rustc 1.97.0"));
        assert!(warning.contains("run `cargo xtask build-ptx`"));
    }

    #[test]
    fn compiler_warning_shows_the_lines_that_differ_when_the_release_is_the_same() {
        let recorded = "rustc 1.96.0 (ac68faa20 2026-05-25)\nLLVM version: 22.1.8";
        let installed = "rustc 1.96.0 (ac68faa20 2026-05-25)\nLLVM version: 22.1.9";
        let warning = compiler_changed_warning(recorded, installed);
        assert!(warning.contains("(LLVM version: 22.1.8 -> LLVM version: 22.1.9)"));
    }

    #[test]
    fn shortens_long_lines() {
        assert_eq!(shorten(None), "(end of file)");
        assert_eq!(shorten(Some("ld.param.b64")), "ld.param.b64");
        assert_eq!(shorten(Some(&"x".repeat(200))).len(), 163);
    }
}
