#!/usr/bin/env bash
# The GPU kit: on a lent GPU machine (Python 3.12, jax with CUDA, flax, optax,
# orbax, chex and pillow installed, no network), in one call of <= 8 minutes:
#   1. the paper-config training step (configs/refcoco.py, RN101 at 416 px,
#      10 per device as on the paper's A100s) in bf16 and fp32: step time,
#      MFU, peak memory (bench/train_step.py);
#   2. the CLIP encoders against OpenAI's PyTorch code (bench/encoders.py);
#   3. the balanced grounding benchmark, the full model and the baseline,
#      one seed (bench/ablations.py);
#   4. the decoder's position probe at the paper's 52 x 52 map, no explicit
#      position information against all of it, 1000 steps
#      (bench/position_probe.py; 300 steps learn nothing at this side).
# Prepare here with `make gpu-wheels` (the packages the machine lacks, as
# Python 3.12 wheels in .whl/), then run from the repository root there:
#   bash bench/gpu_kit.sh            (carry .whl; results in $OUT)
# Each step has its own time limit, so one slow step cannot take the others'
# time; docs/benchmarks.md ("GPU") says how to read the results.
# KIT_TINY=1 runs every step's --tiny smoke mode instead, with no time limits
# (CPU, tests: a loaded 2-core machine is far slower than the GPU).
set -uo pipefail
OUT=${OUT:-runs/gpu_kit}
mkdir -p "$OUT"
if [ -z "${KIT_TINY:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"$OUT/gpu.csv" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 |
  tee "$OUT/log.txt"
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
  [ -n "${KIT_TINY:-}" ] && limit=0  # 0: no limit
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
}
ablations=(--variants baseline,full)
probe=(--seeds 0 --options none,all)
if [ -n "${KIT_TINY:-}" ]; then
  train_step=(--tiny) encoders=(--tiny) ablations+=(--tiny) probe+=(--tiny)
else
  train_step=(--config configs/refcoco.py --per_device_batch 10 --steps 5)
  encoders=(--image_batches 1,32 --text_batches 1,64)
  probe+=(--side 52 --steps 1000)
fi
step 190 train_step python3 -m bench.train_step "${train_step[@]}" \
  --dtype bfloat16,float32 --json "$OUT/train_step.json"
step 70 encoders python3 -m bench.encoders "${encoders[@]}" \
  --json "$OUT/encoders.json"
step 140 ablations python3 -m bench.ablations "${ablations[@]}" --seeds 0 \
  --workdir "${KIT_WORKDIR:-/tmp/ablations}" --json "$OUT/ablations.json"
step 60 position_probe python3 -m bench.position_probe "${probe[@]}" \
  --json "$OUT/position_probe.json"
