#!/usr/bin/env bash
# Builds the moe_permute wheel (abi3, manylinux_2_28, through zig: no container) and
# runs the Python tests against it in a fresh virtual environment. Without a GPU the
# CUDA cases skip; MOE_REQUIRE_GPU=1 makes them fail instead.
#
#   crates/moe-python/scripts/wheel-and-test.sh [VENV_DIR]
#
# VENV_DIR defaults to target/python-venv; it is reused when it exists (the pinned
# torch is a multi-GiB download).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/target/python-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# Pinned: the GPU machine's torch (2.11), and the build tools.
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  "torch==2.11.0" "numpy>=1.26" "pytest>=8" "maturin==1.16.0" "ziglang==0.17.1"

rm -rf "$root/target/wheels"
PATH="$venv/bin:$PATH" maturin build --release --zig \
  -m "$here/Cargo.toml" -o "$root/target/wheels"
wheel=$(ls "$root"/target/wheels/moe_permute-*-cp39-abi3-manylinux_2_28_x86_64.whl)
echo "built $wheel"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"

cd "$here"
# Run from the tests directory's parent, so `import moe_permute` is the installed wheel.
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/
