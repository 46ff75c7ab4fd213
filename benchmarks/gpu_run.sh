#!/usr/bin/env bash
# The one command for a bare GPU machine without network (torch there; diffusers, gsplat & co
# carried as wheels in .whl/, filled beforehand by benchmarks/gpu_wheels.sh on a networked machine):
#
#     bash benchmarks/gpu_run.sh [RESULT_JSON]      (default: $OUT/gpu_bench.json, else ./gpu_results/)
#
# Steps, each with its own time limit inside one overall budget (BUDGET_S), the JSON rewritten after
# every step so a run cut short still reports what it finished:
#   1. install .whl/*.whl into /tmp/site (no index, no dependency resolution)
#   2. environment: GPU, driver, package versions
#   3. gsplat's CUDA kernels: the JIT build (first import) and the first rasterization call, timed
#   4. benchmarks/gpu_chain_bench.py at published sizes for each preset in PRESETS (one random model
#      set, written by the first preset's run and reused by the others)
#   5. benchmarks/multiview_unet_bench.py (one multi-view UNet step, ours vs stock attention), run
#      right after the first preset
# A log of everything goes beside the JSON (gpu_run.log). Environment knobs, with defaults:
#   PRESETS="default lowvram fast"  STEPS_SCALE=0.1  BUDGET_S=570  WORK=/tmp/mv3d-bench  PY=python3
#   DEVICE=cuda  SIZES=published  PRECISION=auto  SKIP_GSPLAT=0  SKIP_MV=0
#   (DEVICE=cpu SIZES=tiny STEPS_SCALE=0.01 SKIP_MV=1 is a dry run of the script on a CPU machine.)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
RESULT=${1:-${OUT:-$REPO/gpu_results}/gpu_bench.json}
case $RESULT in /*) ;; *) RESULT=$REPO/$RESULT ;; esac
RESULT_DIR=$(dirname "$RESULT")
LOG=$RESULT_DIR/gpu_run.log
PRESETS=${PRESETS:-default lowvram fast}
STEPS_SCALE=${STEPS_SCALE:-0.1}
BUDGET_S=${BUDGET_S:-570}
WORK=${WORK:-/tmp/mv3d-bench}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-published}
PRECISION=${PRECISION:-auto}
SKIP_GSPLAT=${SKIP_GSPLAT:-0}
SKIP_MV=${SKIP_MV:-0}
PARTS=$WORK/parts

mkdir -p "$RESULT_DIR" "$PARTS"
rm -f "$PARTS"/*.json "$PARTS"/*.txt
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MAX_JOBS=${MAX_JOBS:-$(nproc)}                    # gsplat's JIT build: parallel compile jobs
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} # Hopper (H100/H200) only: one architecture to build
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
export PYTHONPATH=$REPO/backend${PYTHONPATH:+:$PYTHONPATH}

log() { echo "[gpu_run $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS)); }
# part NAME RC SECONDS [JSON_FILE]: record one step's outcome for the merge
part() {
  "$PY" - "$PARTS/_$1.json" "$1" "$2" "$3" "${4:-}" <<'EOF'
import json, sys
path, name, rc, seconds, data = sys.argv[1:6]
record = {"name": name, "rc": int(rc), "seconds": float(seconds)}
if data:
    try:
        record["result"] = json.loads(open(data).read())
    except (OSError, ValueError) as exc:
        record["result_error"] = f"{data}: {exc}"
open(path, "w").write(json.dumps(record))
EOF
  merge
}
merge() {
  "$PY" - "$PARTS" "$RESULT" "$STEPS_SCALE" "$PRESETS" <<'EOF'
import json, os, sys, glob
parts, result, scale, presets = sys.argv[1:5]
out = {"benchmark": "gpu_run", "steps_scale": float(scale), "presets": presets.split(), "steps": {}}
for path in sorted(glob.glob(os.path.join(parts, "_*.json"))):
    record = json.loads(open(path).read())
    out["steps"][record.pop("name")] = record
tmp = result + ".tmp"
open(tmp, "w").write(json.dumps(out, indent=2) + "\n")
os.replace(tmp, result)
EOF
}
# run NAME LIMIT_S CMD...: run a step under `timeout`, its output into the log; sets RC and TOOK
run() {
  local name=$1 limit=$2
  shift 2
  if ((limit < 10)); then
    log "$name: skipped, ${limit}s of the budget left"
    RC=124 TOOK=0
    return
  fi
  log "$name: start (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
  TOOK=$((SECONDS - t0))
  log "$name: rc $RC in ${TOOK}s"
}

log "repo $REPO, result $RESULT, presets [$PRESETS], steps scale $STEPS_SCALE, budget ${BUDGET_S}s"

# 1. wheels
shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)
if ((${#wheels[@]})); then
  run wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  part wheels "$RC" "$TOOK"
  if ((RC != 0)); then
    log "wheel install failed; stopping"
    exit 1
  fi
  # /tmp/site comes before site-packages, so it wins over the image's own transformers/peft versions.
  export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  log "no .whl/*.whl: using the packages installed here"
fi

# 2. environment
run env 60 "$PY" - "$PARTS/env.json" <<'EOF'
import importlib.metadata as md, json, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sm=f"{props.major}.{props.minor}")
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
for pkg in ("diffusers", "transformers", "peft", "accelerate", "gsplat", "xatlas", "trimesh", "numpy", "safetensors", "tokenizers"):
    try:
        info[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        info[pkg] = None
import make_your_3d, diffusers, transformers
info["make_your_3d_from"] = make_your_3d.__file__
info["transformers_from"] = transformers.__file__
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info))
EOF
part env "$RC" "$TOOK" "$PARTS/env.json"

# 3. gsplat's kernels
if [[ $SKIP_GSPLAT == 1 || $DEVICE == cpu ]]; then
  log "gsplat build: skipped (SKIP_GSPLAT=$SKIP_GSPLAT, DEVICE=$DEVICE)"
else
  lim=$(left); ((lim > 300)) && lim=300
  run gsplat_build "$lim" "$PY" - "$PARTS/gsplat.json" <<'EOF'
import json, sys, time
import torch
out = {}
t0 = time.perf_counter()
from gsplat.cuda._backend import _C  # the JIT build happens here on a fresh machine
out["import_and_build_s"] = time.perf_counter() - t0
out["built"] = _C is not None
if _C is not None:
    from gsplat import rasterization
    n, dev = 20000, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    means = torch.randn(n, 3, device=dev, generator=g) * 0.3
    quats = torch.nn.functional.normalize(torch.randn(n, 4, device=dev, generator=g), dim=-1)
    scales = torch.rand(n, 3, device=dev, generator=g) * 0.02
    opacities = torch.rand(n, device=dev, generator=g)
    colors = torch.rand(n, 3, device=dev, generator=g)
    viewmats = torch.eye(4, device=dev)[None].clone()
    viewmats[0, 2, 3] = 3.0
    Ks = torch.tensor([[[300.0, 0, 128], [0, 300.0, 128], [0, 0, 1]]], device=dev)
    for key in ("first_call_s", "second_call_s"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        img, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, 256, 256)
        torch.cuda.synchronize()
        out[key] = time.perf_counter() - t0
    out["image_mean"] = float(img.mean())
print(json.dumps(out, indent=2))
open(sys.argv[1], "w").write(json.dumps(out))
sys.exit(0 if out["built"] else 3)
EOF
  part gsplat_build "$RC" "$TOOK" "$PARTS/gsplat.json"
fi

# 4. the whole chain, per preset; 5. the multi-view UNet step bench, right after the first preset
# (cheap, and worth more than the later presets when the budget runs short)
mv_bench() {
  if [[ $SKIP_MV == 1 ]]; then
    log "multiview_unet_bench: skipped (SKIP_MV=1)"
    return
  fi
  run multiview_unet_bench "$(left)" "$PY" "$REPO/benchmarks/multiview_unet_bench.py" --device "$DEVICE" --dtypes fp16,bf16 --repeats 5
  local rc=$RC took=$TOOK
  sed -n '/^Multi-view UNet step/,/multiview_unet_bench: rc/p' "$LOG" | grep -v '^\[gpu_run' |
    "$PY" -c 'import json,sys; print(json.dumps({"table": sys.stdin.read()}))' >"$PARTS/mv.json"
  part multiview_unet_bench "$rc" "$took" "$PARTS/mv.json"
}
first=1
for preset in $PRESETS; do
  run "chain_$preset" "$(left)" "$PY" "$REPO/benchmarks/gpu_chain_bench.py" --preset "$preset" --sizes "$SIZES" \
    --device "$DEVICE" --steps-scale "$STEPS_SCALE" --precision "$PRECISION" --models "$WORK/models-$SIZES" \
    --work "$WORK/chain-$preset" --json "$PARTS/chain_$preset.json"
  part "chain_$preset" "$RC" "$TOOK" "$PARTS/chain_$preset.json"
  if ((first)); then
    mv_bench
    first=0
  fi
done
if ((first)); then
  mv_bench
fi

log "done in ${SECONDS}s; results in $RESULT"
