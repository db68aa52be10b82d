#!/usr/bin/env bash
# Every GPU check of the performance issue, for a GPU machine without internet that has
# Python 3.12 + torch (CUDA) + transformers but not deepspeed / mosaicml-streaming:
#
#   mkdir -p .wheels && cp ../shared/wheels-py312/*.whl .wheels/     # git-ignored
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]                       # default: gpu_out
#
# From a session with the device tool (10-minute calls; pick steps per call). On an H100 all
# steps took ~9 minutes (tests 1.8, tput 2.9, one sweep batch 1.7, profile 1, attn 0.5, decode 0.5):
#   run(command="STEPS='tests tput sweep decode' SWEEP=128 bash benchmarks/gpu_suite.sh", carry=[".wheels"])
# With 15 minutes of device time in all (machine start included), measure first, test second:
#   run(command="STEPS='attn levers e2e' bash benchmarks/gpu_suite.sh", carry=[".wheels"], timeout_s=600)
#   run(command="STEPS=tests bash benchmarks/gpu_suite.sh", carry=[".wheels"])   # if time is left
# Where $OUT is set (the device tool), the results folder is packed into $OUT/gpu_results.tgz
# after every step, so a call cut off at its limit still returns what finished.
#
# Steps (STEPS, default all, in this order):
#   tests    the attention backends' GPU tests (flex / varlen / triton / pinned sdpa vs eager, bf16) and
#            every task's training step under torch.cuda.set_sync_debug_mode("error") and, as the
#            recipes train (bf16 weights, compiled blocks), against the uncompiled step; the
#            side-stream batch copy; the packed hidden-dropout masks' kernel (rate, compiled = eager)
#   tput     benchmarks/train_throughput.py at micro-batch $TPUT_BATCH (256, the best measured on
#            an H100): every backend, compile off/on, the full-last-block ablation,
#            VisualBertForPreTraining; bf16 autocast (TPUT_ARGS: more flags, e.g. --backends sdpa)
#   sweep    the same at micro-batches $SWEEP ("64 128") for sdpa and flex only
#            (the best-MFU search); ZeRO memory is left out on the GPU: a per-rank byte count
#            on 2 ranks, measured on CPU
#   profile  benchmarks/gpu_profile.py: where the step's GPU time goes (ours compiled, peer)
#   attn     benchmarks/attention_kernels.py: each sdpa kernel with/without our mask and dropout,
#            varlen's and flex's preparation and call, the mask-free "mode split" of our mask,
#            the compiled eager reference and vltrain's triton kernels (32/64-wide blocks), at
#            micro-batch $TPUT_BATCH
#   levers   benchmarks/mfu_levers.py at micro-batch $TPUT_BATCH: autocast vs bf16 weights vs 2x batch
#            vs bf16 weights with the triton attention backend (32/64-wide blocks) vs the
#            DeepSpeed engine (bf16, ZeRO-2; at grad_accum 2 with the gradients summed in fp32 vs
#            bf16), and the bf16 steps' kernel-class breakdowns; the
#            hidden dropouts' RNG (none, Inductor's fallback_random, align_random_eager, vltrain's
#            packed masks: model.hidden_dropout_masks=packed); each distinct graph compiles
#            once, so rows cost the step's time limit: LEVERS_ARGS=--h2d adds the batch's
#            host-to-device copy rows (measured on the H200: the side stream stays), --autotune
#            the max-autotune row (long compile), --diagnose the what-ifs; its table is written
#            after every timed round, so a step cut at its limit keeps the rounds done
#   e2e      benchmarks/trainer_e2e.py at micro-batch $TPUT_BATCH: the Trainer as run.py trains
#            (MDS corpus written there, 8 loader workers, ZeRO-2 engine, monitor's MFU and data
#            wait) beside the engine alone and the model's own loop on one batch, then the
#            trainer's own profile (train.profile_steps: phases, kernel classes, GPU idle)
#            (E2E_ARGS: more flags, e.g. --steps 12)
#   decode   benchmarks/decode.py in fp32 (cached vs uncached greedy / beam 5; fp32 so that
#            "identical tokens" is a real check: in bf16 the two paths round differently)
# Each step has a time limit ($STEP_TIMEOUT s; tput, levers and e2e twice that, tests three times: the
# compiled-bf16 task tests and FusedAdam's JIT build were added after the last GPU run, whose tests
# took 1.8 min on an H100); a failing step is recorded
# and the next one runs.
# DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python runs the same plumbing at the debug size on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-gpu_out}
mkdir -p "$RES"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/vltrain_site}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
STEPS=${STEPS:-tests tput sweep profile attn levers e2e decode}
SWEEP=${SWEEP:-64 128}
TPUT_BATCH=${TPUT_BATCH:-256}
STEP_TIMEOUT=${STEP_TIMEOUT:-170}
export PYTHONUNBUFFERED=1
status=0
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" -C "$RES" . ; fi; }
step() {   # step NAME LIMIT_S CMD...: run, log to RES/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then echo "!!! $name failed (exit $rc); tail:"; status=1; fi
  tail -n 25 "$RES/$name.log"
  pack
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

if ! "$PY" -c "import deepspeed, streaming" 2>/dev/null; then
  ls .wheels/*.whl > /dev/null || { echo "no .wheels/*.whl: copy ../shared/wheels-py312/*.whl there"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .wheels/*.whl || exit 2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}" | tee "$RES/arch_list.txt"
"$PY" - <<'PYEOF' | tee "$RES/versions.txt"
import importlib
for m in ("torch", "triton", "transformers", "deepspeed", "streaming", "flash_attn", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 — report what is missing, keep going
        print(m, "MISSING:", type(e).__name__, e)
PYEOF
pack

TT=benchmarks/train_throughput.py
# -v: one line per test as it ends, so a step cut off at its limit still says which passed
want tests && step gpu_tests $((3 * STEP_TIMEOUT)) "$PY" -m pytest -v -rs -p no:cacheprovider ${PYTEST_ARGS:-} \
  tests/test_attention_backends.py tests/test_host_syncs.py tests/test_device_copy.py tests/test_packed_batch.py \
  tests/test_profiling.py tests/test_packed_dropout.py
want tput && step "throughput_b$TPUT_BATCH" $((2 * STEP_TIMEOUT)) "$PY" $TT $QUICK --device "$DEVICE" --no-zero \
  --batch "$TPUT_BATCH" ${TPUT_ARGS:-} --out "$RES/throughput_b$TPUT_BATCH.md" --json "$RES/throughput_b$TPUT_BATCH.json"
if want sweep; then
  for b in $SWEEP; do
    step "sweep_b$b" "$STEP_TIMEOUT" "$PY" $TT $QUICK --device "$DEVICE" --no-zero --batch "$b" --backends sdpa,flex \
      --no-ablation --out "$RES/sweep_b$b.md" --json "$RES/sweep_b$b.json"
  done
fi
want profile && step profile "$STEP_TIMEOUT" "$PY" benchmarks/gpu_profile.py $QUICK --device "$DEVICE" \
  --batch "$TPUT_BATCH" --compile
want attn && step attention_kernels "$STEP_TIMEOUT" "$PY" benchmarks/attention_kernels.py $QUICK \
  --device "$DEVICE" --batch "$TPUT_BATCH"
want levers && step "levers_b$TPUT_BATCH" $((2 * STEP_TIMEOUT)) "$PY" benchmarks/mfu_levers.py $QUICK --device "$DEVICE" \
  --batch "$TPUT_BATCH" --engine --rng ${LEVERS_ARGS:-} --out "$RES/levers_b$TPUT_BATCH.md"
want e2e && step e2e $((2 * STEP_TIMEOUT)) "$PY" benchmarks/trainer_e2e.py $QUICK --device "$DEVICE" \
  --batch "$TPUT_BATCH" ${E2E_ARGS:-} --out "$RES/e2e_b$TPUT_BATCH.md"
want decode && step decode "$STEP_TIMEOUT" "$PY" benchmarks/decode.py $QUICK --device "$DEVICE" --dtype fp32 --batch 8 \
  --out "$RES/decode.md"
exit $status
