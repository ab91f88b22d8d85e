#!/usr/bin/env bash
# One prepared GPU benchmark run on one H100/H200, in under 10 minutes: first whether a LLaMA-7B
# train step fits in an 80 GB GPU's memory (osd_adamw r=512 vs adamw, the device capped at 80 GB),
# then update, projector and train-step costs at 350M and 1B. Needs only JAX (with CUDA), optax,
# flax and orbax — no grain, tensorflow-datasets or installed package: the repo root is put on
# PYTHONPATH.
#
#   bash benchmarks/gpu.sh            # JSON (and gpu.log) under $OUT, else benchmarks/out/
#
# Sections run in priority order, each under its own time cap and all under one overall budget
# (GPU_BENCH_BUDGET_S, default 540 s); a section that runs out of time is skipped or cut, and the
# others still run. Costs that dominate: the SVD steps (ANCHORS.md: 15 s at 350M, 58 s at 1B per
# call on an H200), so they run once, without warmup (compilation is ahead of time, untimed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/out}"
mkdir -p "$DEST"
LOG="$DEST/gpu.log"
BUDGET="${GPU_BENCH_BUDGET_S:-540}"
START=$(date +%s)
A="350m"; B="1b"
# GPU_BENCH_SMOKE=1: the same plumbing at toy sizes (for checking this script on a CPU).
BIG="7b"
SMOKE_UPD=(); SMOKE_STEP=(); SMOKE_PROJ=(); SMOKE_BIG=()
if [[ "${GPU_BENCH_SMOKE:-0}" == 1 ]]; then
  A="tiny"; B="tiny"; BIG="tiny"
  SMOKE_BIG=(--rank 8 --batch-size 4 --seq-len 32 --model-override n_layers=1 --repeats 2)
  SMOKE_UPD=(--repeats 2 --warmup 1)
  SMOKE_STEP=(--repeats 2 --warmup 1 --model-override n_layers=1 --batch-size 4 --seq-len 32)
  SMOKE_PROJ=(--shapes 128x352:32 --repeats 2 --warmup 1)
fi

say() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# section NAME CAP_S COMMAND...: runs COMMAND under min(CAP_S, time left in the budget).
section() {
  local name="$1" cap="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then say "skip $name: ${left}s left in the budget"; return; fi
  say "start $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  say "end $name: exit ${PIPESTATUS[0]}"
}

{
  say "host: $(hostname), budget ${BUDGET}s, out $DEST"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
} | tee -a "$LOG"

# 0. Does a 7B train step fit on one 80 GB GPU? The allocator is capped at an H100-80GB's memory
#    (81559 MiB, as nvidia-smi reports it) through XLA_PYTHON_CLIENT_MEM_FRACTION; each optimizer
#    runs in its own process (bf16 compute, fp32 master weights and state, remat as the preset's
#    default, batch 2x1024, synthetic tokens). osd_adamw r=512 should fit; adamw's params + moments
#    alone (75 GiB) should not: its out-of-memory error is caught and recorded in the JSON.
CAP_MIB="${GPU_BENCH_CAP_MIB:-81559}"
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [[ "$TOTAL_MIB" =~ ^[0-9]+$ ]] && (( TOTAL_MIB > CAP_MIB )); then
  FRACTION=$(awk "BEGIN { printf \"%.4f\", $CAP_MIB / $TOTAL_MIB }")
else
  FRACTION=""  # no GPU (smoke mode) or a GPU no larger than the cap: no cap
fi
say "7b sections: device memory ${TOTAL_MIB:-?} MiB, cap ${CAP_MIB} MiB" \
  "-> XLA_PYTHON_CLIENT_MEM_FRACTION=${FRACTION:-unset}"
# 0c. Compact precision under a 24 GB card's memory (24 GB = 22888 MiB): 7B osd_adamw, fused, bf16
#     weights with stochastic rounding, 8-bit state (int8: e4m3 codes), at r 512 and at GaLore's
#     r 1024 with P moved by Adafactor and by Adam, the residuals kept on the device
#     (--no-offload-residuals) and, for r 1024 Adam, in host memory (--offload-residuals, the
#     trainer's default on a GPU): the pair times what the offload costs.
SMALL_CAP_MIB="${GPU_BENCH_SMALL_CAP_MIB:-22888}"
if [[ "$TOTAL_MIB" =~ ^[0-9]+$ ]] && (( TOTAL_MIB > SMALL_CAP_MIB )); then
  SMALL_FRACTION=$(awk "BEGIN { printf \"%.4f\", $SMALL_CAP_MIB / $TOTAL_MIB }")
else
  SMALL_FRACTION=""
fi
#     XLA:GPU's own estimate (benchmarks.memory --target h100, RESULTS §9, a block by halves):
#     18.44 / 20.26 / 21.87 GiB kept, and 20.87 for r 1024 Adam offloaded (the last case).
for CASE in 512:adam:keep 1024:adafactor:keep 1024:adam:keep 1024:adam:offload; do
  R=${CASE%%:*}; REST=${CASE#*:}; POPT=${REST%%:*}; RES=${REST##*:}
  section fit24-$BIG-osd_adamw-compact-r$R-$POPT-$RES 150 \
    env ${SMALL_FRACTION:+XLA_PYTHON_CLIENT_MEM_FRACTION=$SMALL_FRACTION} \
    "$PY" -m benchmarks.train_step_gpu --preset $BIG --optimizer osd_adamw --rank $R \
    --batch-size 16 --seq-len 256 --remat full --fused-update --param-dtype bfloat16 \
    --state-dtype int8 --projector-optimizer $POPT --warmup 1 --repeats 3 "${SMOKE_BIG[@]}" \
    $([[ $RES == offload ]] && echo --offload-residuals || echo --no-offload-residuals) \
    --out "$DEST/fit24-$BIG-osd_adamw-compact-r$R-$POPT-$RES.json"
done
# 0a. The fused update (train --fused-update) at GaLore's 7B recipe (r 1024, batch 16 x 256, remat
#     full), fp32 master weights and state, under the same 80 GB cap: XLA's CPU estimate is
#     54.7 GiB against 84.7 GiB unfused (benchmarks/RESULTS.md §8).
section fit-$BIG-osd_adamw-fused 200 env ${FRACTION:+XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION} \
  "$PY" -m benchmarks.train_step_gpu --preset $BIG --optimizer osd_adamw --rank 1024 \
  --batch-size 16 --seq-len 256 --remat full --fused-update --warmup 1 --repeats 3 \
  "${SMOKE_BIG[@]}" --out "$DEST/fit-$BIG-osd_adamw-fused.json"
for OPT in osd_adamw adamw; do
  CAP_S=$([[ $OPT == osd_adamw ]] && echo 240 || echo 150)
  section fit-$BIG-$OPT $CAP_S env ${FRACTION:+XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION} \
    "$PY" -m benchmarks.train_step_gpu --preset $BIG --optimizer $OPT --rank 512 \
    --batch-size 2 --seq-len 1024 --warmup 1 --repeats 3 "${SMOKE_BIG[@]}" \
    --out "$DEST/fit-$BIG-$OPT.json"
done

# 1. Optimizer update alone at 350M (r=256): every case, SVD steps once.
section update-$A 150 "$PY" -m benchmarks.update --preset $A --repeats 20 --warmup 3 \
  --svd-repeats 1 --svd-warmup 0 \
  --cases "optax.adamw,osd_adamw,osd_lion,galore_adamw (SVD step),galore_adamw (plain step),optax.contrib.galore (SVD step),optax.contrib.galore (plain step),osd_adamw (t=0: randomized init)" \
  "${SMOKE_UPD[@]}" --out "$DEST/update-$A.json"

# 2. Projector cost per matrix: the paper's four shapes.
section projector 100 "$PY" -m benchmarks.projector \
  --shapes 512x1376:128,1024x2736:256,2048x5461:512,4096x11008:512 --repeats 10 --warmup 2 \
  --svd-repeats 2 "${SMOKE_PROJ[@]}" --out "$DEST/projector-paper.json"

# 3. Full train step at 350M (bf16 compute, fp32 master weights), one process per optimizer so
#    that the runtime's peak memory is per optimizer. OSD's P0 by the randomized range finder keeps
#    168 SVDs out of the (untimed) first step; GaLore's first step still holds its SVD.
section step-$A 200 "$PY" -m benchmarks.step --preset $A --batch-size 32 --seq-len 256 \
  --repeats 10 --warmup 2 --isolate --projector-init randomized \
  "${SMOKE_STEP[@]}" --out "$DEST/step-$A.json"

# 4. Optimizer update alone at 1B (r=512); one SVD baseline (optax.contrib.galore) only.
section update-$B 150 "$PY" -m benchmarks.update --preset $B --repeats 15 --warmup 3 \
  --svd-repeats 1 --svd-warmup 0 \
  --cases "optax.adamw,osd_adamw,osd_lion,galore_adamw (plain step),optax.contrib.galore (SVD step),osd_adamw (t=0: randomized init)" \
  "${SMOKE_UPD[@]}" --out "$DEST/update-$B.json"

# 5. Full train step at 1B, adamw vs osd_adamw in one process (GaLore's first-step SVD alone would
#    take about a minute here).
section step-$B 150 "$PY" -m benchmarks.step --preset $B --batch-size 16 --seq-len 256 \
  --repeats 8 --warmup 2 --optimizers adamw,osd_adamw --projector-init randomized \
  "${SMOKE_STEP[@]}" --out "$DEST/step-$B.json"

say "done; files: $(ls "$DEST" | tr '\n' ' ')"
