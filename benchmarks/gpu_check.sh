#!/usr/bin/env bash
# One accelerator check, sized to finish in under 8 minutes on one GPU:
#   1. benchmarks/sd_scale.py at 512 px: every stage through the CLIs on the
#      random SD v1.5-architecture pipeline (wall, compile, peak host memory);
#   2. the SAE train step at SD shape: mixed precision, float32, bfloat16 (tokens/s, MFU);
#   3. the sampler at batch 8, 512 px, bfloat16 (images/s, MFU).
# MFU is against the chip's bf16 matmul peak (saemnesia_jax/runtime/sizing.py PEAK_FLOPS).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_TOY=1 bash benchmarks/gpu_check.sh # toy sizes, runs on a CPU (checks the script)
#
# Figures go to benchmarks/results/gpu_*.json; the first run builds the random
# pipeline (about 4 GB under benchmarks/.cache/, a few minutes on one core).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
if [[ -n ${GPU_CHECK_TOY:-} ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  SD_ARGS=(--toy --nice 0 --workdir benchmarks/.cache/toy_runs --stages sample512,collect
           --json_out "$RESULTS/gpu_sd_scale_toy.json")
  CHECK_ARGS=(--toy --json_out "$RESULTS/gpu_check_toy.json")
  LIMIT=900
else
  SD_ARGS=(--size 512 --steps 2 --nice 0 --json_out "$RESULTS/gpu_sd_scale.json")
  CHECK_ARGS=(--json_out "$RESULTS/gpu_check.json")
  LIMIT=270
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== 1/2 SD-scale stages"
# Bounded, so that a slow stage cannot eat the step and sampler figures' time.
timeout "$LIMIT" "$PYTHON" benchmarks/sd_scale.py "${SD_ARGS[@]}" || echo "sd_scale: stopped or failed (status $?)"
echo "== 2/2 SAE train step (mixed, fp32, bf16) and sampler at batch 8"
"$PYTHON" benchmarks/gpu_check.py "${CHECK_ARGS[@]}"
