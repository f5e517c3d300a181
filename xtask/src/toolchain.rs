//! Finding the external tools `build-ptx` needs: the device Rust toolchain and `ptxas`.
//!
//! The device toolchain is not the one that builds this workspace: it is Debian's
//! `rustc-web` (Rust 1.96, LLVM 22 with the NVPTX back end, and `rust-web-src` for
//! `-Zbuild-std=core`), at `/usr/bin/rustc` and `/usr/bin/cargo` unless `MOE_PTX_RUSTC`
//! and `MOE_PTX_CARGO` say otherwise. `ptxas` comes from NVIDIA's PyPI wheel.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The script that installs everything this module looks for.
pub(crate) const SETUP_SCRIPT: &str = "xtask/setup-gpu-toolchain.sh";

/// Where the setup script puts `ptxas`, relative to the workspace root.
pub(crate) const PTXAS_IN_WORKSPACE: &str = "target/tools/cuda-nvcc/bin/ptxas";

/// The oldest device compiler the recipe is known to work with.
const MIN_RUSTC: (u32, u32) = (1, 96);

/// Runs a command to completion, capturing its output; a failure to start it names it.
pub(crate) fn output(command: &mut Command) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .output()
        .with_context(|| format!("could not run `{program}`"))
}

/// The Rust toolchain that compiles the kernels.
#[derive(Debug, Clone)]
pub(crate) struct DeviceToolchain {
    pub(crate) rustc: PathBuf,
    pub(crate) cargo: PathBuf,
    /// `rustc -vV`, without the trailing newline: the manifest's `compiler`.
    pub(crate) version: String,
    /// The standard library source `-Zbuild-std` compiles (`<sysroot>/lib/rustlib/src/rust`).
    pub(crate) rust_src: PathBuf,
}

impl DeviceToolchain {
    /// Finds the device toolchain and checks it can build for nvptx64.
    pub(crate) fn find() -> Result<Self> {
        let rustc = tool_from_env("MOE_PTX_RUSTC", "/usr/bin/rustc")?;
        let cargo = tool_from_env("MOE_PTX_CARGO", "/usr/bin/cargo")?;

        let verbose_version = output(Command::new(&rustc).arg("-vV"))?;
        if !verbose_version.status.success() {
            bail!(
                "`{} -vV` failed: {}",
                rustc.display(),
                String::from_utf8_lossy(&verbose_version.stderr).trim()
            );
        }
        let version = String::from_utf8(verbose_version.stdout)
            .context("`rustc -vV` printed non-UTF-8 text")?
            .trim_end()
            .to_owned();
        let release = version_field(&version, "release")
            .with_context(|| format!("no `release:` line in `rustc -vV`:\n{version}"))?;
        if parse_release(release).is_none_or(|found| found < MIN_RUSTC) {
            bail!(
                "{} is Rust {release}; the PTX build needs Rust {}.{} or newer with the NVPTX back \
                 end (Debian's rustc-web). Run `{SETUP_SCRIPT}` as root, or set MOE_PTX_RUSTC and \
                 MOE_PTX_CARGO to such a toolchain.",
                rustc.display(),
                MIN_RUSTC.0,
                MIN_RUSTC.1,
            );
        }

        let sysroot = output(Command::new(&rustc).args(["--print", "sysroot"]))?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
        let rust_src = sysroot.join("lib/rustlib/src/rust");
        if !rust_src.join("library/core/Cargo.toml").is_file() {
            bail!(
                "{} has no standard library source at {} (`-Zbuild-std=core` compiles `core` from \
                 it): install Debian's rust-web-src (run `{SETUP_SCRIPT}` as root), or the \
                 rust-src component of the toolchain MOE_PTX_RUSTC names",
                rustc.display(),
                rust_src.display(),
            );
        }
        Ok(Self {
            rustc,
            cargo,
            version,
            rust_src,
        })
    }

    /// The first line of `rustc -vV`, e.g. `rustc 1.96.0 (ac68faa20 2026-05-25)`.
    pub(crate) fn release_line(&self) -> &str {
        first_line(&self.version)
    }

    /// The commit rustc was built from, or `unknown`.
    pub(crate) fn commit_hash(&self) -> &str {
        version_field(&self.version, "commit-hash").unwrap_or("unknown")
    }
}

/// The first line of a `rustc -vV` text.
pub(crate) fn first_line(version: &str) -> &str {
    version.lines().next().unwrap_or_default()
}

/// The value of a `key: value` line of `rustc -vV`.
fn version_field<'a>(version: &'a str, key: &str) -> Option<&'a str> {
    version.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == key).then(|| value.trim())
    })
}

/// `1.96.0` or `1.97.0-nightly` as `(1, 96)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A tool named by an environment variable, else at its default path; it must exist.
fn tool_from_env(var: &str, default: &str) -> Result<PathBuf> {
    match env::var_os(var).filter(|value| !value.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("{var}={} does not exist", path.display());
            }
            Ok(path)
        }
        None => {
            let path = PathBuf::from(default);
            if !path.is_file() {
                bail!(
                    "the device toolchain is missing: {default} not found. The PTX build uses \
                     Debian's rustc-web (Rust 1.96 with the NVPTX back end): run `{SETUP_SCRIPT}` \
                     as root (apt-get install rustc-web rust-web-src cargo-web), or set \
                     MOE_PTX_RUSTC and MOE_PTX_CARGO to a toolchain that can build \
                     nvptx64-nvidia-cuda with -Zbuild-std"
                );
            }
            Ok(path)
        }
    }
}

/// NVIDIA's PTX assembler.
#[derive(Debug, Clone)]
pub(crate) struct Ptxas {
    pub(crate) path: PathBuf,
    /// The `release` line of `ptxas --version`, e.g. `Cuda compilation tools, release
    /// 13.0, V13.0.88`.
    pub(crate) version: String,
}

impl Ptxas {
    /// `$PTXAS`, else `<root>/target/tools/cuda-nvcc/bin/ptxas`, else `ptxas` on `PATH`.
    pub(crate) fn find(root: &Path) -> Result<Self> {
        let path = if let Some(path) = env::var_os("PTXAS").filter(|value| !value.is_empty()) {
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("PTXAS={} does not exist", path.display());
            }
            path
        } else if root.join(PTXAS_IN_WORKSPACE).is_file() {
            root.join(PTXAS_IN_WORKSPACE)
        } else if let Some(path) = find_on_path(OsStr::new("ptxas")) {
            path
        } else {
            bail!(
                "ptxas not found (looked at $PTXAS, {PTXAS_IN_WORKSPACE} and PATH). Run \
                 `{SETUP_SCRIPT}`: it downloads NVIDIA's nvidia-cuda-nvcc==13.0.88 wheel from \
                 PyPI and copies its ptxas to {PTXAS_IN_WORKSPACE} (no GPU or CUDA install \
                 needed). Or set PTXAS to a ptxas from CUDA 13.0 or newer."
            );
        };
        let version = output(Command::new(&path).arg("--version"))?;
        if !version.status.success() {
            bail!("`{} --version` failed", path.display());
        }
        let text = String::from_utf8_lossy(&version.stdout);
        let version = text
            .lines()
            .find(|line| line.contains("release"))
            .or_else(|| text.lines().last())
            .unwrap_or_default()
            .trim()
            .to_owned();
        Ok(Self { path, version })
    }
}

/// The first executable file called `name` in a directory of `PATH`.
fn find_on_path(name: &OsStr) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)
binary: rustc
commit-hash: ac68faa20c58cbccd01ee7208bf3b6e93a7d7f96
commit-date: 2026-05-25
host: x86_64-unknown-linux-gnu
release: 1.96.0
LLVM version: 22.1.8";

    #[test]
    fn reads_rustc_version_fields() {
        assert_eq!(version_field(RUSTC_VV, "release"), Some("1.96.0"));
        assert_eq!(
            version_field(RUSTC_VV, "commit-hash"),
            Some("ac68faa20c58cbccd01ee7208bf3b6e93a7d7f96")
        );
        assert_eq!(version_field(RUSTC_VV, "missing"), None);
        assert_eq!(
            first_line(RUSTC_VV),
            "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)"
        );
    }

    #[test]
    fn parses_releases() {
        assert_eq!(parse_release("1.96.0"), Some((1, 96)));
        assert_eq!(parse_release("1.97.0-nightly"), Some((1, 97)));
        assert_eq!(parse_release("1.63.0"), Some((1, 63)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("1.95.0").unwrap() < MIN_RUSTC);
        assert!(parse_release("2.0.0").unwrap() > MIN_RUSTC);
    }
}
