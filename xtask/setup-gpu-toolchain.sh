#!/usr/bin/env bash
# Installs what `cargo xtask build-ptx` needs on Debian 12, and nothing when it is there:
#   - Debian's rustc-web toolchain (Rust 1.96+ with the NVPTX back end) at /usr/bin/rustc
#     and /usr/bin/cargo, with rust-web-src for -Zbuild-std=core (needs root: apt-get);
#   - NVIDIA's ptxas, from PyPI's nvidia-cuda-nvcc wheel (no GPU, no CUDA install), at
#     <repo>/target/tools/cuda-nvcc/bin/ptxas.
# Safe to run again. See docs/gpu-toolchain.md.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_wheel="nvidia-cuda-nvcc==13.0.88"
ptxas="$repo/target/tools/cuda-nvcc/bin/ptxas"
min_minor=96 # Rust 1.96

# True when /usr/bin/rustc is Rust 1.<min_minor> or newer and its library source and
# /usr/bin/cargo are installed.
rust_ok() {
  [[ -x /usr/bin/rustc && -x /usr/bin/cargo ]] || return 1
  local version major minor
  version="$(/usr/bin/rustc --version)" || return 1 # "rustc 1.96.0 (ac68faa20 2026-05-25)"
  IFS=. read -r major minor _ <<<"${version#rustc }"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  ((major > 1 || (major == 1 && minor >= min_minor))) || return 1
  [[ -f "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library/core/Cargo.toml" ]]
}

echo "== device Rust toolchain (/usr/bin/rustc, 1.$min_minor or newer, with its source)"
if rust_ok; then
  echo "present: $(/usr/bin/rustc --version)"
else
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: /usr/bin/rustc is missing, older than 1.$min_minor, or lacks rust-web-src;" \
      "run this script as root to apt-get install rustc-web rust-web-src cargo-web" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y rustc-web rust-web-src cargo-web
  if ! rust_ok; then
    echo "error: after installing rustc-web, /usr/bin/rustc is still not Rust" \
      "1.$min_minor+ with its source: $(/usr/bin/rustc --version 2>&1 || true)" >&2
    exit 1
  fi
  echo "installed: $(/usr/bin/rustc --version)"
fi

echo "== ptxas ($nvcc_wheel from PyPI)"
if [[ -x "$ptxas" ]] && "$ptxas" --version >/dev/null 2>&1; then
  echo "present: $ptxas"
else
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
      echo "error: python3's pip is missing; install python3-pip (as root) and run again" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y python3-pip
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # `pip download` only fetches the wheel; nothing is installed into Python.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: "$nvcc_wheel" -d "$tmp/wheel"
  wheel="$(find "$tmp/wheel" -name 'nvidia_cuda_nvcc-*.whl' -print -quit)"
  if [[ -z "$wheel" ]]; then
    echo "error: pip did not download a nvidia_cuda_nvcc wheel" >&2
    exit 1
  fi
  member="nvidia/cu13/bin/ptxas"
  if command -v unzip >/dev/null; then
    unzip -q -o "$wheel" "$member" -d "$tmp/x"
  else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$wheel" "$member" "$tmp/x"
  fi
  mkdir -p "$(dirname "$ptxas")"
  install -m 0755 "$tmp/x/$member" "$ptxas.partial"
  mv -f "$ptxas.partial" "$ptxas"
  echo "installed: $ptxas"
fi
"$ptxas" --version | tail -n 2
