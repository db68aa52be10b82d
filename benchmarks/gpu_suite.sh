#!/usr/bin/env bash
# Every GPU check of the performance issue in one call, for a GPU machine without internet
# that has Python 3.12 + torch (CUDA) + transformers but not deepspeed / mosaicml-streaming:
#
#   mkdir -p .wheels && cp ../shared/wheels-py312/*.whl .wheels/     # git-ignored
#   bash benchmarks/gpu_suite.sh [OUT_DIR]                           # OUT_DIR default: $OUT or gpu_out
#
# From a session with the device tool: run(command="bash benchmarks/gpu_suite.sh", carry=[".wheels"])
# (the reports land in $OUT and come back).
#
# 1. installs the wheels with --no-deps into a separate target (the node's torch stays);
# 2. the attention backends' GPU tests (flex / varlen / pinned sdpa vs eager, bf16);
# 3. benchmarks/train_throughput.py in bf16 at micro-batch 8, 32 and 64 (ours per backend,
#    compile off/on, beside VisualBertForPreTraining; MFU against the device's spec peak);
#    ZeRO memory is left out here: it needs 2 ranks and is a per-rank byte count, measured on CPU;
# 4. benchmarks/decode.py in fp32 (cached vs uncached greedy / beam 5; fp32 so that "identical
#    tokens" is a real check: in bf16 the two paths round differently and near-ties flip).
# Each step writes its report under OUT_DIR; a failing step is recorded and the next one runs.
# DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python runs the same plumbing at the debug size on a CPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/vltrain_site}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
status=0
step() {   # step NAME CMD...: run, log to OUT_DIR/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then echo "!!! $name failed (exit $rc); tail:"; status=1; fi
  tail -n 40 "$OUT_DIR/$name.log"
}

if ! "$PY" -c "import deepspeed, streaming" 2>/dev/null; then
  ls .wheels/*.whl > /dev/null || { echo "no .wheels/*.whl: copy ../shared/wheels-py312/*.whl there"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .wheels/*.whl || exit 2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
"$PY" - <<'EOF' | tee "$OUT_DIR/versions.txt"
import importlib
for m in ("torch", "triton", "transformers", "deepspeed", "streaming", "flash_attn", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 — report what is missing, keep going
        print(m, "MISSING:", type(e).__name__, e)
EOF

if "$PY" -c "import pytest" 2>/dev/null; then
  step attention_tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_attention_backends.py
else
  echo "pytest is not installed here: attention GPU tests not run"; status=1
fi
for b in 8 32 64; do
  step "throughput_b$b" "$PY" benchmarks/train_throughput.py $QUICK --device "$DEVICE" --no-zero --batch "$b" \
    --out "$OUT_DIR/throughput_b$b.md" --json "$OUT_DIR/throughput_b$b.json"
done
step decode "$PY" benchmarks/decode.py $QUICK --device "$DEVICE" --dtype fp32 --batch 8 --out "$OUT_DIR/decode.md"
exit $status
