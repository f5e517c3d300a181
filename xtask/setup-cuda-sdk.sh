#!/usr/bin/env bash
# Assembles, from NVIDIA's PyPI wheels, the CUDA SDK that candle's `cuda` feature builds
# with, on a machine with no GPU and no CUDA install, at <repo>/target/tools/cuda:
#   - nvcc, its front end and cicc, with the CUDA runtime, crt and CCCL headers, and
#     libcudart: candle's kernels are compiled at build time (to PTX, and the MoE and
#     quantized ones to a static library whose launchers call the runtime);
#   - link stubs for the libraries candle links (libcuda, libnvrtc, libcurand, libcublas,
#     libcublasLt): shared objects with the real sonames that define every symbol cudarc
#     binds, generated here from cudarc's own bindings. The linker needs only the names;
#     the program loads the real libraries where it runs (the driver's libcuda, and
#     PyTorch's CUDA 13 wheels on the GPU machine).
# Then `eval "$(xtask/setup-cuda-sdk.sh --env)"` sets what the build reads. Safe to run
# again. See docs/candle.md.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sdk="$repo/target/tools/cuda"
# One CUDA release (13.0, the driver 580 generation), the same as the PTX module's ptxas.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
# library soname (as CUDA 13.0 ships it) and cudarc's bindings module for it
stubs=(
  "libcuda.so.1 driver"
  "libnvrtc.so.13 nvrtc"
  "libcurand.so.10 curand"
  "libcublas.so.13 cublas"
  "libcublasLt.so.13 cublaslt"
)

print_env() {
  echo "export CUDA_HOME='$sdk'"
  echo "export PATH='$sdk/bin':\"\$PATH\""
  # candle compiles its kernels for one architecture; the H200 is sm_90.
  echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
  echo "export CUDARC_CUDA_VERSION=13000"
}

if [[ "${1:-}" == "--env" ]]; then
  print_env
  exit 0
fi

echo "== CUDA 13.0 SDK from PyPI at $sdk"
if [[ -x "$sdk/bin/nvcc" ]] && "$sdk/bin/nvcc" --version >/dev/null 2>&1; then
  echo "present: $("$sdk/bin/nvcc" --version | tail -n 1)"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # `pip download` only fetches the wheels; nothing is installed into Python.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: "${wheels[@]}" -d "$tmp/wheels"
  rm -rf "$sdk.partial"
  mkdir -p "$sdk.partial"
  for wheel in "$tmp"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$wheel" "$tmp/x"
  done
  # Every wheel unpacks under nvidia/cu13/, laid out as a CUDA home but for the
  # targets/<arch>/ directory that nvcc.profile looks for headers and libraries in.
  cp -a "$tmp/x/nvidia/cu13/." "$sdk.partial/"
  chmod +x "$sdk.partial"/bin/* "$sdk.partial"/nvvm/bin/*
  mkdir -p "$sdk.partial/targets/x86_64-linux"
  ln -sfn ../../include "$sdk.partial/targets/x86_64-linux/include"
  ln -sfn ../../lib "$sdk.partial/targets/x86_64-linux/lib"
  # candle-kernels' launchers link the runtime by its unversioned name.
  ln -sfn libcudart.so.13 "$sdk.partial/lib/libcudart.so"
  rm -rf "$sdk"
  mv "$sdk.partial" "$sdk"
  echo "installed: $("$sdk/bin/nvcc" --version | tail -n 1)"
fi

echo "== link stubs at $sdk/lib/stubs"
cudarc_src="$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 |
  python3 -c 'import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break')"
if [[ -z "$cudarc_src" ]]; then
  echo "error: cudarc is not in the workspace's dependencies" >&2
  exit 1
fi
mkdir -p "$sdk/lib/stubs"
for entry in "${stubs[@]}"; do
  read -r soname module <<<"$entry"
  bindings="$cudarc_src/src/$module/sys/mod.rs"
  c="$sdk/lib/stubs/${soname%%.so*}.c"
  # cudarc names every function it binds in a `load::<_F>("name")` call.
  grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$bindings" | sed 's/.*("\(.*\)")/\1/' | sort -u |
    sed 's/.*/void &(void) {}/' >"$c"
  if [[ ! -s "$c" ]]; then
    echo "error: found no symbols in $bindings" >&2
    exit 1
  fi
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$sdk/lib/stubs/$soname" "$c"
  ln -sfn "$soname" "$sdk/lib/stubs/${soname%%.so*}.so"
  echo "$soname: $(wc -l <"$c") symbols"
done
echo "== use it with: eval \"\$($0 --env)\""
