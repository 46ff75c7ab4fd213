#!/usr/bin/env bash
# Fill .whl/ (in the repository root) with the wheels a bare GPU machine needs to run
# benchmarks/gpu_run.sh: Python 3.12, manylinux x86_64, no dependencies resolved (--no-deps).
# Run it on a machine with network access, from anywhere inside the repository:
#
#     bash benchmarks/gpu_wheels.sh [PYTHON]
#
# What is carried, and why (the GPU image's package list: /work/.library/device/KINDS.md):
#   diffusers, importlib-metadata   not installed there
#   gsplat                          not installed there; a pure-Python wheel whose CUDA kernels are
#                                   compiled on first use (gpu_run.sh times that build)
#   xatlas, trimesh, fast-simplification, pymeshfix, platformdirs   not installed there
#   transformers, peft, regex       installed there in other versions: carried so the GPU run uses
#                                   the versions the CPU test suite runs with (transformers also
#                                   checks the regex version at import)
# Everything else the backend imports (torch, accelerate, safetensors, tokenizers, huggingface-hub,
# numpy, scipy, scikit-image, pillow, jaxtyping, rich, ninja, zipp, ...) is already there.
# The versions below are those of the CPU environment the tests pass in. The folder must stay under
# the device tool's 64 MiB carry limit together with the working tree; the script prints the total.
set -euo pipefail

PY=${1:-python3}
ROOT=$(git rev-parse --show-toplevel)
DEST="$ROOT/.whl"
WHEELS=(
  diffusers==0.42.1
  importlib-metadata==10.2.0
  transformers==5.24.0
  peft==0.21.2
  regex==2026.11.19
  gsplat==1.5.3
  xatlas==0.0.11
  trimesh==5.2.0
  fast-simplification==0.2.0
  pymeshfix==0.18.1
  platformdirs==4.14.8
)
LIMIT_MIB=64

exclude=$(git -C "$ROOT" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")" "$DEST"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# One download per wheel: a failure names the wheel, and every version is pinned (two versions of
# one package in .whl/ would stop the install on the GPU machine).
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "$spec"
done

total=$(du -sk "$DEST" | cut -f1)
echo "Wheels in $DEST ($((total / 1024)) MiB; the device tool carries at most $LIMIT_MIB MiB with the working tree):"
ls -1 "$DEST"
tree_kib=$(git -C "$ROOT" ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
if ((total + tree_kib > LIMIT_MIB * 1024)); then
  echo "ERROR: wheels + tracked files = $(((total + tree_kib) / 1024)) MiB, over the $LIMIT_MIB MiB carry limit" >&2
  exit 1
fi
